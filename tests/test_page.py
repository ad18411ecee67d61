"""The front page (`/`, `/status.json`, `/images/<digest>`) as users and operators see it.

A real registry builds an image, fails two builds and is in the middle of a third
(the demo's `neverFinishes`, until NIX_TIMEOUT); Debian's chromium renders the page
headless: its DOM is asserted, and screenshots (light, dark, phone) are kept in
var/test-artefacts/. The ends of the file are unit tests of the page's own logic
(bounded, cached reads; escaping; forge links) over stand-in caches.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import zlib
from dataclasses import replace as dataclass_replace
from pathlib import Path

import pytest
import requests

from builder import names, page
from builder.cache import BuildProgress, BuiltImage, BuiltLayer, FailedBuild, ManifestRef
from builder.cache.sqlite import SqliteCache
from builder.config import Config
from builder.manifest import DOCKER_MANIFEST

REPO = Path(__file__).resolve().parent.parent
ARTEFACTS = REPO / "var" / "test-artefacts"
MARKUP_MESSAGE = "<script>document.title='injected'</script> <b>not bold</b> & <i>done</i>"


def chromium(profile: Path, *args: str, timeout: float = 90) -> str:
    """Headless Debian chromium; its stdout. Missing chromium fails the test (scripts/install-deps installs it)."""
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed: run scripts/install-deps"
    result = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def png_facts(path: Path) -> tuple[int, int, tuple[int, int, int]]:
    """Width, height and the top-left pixel's colour of an 8-bit RGB(A) PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    row = zlib.decompress(idat)
    # The first pixel of the first row is stored as is, whatever the row's filter.
    return width, height, tuple(row[1:4])


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def busy_registry(tmp_path_factory):
    """A registry with a finished image, two failures and a build in progress on its page."""
    from tests.registry_process import RegistryProcess

    # NIX_TIMEOUT outlasts the tests; stopping the registry (SIGTERM) ends the build.
    registry = RegistryProcess(tmp_path_factory.mktemp("page-registry"), {"NIX_TIMEOUT": "300"}).start()
    def pull_forever() -> None:
        try:
            registry.get("/v2/neverfinishes/manifests/latest")
        except requests.RequestException:
            pass  # the registry stopped under it

    slow = threading.Thread(target=pull_forever)
    try:
        slow.start()
        assert registry.get("/v2/shell/hello/manifests/latest", headers={"Accept": DOCKER_MANIFEST}).status_code == 200
        assert registry.get("/v2/failswithmarkup/hello/manifests/latest").status_code == 404
        assert registry.get("/v2/failstobuild/manifests/latest").status_code == 404
        wait_for(lambda: any(b["name"] == "neverfinishes" and b["phase"] == "realising"
                             for b in registry.get("/status.json").json()["building"]), 20, "the build in progress")
        yield registry
    finally:
        registry.stop()
        slow.join(60)


# -- in a real browser -------------------------------------------------------------------


def test_browser_shows_the_build_in_progress_the_finished_image_and_the_escaped_failure(busy_registry, tmp_path):
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    url = busy_registry.url + "/"
    dom = chromium(tmp_path / "profile", "--dump-dom", url)

    building = section(dom, "building")
    assert "neverfinishes:latest" in building and "realising" in building and "linux/amd64" in building
    images = section(dom, "images")
    digest = busy_registry.get("/v2/shell/hello/manifests/latest", headers={"Accept": DOCKER_MANIFEST}).headers[
        "Docker-Content-Digest"]
    assert "shell/hello:latest" in images and f'href="/images/{digest}"' in images
    failures = section(dom, "failures")
    assert "failswithmarkup/hello:latest" in failures and "failstobuild:latest" in failures
    assert "broken on purpose" in failures
    # Nix's markup is text on the page: escaped, never an element.
    assert "&lt;script&gt;document.title='injected'&lt;/script&gt; &lt;b&gt;not bold&lt;/b&gt; &amp;" in failures
    assert "<b>not bold</b>" not in dom and "<i>done</i>" not in dom
    assert "<title>Nix image registry</title>" in dom
    assert f"docker pull {busy_registry.host}/shell/hello" in dom

    light, dark, phone = (ARTEFACTS / f"front-page-{n}.png" for n in ("light", "dark", "phone"))
    chromium(tmp_path / "profile", "--window-size=1280,1800", f"--screenshot={light}", url)
    chromium(tmp_path / "profile", "--window-size=1280,1800", "--force-dark-mode", f"--screenshot={dark}", url)
    chromium(tmp_path / "profile", "--window-size=390,2400", f"--screenshot={phone}", url)
    width, height, background = png_facts(light)
    assert (width, height) == (1280, 1800) and min(background) > 200  # light page
    width, height, background = png_facts(dark)
    assert (width, height) == (1280, 1800) and max(background) < 60  # dark page
    width, _, _ = png_facts(phone)
    assert width == 390
    image_page = ARTEFACTS / "image-page.png"
    chromium(tmp_path / "profile", "--window-size=1280,1400", f"--screenshot={image_page}",
             f"{busy_registry.url}/images/{digest}")
    assert png_facts(image_page)[:2] == (1280, 1400)


