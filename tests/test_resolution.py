"""Resolutions shared through the cache: a fresh instance serves known packages without evaluating.

Every instance here is an ImageBuilder with a Nix store, work folder and memory of its
own; they share only the cache (SQLite) and the layer storage, as function instances
share Firestore and the bucket. The package set is the demo set served as a channel
on loopback (`<channel>/git-revision` and a tarball per commit), the binary cache is
the signed loopback one of tests/fixtures_nixcache.py, and Nix runs through wrappers
that log every call, so the tests count evaluations and tarball downloads.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from builder import names, resolution
from builder.build import ImageBuilder
from builder.cache.memory import MemoryCache
from builder.cache.sqlite import SqliteCache
from builder.config import Config
from builder.storage.filesystem import FilesystemStorage
from tests.fixtures_nixcache import DEMO, FileServer, require_tools

pytestmark = pytest.mark.timeout(600)

COMMIT_1 = "1" * 40
COMMIT_2 = "2" * 40
NIX_TOOLS = ("nix", "nix-store", "nix-instantiate", "nix-build")


class Channel:
    """The demo set published like a nixpkgs channel, counting tarball downloads."""

    def __init__(self, root: Path):
        self.root = root
        (root / "archive").mkdir(parents=True)
        self.server = FileServer(root).start()

    def publish(self, commit: str) -> None:
        with tarfile.open(self.root / "archive" / f"{commit}.tar.gz", "w:gz") as tar:
            tar.add(DEMO, arcname=f"nixpkgs-{commit[:7]}")
        (self.root / "channels" / "demo").mkdir(parents=True, exist_ok=True)
        (self.root / "channels" / "demo" / "git-revision").write_text(commit + "\n")

    def tarballs(self) -> int:
        return self.server.count(".tar.gz")


@pytest.fixture
def channel(tmp_path):
    published = Channel(tmp_path / "www")
    published.publish(COMMIT_1)
    yield published
    published.server.stop()


@pytest.fixture
def nix_log(tmp_path) -> tuple[Path, Path]:
    """A folder of wrappers around the Nix commands, each appending its name and arguments to a log."""
    require_tools(*NIX_TOOLS)
    bin_dir, log = tmp_path / "nix-bin", tmp_path / "nix-calls.log"
    bin_dir.mkdir()
    for tool in NIX_TOOLS:
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexec {shutil.which(tool)} "$@"\n')
        wrapper.chmod(0o755)
    log.touch()
    return bin_dir, log


def evaluated(log: Path) -> list[list[str]]:
    """The names each evaluation asked for; a fetch of the package set alone asks for none."""
    asked = [json.loads(line.split("--argstr packagesJson ", 1)[1].split(" --argstr", 1)[0])
             for line in log.read_text().splitlines() if line.startswith("nix-instantiate ")]
    return [names for names in asked if names]


def calls(log: Path, tool: str, but: str | None = None) -> int:
    """Runs of `tool` in the log; with `but`, not counting those whose arguments hold it."""
    return sum(1 for line in log.read_text().splitlines()
               if line.split(" ", 1)[0] == tool and (but is None or but not in line.split()))


def hello_fact(instance):
    """The key and the resolution record of `hello` that `instance` built and recorded."""
    instance.image(request("hello"), "latest")
    key = resolution.package_key(instance.resolve_source("latest"), "x86_64-linux", "hello")
    return key, instance.cache.inner.get_facts(resolution.PACKAGE, [key], time.time())[key]


@pytest.fixture
def instances(tmp_path, channel, nix_log, binary_cache):
    """make(name, **env): a fresh instance over the shared cache and storage (or its own: shared=False)."""
    bin_dir, _ = nix_log

    def make(name: str, shared: bool = True, **env: str) -> ImageBuilder:
        own = tmp_path / name
        config = Config.from_env({
            "NIXERY_CHANNEL": "demo",
            "NIXPKGS_CHANNELS_URL": f"{channel.server.url}/channels",
            "NIXPKGS_ARCHIVE_URL": f"{channel.server.url}/archive/{{rev}}.tar.gz",
            "NIX_BIN_DIR": str(bin_dir),
            "NIX_STORE_ROOT": str(own / "store"),
            "WORK_DIR": str(own / "work"),
            "NIX_SUBSTITUTERS": binary_cache.url,
            "NIX_TRUSTED_PUBLIC_KEYS": binary_cache.public_key,
            **env,
        })
        where = tmp_path if shared else own
        cache = MemoryCache(SqliteCache(str(where / "cache.sqlite")))
        storage = FilesystemStorage(str(where / "storage"))
        storage.check()
        return ImageBuilder(config, storage, cache, log=lambda *a, **k: None)

    return make


def request(name: str) -> names.ImageRequest:
    return names.parse_image_name(name, always_include=("cacert", "iana-etc"), max_packages=64, max_length=1024)


def oci_digest(record) -> str:
    return next(m.digest for m in record.manifests if m.media_type.startswith("application/vnd.oci"))


def test_fresh_instance_serves_a_new_combination_of_known_packages_without_evaluating(instances, channel, nix_log):
    _, log = nix_log
    first = instances("first")
    first.image(request("hello"), "latest")
    first.image(request("bashinteractive"), "latest")
    assert calls(log, "nix-instantiate") >= 2 and channel.tarballs() == 1

    log.write_text("")
    fresh = instances("fresh")  # its own store, work folder and memory: it has seen nothing
    record = fresh.image(request("bashinteractive/hello"), "latest")
    assert calls(log, "nix-instantiate") == 0, log.read_text()
    assert calls(log, "nix-build") == 0
    assert channel.tarballs() == 1  # no package set fetched
    store = Path(fresh.config.nix_store) / "nix" / "store"
    held = [p.name for p in store.iterdir()] if store.exists() else []
    assert not [name for name in held if name.endswith("-source")]  # fetchTarball's unpacked set

    # The very image an instance that records nothing builds by evaluating.
    alone = instances("alone", shared=False)
    assert oci_digest(alone.image(request("bashinteractive/hello"), "latest")) == oci_digest(record)


def test_an_image_whose_layers_are_all_stored_needs_no_nix_at_all(instances, nix_log):
    _, log = nix_log
    first = instances("first")
    first.image(request("hello"), "latest")
    first.image(request("coreutils"), "latest")
    log.write_text("")
    # Under the layer budget every store path is a layer of its own, so each layer of
    # the new combination is stored already: only the customisation layer is new.
    fresh = instances("fresh")
    fresh.image(request("coreutils/hello"), "latest")
    assert log.read_text() == ""
    assert fresh._nix_settings is None  # Nix was not even bootstrapped


def test_only_never_resolved_names_are_evaluated(instances, nix_log):
    _, log = nix_log
    instances("first").image(request("hello"), "latest")
    log.write_text("")
    instances("fresh").image(request("hello/coreutils"), "latest")
    assert evaluated(log) == [["coreutils"]]


def test_a_recorded_path_no_binary_cache_has_falls_back_to_evaluation_and_is_replaced(instances, nix_log):
    _, log = nix_log
    first = instances("first")
    key, fact = hello_fact(first)
    cache, true_fact = first.cache.inner, fact.value
    # A wrong record: hello resolved to a path nobody can substitute.
    bogus = "/nix/store/" + "0" * 32 + "-hello-bogus"
    wrong = {**true_fact, "resolved": {**true_fact["resolved"], "path": bogus}, "closure": [bogus], "tree": None}
    cache.put_facts(resolution.PATH, {bogus: {"narSize": 1, "narHash": "", "references": []}}, time.time() + 600)
    cache.put_facts(resolution.PACKAGE, {key: wrong}, time.time() + 600)

    log.write_text("")
    record = instances("fresh").image(request("hello/coreutils"), "latest")
    assert record.manifests
    assert calls(log, "nix-instantiate") >= 1  # evaluated after all
    assert cache.get_facts(resolution.PACKAGE, [key], time.time())[key].value == true_fact


def test_a_moving_channel_never_uses_records_of_its_old_commit(instances, channel, nix_log):
    _, log = nix_log
    instances("first", REVISION_TTL="1").image(request("hello"), "latest")
    channel.publish(COMMIT_2)  # the channel moves (same packages, another commit)
    time.sleep(1.1)
    log.write_text("")
    fresh = instances("fresh", REVISION_TTL="1")
    assert fresh.resolve_source("latest").revision == COMMIT_2
    fresh.image(request("coreutils/hello"), "latest")
    assert [sorted(names) for names in evaluated(log)] == [["cacert", "coreutils", "hello", "iana-etc"]]
    assert channel.server.count(f"{COMMIT_2}.tar.gz") == 1


def test_records_expire_like_the_image_cache(instances, nix_log):
    _, log = nix_log
    first = instances("first")
    key, fact = hello_fact(first)
    assert first.resolve_source("latest").pinned
    assert abs(fact.expires_at - (time.time() + first.config.image_ttl(True))) < 60
    assert first.cache.inner.get_facts(resolution.PACKAGE, [key], fact.expires_at + 1) == {}


def test_a_package_whose_tree_was_not_recorded_is_realised_by_path_not_evaluated(instances, nix_log):
    _, log = nix_log
    first = instances("first")
    key, fact = hello_fact(first)
    first.image(request("coreutils"), "latest")
    cache = first.cache.inner
    cache.put_facts(resolution.PACKAGE, {key: {**fact.value, "tree": None}}, fact.expires_at)  # too large to record

    log.write_text("")
    record = instances("fresh").image(request("coreutils/hello"), "latest")
    assert calls(log, "nix-instantiate") == 0
    # hello's output, by path, from the binary cache (besides opening the fresh instance's store)
    assert calls(log, "nix-store", but="--init") == 1
    alone = instances("alone", shared=False)
    assert oci_digest(alone.image(request("coreutils/hello"), "latest")) == oci_digest(record)


def test_builds_at_once_on_a_fresh_instance_fetch_the_package_set_once(instances, channel):
    fresh = instances("fresh")
    with ThreadPoolExecutor(2) as pool:
        images = list(pool.map(lambda name: fresh.image(request(name), "latest"), ["hello", "coreutils"]))
    assert all(image.manifests for image in images)
    assert channel.tarballs() == 1