def test_browser_refreshes_the_live_part_with_the_script(busy_registry, tmp_path):
    # Virtual time runs the page's refresh timer; the swap marks the live part.
    dom = chromium(tmp_path / "profile", "--virtual-time-budget=12000", "--dump-dom", busy_registry.url + "/")
    assert re.search(r'<div id="live" data-refreshed="\d+"', dom), dom[:3000]
    assert "neverfinishes:latest" in section(dom, "building")


def test_page_refreshes_without_script_and_names_no_outside_resource(busy_registry):
    body = busy_registry.get("/").text
    assert re.search(r'<noscript><meta http-equiv="refresh" content="\d+"></noscript>', body)
    # Styles and the script are inline: nothing to fetch from elsewhere.
    assert not re.search(r"<(script|img|iframe|object)[^>]*\ssrc=", body) and "<link" not in body
    assert "@import" not in body and "url(" not in body and "@font-face" not in body


def section(dom: str, name: str) -> str:
    match = re.search(rf'<section class="card" id="{name}">(.*?)</section>', dom, re.S)
    assert match, f"no section {name}"
    return match.group(1)


# -- the JSON twin and the image page ------------------------------------------------------


def test_status_json_tells_the_same_facts(busy_registry):
    status = busy_registry.get("/status.json")
    assert status.headers["Content-Type"] == "application/json"
    facts = status.json()
    manifest_response = busy_registry.get("/v2/shell/hello/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    manifest = manifest_response.json()
    [image] = [i for i in facts["images"] if i["name"] == "shell/hello"]
    assert image["digest"] == manifest_response.headers["Docker-Content-Digest"]
    assert image["tag"] == "latest" and image["platform"] == "linux/amd64"
    assert image["layers"] == len(manifest["layers"])
    assert image["size"] == sum(layer["size"] for layer in manifest["layers"])
    assert 0 < image["build_seconds"] < 60 and image["finished_unix"] <= time.time()
    [failure] = [f for f in facts["failures"] if f["name"] == "failswithmarkup/hello"]
    assert failure["code"] == "MANIFEST_UNKNOWN" and MARKUP_MESSAGE in failure["message"]
    [build] = [b for b in facts["building"] if b["name"] == "neverfinishes"]
    assert build["phase"] == "realising" and build["since_unix"] <= time.time()
    registry = facts["registry"]
    assert registry["pull"] == f"docker pull {busy_registry.host}/shell/hello"
    assert registry["platforms"] == ["linux/amd64", "linux/arm64"]
    assert list(registry["meta_packages"]) == list(names.META_PACKAGES)  # every one, described
    assert registry["source"]["kind"] == "path" and "/" not in registry["source"]["name"]  # no host path


def test_image_page_lists_layers_with_their_store_paths_and_pulls_by_digest(busy_registry):
    response = busy_registry.get("/v2/shell/hello/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    digest, manifest = response.headers["Docker-Content-Digest"], response.json()
    image_page = busy_registry.get(f"/images/{digest}")
    assert image_page.status_code == 200 and image_page.headers["Content-Type"].startswith("text/html")
    text = image_page.text
    for layer in manifest["layers"]:
        assert layer["digest"] in text
    assert re.search(r"/nix/store/[a-z0-9]{32}-hello-[0-9.]+</code>", text)
    assert re.search(r"/nix/store/[a-z0-9]{32}-libgreeting-1\.0</code>", text)
    pull = f"docker pull {busy_registry.host}/shell/hello@{digest}"
    assert pull in text
    # The SBOM, a referrer of the manifest, is one click away.
    sbom_link = re.search(r'<a href="(/v2/shell/hello/blobs/sha256:[0-9a-f]{64})">sbom\.cdx\.json</a>', text)
    assert sbom_link, text[-3000:]
    document = busy_registry.get(sbom_link.group(1)).json()
    assert document["bomFormat"] == "CycloneDX"
    assert any(c["name"] == "hello" for c in document["components"])
    assert busy_registry.get(f"/v2/shell/hello/manifests/{digest}").status_code == 200


def test_image_page_of_an_unknown_or_malformed_digest_is_a_registry_error(busy_registry):
    unknown = busy_registry.get("/images/sha256:" + "0" * 64)
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    malformed = busy_registry.get("/images/<script>")
    assert malformed.status_code == 400 and malformed.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert busy_registry.get("/images/sha256:" + "0" * 64, allow_redirects=False).status_code == 404


def test_markup_written_by_another_instance_is_shown_as_text(busy_registry):
    # Names pass the grammar before any build, but the page must not trust what the shared cache holds.
    shared = SqliteCache(busy_registry.env["CACHE_PATH"])
    now = time.time()
    shared.record_failure(FailedBuild("k-markup", '<img src=x onerror="alert(1)">', "<t>", "amd64", "MANIFEST_UNKNOWN",
                                      "</pre><script>alert(2)</script>", now, now + 600))
    shared.record_image(built_image('"><svg onload=alert(3)>', now))
    # A message naming a host path is shown as clients get it: without the path (redact.py).
    shared.record_failure(FailedBuild("k-path", "leaky", "latest", "amd64", "UNKNOWN",
                                      "cannot open /etc/registry/secret.key: denied", now, now + 600))
    def page_with_them():
        text = busy_registry.get("/").text
        return text if "onerror" in text and "svg" in text else None

    body = wait_for(page_with_them, 10, "the records on the page")
    assert "<img src=x" not in body and "<script>alert(2)" not in body and "<svg" not in body
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in body
    assert "&lt;/pre&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in body
    facts = busy_registry.get("/status.json").json()
    assert any(f["message"] == "</pre><script>alert(2)</script>" for f in facts["failures"])
    assert "/etc/registry" not in body and "/etc/registry" not in json.dumps(facts)
    assert any(f["name"] == "leaky" and "cannot open" in f["message"] for f in facts["failures"])


# -- across instances, on Firestore --------------------------------------------------------


def test_a_build_on_one_instance_is_on_every_instance_page(start_registry, firestore_registry_env, tmp_path):
    builder = start_registry(firestore_registry_env)
    viewer = start_registry(firestore_registry_env)
    assert builder.get("/v2/hello/manifests/latest").status_code == 200
    assert builder.get("/v2/failstobuild/manifests/latest").status_code == 404
    facts = wait_for(lambda: (f := viewer.get("/status.json").json())["images"] and f["failures"] and f, 10,
                     "the other instance's builds")
    assert [i["name"] for i in facts["images"]] == ["hello"]
    assert [f["name"] for f in facts["failures"]] == ["failstobuild"]
    assert viewer.get(facts["images"][0]["page"]).status_code == 200


def test_page_reads_firestore_in_one_query_per_listing(firestore_env):
    from collections import Counter

    from google.cloud import firestore

    from builder.cache.firestore import FirestoreCache

    client = firestore.Client(project=firestore_env["FIRESTORE_PROJECT"])
    cache = FirestoreCache(client, prefix="page-", timeout=15.0)
    now = time.time()
    for i in range(page.IMAGES_SHOWN + 15):
        cache.record_image(dataclass_replace(built_image(f"img{i}", now - i), manifests=(
            ManifestRef("sha256:" + f"{i:064x}", 500, DOCKER_MANIFEST),)))
    for i in range(page.FAILURES_SHOWN + 5):
        cache.record_failure(FailedBuild(f"f{i}", f"broken{i}", "latest", "amd64", "MANIFEST_UNKNOWN", "no", now - i, now + 60))
    cache.claim_build("b", "holder", now + 60, now)
    cache.report_build("b", "holder", BuildProgress("b", "slow", "latest", "amd64", now, "realising"))
    api, calls = client._firestore_api, Counter()
    for method in ("run_query", "batch_get_documents", "get_document", "commit"):
        def counted(*args, _method=method, _original=getattr(api, method), **kwargs):
            calls[_method] += 1
            return _original(*args, **kwargs)
        setattr(api, method, counted)
    status = page.StatusReader(cache).read()
    assert calls == {"run_query": 3}
    assert [i.name for i in status.images] == [f"img{i}" for i in range(page.IMAGES_SHOWN)]
    assert len(status.failures) == page.FAILURES_SHOWN and status.failures[0].name == "broken0"
    assert [b.phase for b in status.building] == ["realising"] and status.problems == []


def test_a_git_source_shows_the_commit_latest_means(start_registry, tmp_path):
    repo = tmp_path / "pkgs"
    shutil.copytree(REPO / "nix" / "demo", repo)
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path), "GIT_AUTHOR_NAME": "T",
           "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.org"}
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "demo set"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True, env=env).stdout.strip()
    registry = start_registry({"NIXERY_PKGS_REPO": str(repo), "NIXERY_PKGS_PATH": ""})
    source = wait_for(lambda: (s := registry.get("/status.json").json()["registry"]["source"])["latest"] and s, 20,
                      "the commit latest means")
    assert source["kind"] == "git" and source["latest"] == commit
    assert f"<code>{commit[:12]}</code>" in registry.get("/").text
    assert "a branch or tag name, or a 40-hex commit" in registry.get("/").text


# -- the page's own logic (unit tests over stand-in caches) -----------------------------------


def built_image(name: str, finished: float) -> BuiltImage:
    digest = "sha256:" + "ab" * 32
    return BuiltImage(key=f"k-{name}", name=name, tag="latest", architecture="amd64", source="path:/secret/place",
                      manifests=(ManifestRef(digest, 500, DOCKER_MANIFEST),), size=2048, layer_count=1,
                      build_seconds=0.5, finished=finished, expires_at=finished + 600,
                      layers=(BuiltLayer("sha256:" + "cd" * 32, 2048, ("/nix/store/x-<b>",)),))


def no_resolving():
    raise AssertionError("a local package set needs no resolving")


class Listings:
    """A stand-in cache that counts the page's queries and can be slow or broken."""

    def __init__(self):
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.broken = False

    def _call(self, name, result):
        self.calls.append(name)
        self.gate.wait(10)
        if self.broken:
            raise ConnectionError("cache down")
        return result

    def builds_in_progress(self, now, limit):
        return self._call("builds", [BuildProgress("k", "git", "latest", "arm64", now - 5, "packing 2 of 7 layers")])

    def recent_images(self, now, limit):
        return self._call("images", [built_image("shell/git", now - 60)])

    def recent_failures(self, now, limit):
        return self._call("failures", [FailedBuild("f", "nope", "latest", "amd64", "MANIFEST_UNKNOWN", "<x>", now, now + 1)])


@pytest.mark.fast
def test_status_is_three_bounded_queries_reused_for_a_few_seconds():
    listings, clock = Listings(), [1000.0]
    reader = page.StatusReader(listings, clock=lambda: clock[0])
    first = reader.read()
    assert listings.calls == ["builds", "images", "failures"]
    clock[0] += page.STATUS_SECONDS - 0.1
    assert reader.read() is first and len(listings.calls) == 3
    clock[0] += 0.2
    assert reader.read() is not first and len(listings.calls) == 6


@pytest.mark.fast
def test_a_slow_cache_holds_up_one_request_while_the_others_get_the_last_reading():
    listings, clock = Listings(), [1000.0]
    reader = page.StatusReader(listings, clock=lambda: clock[0])
    first = reader.read()
    clock[0] += page.STATUS_SECONDS + 1
    listings.gate.clear()
    refreshing = threading.Thread(target=reader.read)
    refreshing.start()
    wait_for(lambda: len(listings.calls) > 3, 5, "the refresh to start")
    started = time.monotonic()
    assert reader.read() is first
    assert time.monotonic() - started < 0.5
    listings.gate.set()
    refreshing.join(10)


@pytest.mark.fast
def test_a_failing_cache_makes_a_page_that_says_so():
    listings = Listings()
    listings.broken = True
    front = page.FrontPage(Config(), listings, no_resolving)
    facts = front.facts("registry.example")
    assert facts["cache_problems"] == ["builds in progress", "recent images", "recent failures"]
    body = page.render_index(facts, time.time())
    assert "did not answer for: builds in progress, recent images, recent failures" in body


@pytest.mark.fast
def test_render_escapes_every_text_from_the_cache():
    listings = Listings()
    front = page.FrontPage(Config(), listings, no_resolving)
    now = time.time()
    facts = front.facts('host"><script>x</script>')
    body = page.render_index(facts, now)
    assert "<script>x</script>" not in body and "&lt;x&gt;" in body and "host&quot;&gt;&lt;script&gt;" in body
    image = page.image_facts(built_image("<i>n</i>", now), "h", with_layers=True)
    detail = page.render_image(front.about("h"), image, now)
    assert "<i>n</i>" not in detail and "/nix/store/x-&lt;b&gt;" in detail
    assert "/secret/place" not in detail and "/secret/place" not in json.dumps(image)


@pytest.mark.fast
@pytest.mark.parametrize("repo, commit, url", [
    ("https://github.com/NixOS/nixpkgs", "a" * 40, "https://github.com/NixOS/nixpkgs/commit/" + "a" * 40),
    ("https://github.com/you/pkgs.git", "b" * 40, "https://github.com/you/pkgs/commit/" + "b" * 40),
    ("https://gitlab.com/you/pkgs", "c" * 40, "https://gitlab.com/you/pkgs/-/commit/" + "c" * 40),
    ("https://codeberg.org/you/pkgs/", "d" * 40, "https://codeberg.org/you/pkgs/commit/" + "d" * 40),
    ("https://git.example.org/pkgs", "e" * 40, None),
    ("/srv/git/pkgs", "f" * 40, None),
    ("javascript:alert(1)", "0" * 40, None),
    ("https://user:token@github.com/you/pkgs", "1" * 40, "https://github.com/you/pkgs/commit/" + "1" * 40),
])
def test_commits_are_linked_on_known_forges_only(repo, commit, url):
    assert page.forge_url(repo, commit) == url


@pytest.mark.fast
def test_source_urls_are_shown_without_credentials():
    for config in (Config(pkgs_repo="https://user:s3cret@git.example.org/pkgs.git"),
                   Config(channel="https://user:s3cret@example.org/nixpkgs.tar.gz")):
        facts = page.SourceFacts(config, lambda: type("Source", (), {"revision": None})()).facts()
        assert "s3cret" not in json.dumps(facts), facts


@pytest.mark.fast
@pytest.mark.parametrize("config, link", [
    (Config(pkgs_repo="https://github.com/you/pkgs"), "https://github.com/you/pkgs/commit/"),
    (Config(channel="nixos-unstable"), "https://github.com/NixOS/nixpkgs/commit/"),
])
def test_the_commit_latest_means_is_linked_without_waiting_for_the_lookup(config, link):
    resolved = threading.Event()

    def resolve_latest():
        resolved.wait(10)
        return type("Source", (), {"revision": "9" * 40})()

    source = page.SourceFacts(config, resolve_latest)
    started = time.monotonic()
    assert source.facts()["latest"] is None  # asked in the background
    assert time.monotonic() - started < 0.5
    resolved.set()
    facts = wait_for(lambda: (f := source.facts())["latest"] and f, 5, "the resolved commit")
    assert facts["latest_url"] == link + "9" * 40
    body = page.render_index({"registry": {**page.FrontPage(Config(), Listings(), no_resolving).about("h"), "source": facts},
                              "cache_problems": [], "building": [], "images": [], "failures": [],
                              "read_at": "now"}, time.time())
    assert f'<a href="{link}{"9" * 40}"><code>999999999999</code></a>' in body
