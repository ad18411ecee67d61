"""The front page: `/` (self-contained HTML), `/status.json` (the same facts) and `/images/<digest>`.

What the registry serves, builds in progress on every instance, recent images and failures, all
read from the shared cache in three bounded queries that an instance reuses for STATUS_SECONDS;
nothing here waits for a build. Every text from outside is escaped where HTML is written. Why:
docs/design.md.
"""
from __future__ import annotations

import html
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from werkzeug.wrappers import Request, Response

from . import contents, errors, names, redact, sbom, sources
from .cache import BuildProgress, BuiltImage, Cache, FailedBuild
from .config import DEMO_PACKAGES, Config
from .logs import event

STATUS_SECONDS = 3.0  # how long an instance reuses its last reading of the cache
IMAGES_SHOWN = 20
FAILURES_SHOWN = 10
BUILDS_SHOWN = 20
REFRESH_SECONDS = 5  # the script's refresh; the meta refresh without script is twice as slow
LATEST_SECONDS = 60  # how long an instance reuses the commit a git source's `latest` resolved to

# What each of names.META_PACKAGES (leading segments that are not packages) does, for the page.
META_DESCRIPTIONS = {
    "shell": "adds " + ", ".join(names.SHELL_PACKAGES) + "; the image runs bash by default",
    "arm64": "asks for the linux/arm64 (aarch64-linux) image alone",
    "nonroot": f"runs as user and group {contents.NONROOT_ID} (nonroot), with HOME {contents.NONROOT_HOME}",
}


# -- facts -----------------------------------------------------------------------------


@dataclass
class Status:
    """One reading of the shared cache."""

    read_at: float
    building: list[BuildProgress] = field(default_factory=list)
    images: list[BuiltImage] = field(default_factory=list)
    failures: list[FailedBuild] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be read


def forge_url(repo: str, commit: str | None = None) -> str | None:
    """A browsable address of `repo` (at `commit`) on a known forge, else None."""
    parts = urlsplit(repo)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return None
    host = parts.hostname.lower()  # without a user or password the URL may carry
    base = f"https://{host}{parts.path.removesuffix('/').removesuffix('.git')}"
    if commit is None:
        return base
    if host == "github.com" or host == "codeberg.org" or host.startswith("gitea."):
        return f"{base}/commit/{commit}"
    if host == "gitlab.com" or host.startswith("gitlab."):
        return f"{base}/-/commit/{commit}"
    if host == "git.sr.ht":
        return f"{base}/commit/{commit}"
    return None


NIXPKGS = "https://github.com/NixOS/nixpkgs"


class SourceFacts:
    """The package source, and the commit `latest` means now.

    `resolve_latest` may ask the network (git ls-remote, the channel's git-revision): it runs
    in the background at most once per LATEST_SECONDS, and the page shows the last answer.
    """

    def __init__(self, config: Config, resolve_latest: Callable[[], sources.PackageSource]):
        self.config = config
        self._resolve_latest = resolve_latest
        self._lock = threading.Lock()
        self._latest: tuple[float, str | None] = (0.0, None)
        self._resolving = False

    def facts(self) -> dict[str, Any]:
        c = self.config
        if c.pkgs_repo:
            commit = self._latest_commit()
            return {
                "kind": "git", "name": redact.without_credentials(c.pkgs_repo), "url": forge_url(c.pkgs_repo),
                "latest": commit, "latest_url": forge_url(c.pkgs_repo, commit) if commit else None,
                "tags": "latest (the default branch's head), a branch or tag name, or a 40-hex commit",
            }
        if c.channel:
            if "://" in c.channel:
                shown = redact.without_credentials(c.channel)
                return {"kind": "tarball", "name": shown, "url": shown if shown == c.channel and
                        shown.startswith("https://") else None,
                        "latest": None, "latest_url": None, "tags": "latest, or a 40-hex nixpkgs commit"}
            pinned = bool(sources.COMMIT.match(c.channel))
            commit = c.channel if pinned else self._latest_commit()
            return {
                "kind": "channel", "name": f"nixpkgs {c.channel}",
                "url": f"{NIXPKGS}/commit/{c.channel}" if pinned else f"{NIXPKGS}/commits/{c.channel}",
                "latest": commit, "latest_url": f"{NIXPKGS}/commit/{commit}" if commit else None,
                "tags": "latest, or a 40-hex nixpkgs commit",
            }
        # A local folder: its name only (the page never shows host paths).
        path = os.path.abspath(c.pkgs_path or str(DEMO_PACKAGES))
        demo = path == str(DEMO_PACKAGES)
        return {"kind": "path", "name": "the offline demo package set" if demo else os.path.basename(path),
                "url": None, "latest": None, "latest_url": None, "demo": demo,
                "tags": "latest only (a local package set has no commits)"}

    def _latest_commit(self) -> str | None:
        """The last known commit; a stale one is refreshed in the background, so no page waits on git."""
        with self._lock:
            checked, commit = self._latest
            if time.time() - checked > LATEST_SECONDS and not self._resolving:
                self._resolving = True
                threading.Thread(target=self._refresh, daemon=True).start()
            return commit

    def _refresh(self) -> None:
        commit = None
        try:
            commit = self._resolve_latest().revision
        except errors.RegistryError as e:
            event("page-source", f"cannot resolve latest: {e.message}", severity="WARNING")
        with self._lock:
            self._latest = (time.time(), commit or self._latest[1])
            self._resolving = False


class StatusReader:
    """Reads the cache's listings at most once per `STATUS_SECONDS` on this instance."""

    def __init__(self, cache: Cache, clock: Callable[[], float] = time.time):
        self.cache = cache
        self.clock = clock
        self._last: Status | None = None
        self._refresh = threading.Lock()

    def read(self) -> Status:
        last = self._last
        if last is not None and self.clock() - last.read_at < STATUS_SECONDS:
            return last
        # One request refreshes; the others keep the previous reading meanwhile.
        if not self._refresh.acquire(blocking=last is None):
            return last  # type: ignore[return-value]
        try:
            if self._last is not None and self.clock() - self._last.read_at < STATUS_SECONDS:
                return self._last
            self._last = self._read()
            return self._last
        finally:
            self._refresh.release()

    def _read(self) -> Status:
        now = self.clock()
        status = Status(read_at=now)
        queries = (
            ("building", "builds in progress", lambda: self.cache.builds_in_progress(now, BUILDS_SHOWN)),
            ("images", "recent images", lambda: self.cache.recent_images(now, IMAGES_SHOWN)),
            ("failures", "recent failures", lambda: self.cache.recent_failures(now, FAILURES_SHOWN)),
        )
        # At once: on Firestore the page then waits for one round trip, not three.
        with ThreadPoolExecutor(max_workers=len(queries), thread_name_prefix="front-page") as pool:
            answers = [(attribute, what, pool.submit(call)) for attribute, what, call in queries]
        for attribute, what, answer in answers:
            try:
                setattr(status, attribute, answer.result())
            except Exception as e:  # the page still answers, and says what it could not read
                event("cache-degraded", f"front page: cache read of {what} failed: {e}", severity="WARNING",
                      error=type(e).__name__)
                status.problems.append(what)
        return status


# -- formatting ------------------------------------------------------------------------


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def ago(unix: float, now: float) -> str:
    seconds = max(0, int(now - unix))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min ago"
    return f"{seconds // 86400} d ago"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds) // 60} min {int(seconds) % 60:02d} s"


def platform(architecture: str) -> str:
    return f"linux/{architecture}"


def source_label(identity: str) -> str:
    """What a build's source identity says, without host paths."""
    kind, _, rest = identity.partition(":")
    if kind == "path":
        return "local package set"
    revision = rest.rpartition("@")[2] if kind == "git" else rest
    return revision[:12] if sources.COMMIT.match(revision) else revision


# -- the JSON twin ---------------------------------------------------------------------


class FrontPage:
    """`/`, `/status.json` and `/images/<digest>` of one registry instance."""

    def __init__(self, config: Config, cache: Cache, resolve_latest: Callable[[], sources.PackageSource],
                 clean: Callable[[str], str] = lambda text: text,
                 referrers: Callable[[str], list[dict]] = lambda digest: [],
                 read_blob: Callable[[str], bytes | None] = lambda digest: None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.referrers = referrers  # descriptors of the artifacts whose subject is a manifest digest
        self.read_blob = read_blob
        self.clean = clean  # what a client may read of a message (redact.py): no host path, no credential
        self.cache = cache
        self.clock = clock
        self.status = StatusReader(cache, clock)
        self.source = SourceFacts(config, resolve_latest)

    def handles(self, path: str) -> bool:
        return path in ("/", "/status.json") or path.startswith("/images/")

    def handle(self, request: Request, path: str) -> Response:
        if request.method not in ("GET", "HEAD"):
            raise errors.Unsupported(f"{request.method} is not supported here")
        host = request.host
        if path == "/status.json":
            body = json.dumps(self.facts(host), indent=1).encode()
            return self._response(body, "application/json")
        if path == "/":
            return self._response(render_index(self.facts(host), self.clock()).encode(), "text/html; charset=utf-8")
        digest = path.removeprefix("/images/")
        names.check_digest(digest)
        image = self.cache.built_image(digest, self.clock())
        if image is None:
            raise errors.ManifestUnknown(f"no recent image with manifest {digest}", {"digest": digest})
        facts = image_facts(image, host, with_layers=True)
        facts["sbom"] = self.sbom_of(image)
        body = render_image(self.about(host), facts, self.clock())
        return self._response(body.encode(), "text/html; charset=utf-8")

    def sbom_of(self, image: BuiltImage) -> str | None:
        """Where the image's SBOM (CycloneDX) is served: its referrer's one blob; None when it has none."""
        try:
            for descriptor in self.referrers(image.digest):
                if descriptor.get("artifactType") == sbom.MEDIA_TYPE:
                    artifact = json.loads(self.read_blob(descriptor["digest"]) or b"{}")
                    digest = artifact["layers"][0]["digest"]
                    names.check_digest(digest)
                    return f"/v2/{image.name}/blobs/{digest}"
        except (errors.RegistryError, KeyError, IndexError, TypeError, ValueError):
            pass  # an unreadable artifact: the page shows no SBOM link
        return None

    @staticmethod
    def _response(body: bytes, content_type: str) -> Response:
        response = Response(body, status=200, content_type=content_type)
        response.headers["Cache-Control"] = f"public, max-age={int(STATUS_SECONDS)}"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def about(self, host: str) -> dict[str, Any]:
        return {
            "host": host,
            "pull": f"docker pull {host}/shell/hello",
            "platforms": [platform(a) for a in names.ARCHITECTURES],
            "index_platforms": list(self.config.platforms),  # PLATFORMS: what an image index lists
            "meta_packages": {m: META_DESCRIPTIONS[m] for m in names.META_PACKAGES},
            "always_include": list(self.config.always_include),
            "max_packages": self.config.max_packages,
            "source": self.source.facts(),
        }

    def facts(self, host: str) -> dict[str, Any]:
        status = self.status.read()
        return {
            "registry": self.about(host),
            "read_at": iso(status.read_at),
            "read_at_unix": status.read_at,
            "cache_problems": status.problems,
            "building": [build_facts(b) for b in status.building],
            "images": [image_facts(i, host) for i in status.images],
            "failures": [failure_facts(f, self.clean) for f in status.failures],
        }


def build_facts(build: BuildProgress) -> dict[str, Any]:
    return {
        "name": build.name, "tag": build.tag, "platform": platform(build.architecture),
        "since": iso(build.started), "since_unix": build.started, "phase": build.phase,
    }


def image_facts(image: BuiltImage, host: str, with_layers: bool = False) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "name": image.name, "tag": image.tag, "platform": platform(image.architecture),
        "digest": image.digest,
        "manifests": [{"digest": m.digest, "media_type": m.media_type, "size": m.size} for m in image.manifests],
        "size": image.size, "layers": image.layer_count, "build_seconds": round(image.build_seconds, 3),
        "finished": iso(image.finished), "finished_unix": image.finished, "source": source_label(image.source),
        "page": f"/images/{image.digest}", "pull": f"docker pull {host}/{image.name}@{image.digest}",
    }
    if with_layers:
        facts["layer_list"] = [{"digest": l.digest, "size": l.size, "paths": list(l.paths)} for l in image.layers]
    return facts


def failure_facts(failure: FailedBuild, clean: Callable[[str], str]) -> dict[str, Any]:
    return {
        "name": failure.name, "tag": failure.tag, "platform": platform(failure.architecture),
        "code": failure.code, "message": clean(failure.message),
        "finished": iso(failure.finished), "finished_unix": failure.finished,
    }


# -- HTML ------------------------------------------------------------------------------

e = html.escape

_CSS = """
:root{--bg:#f7f7f5;--fg:#1d2021;--muted:#5f6368;--card:#fff;--line:#e2e2dc;--accent:#3b6ea8;
--code:#eef1f4;--ok:#2e7d32;--bad:#b3261e;--badbg:#fdecea;--run:#a15c00;--runbg:#fff4e0}
@media (prefers-color-scheme:dark){:root{--bg:#151718;--fg:#e6e6e3;--muted:#9aa0a6;--card:#1f2224;
--line:#33373a;--accent:#8ab4f8;--code:#2a2e31;--ok:#81c995;--bad:#f28b82;--badbg:#3a1f1d;
--run:#fdd663;--runbg:#3a3220}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:16px/1.5 system-ui,-apple-system,"Segoe UI",
Roboto,"Noto Sans",sans-serif}
main{max-width:64rem;margin:0 auto;padding:1.25rem 1rem 3rem}
a{color:var(--accent)}
h1{font-size:1.6rem;margin:.2rem 0 .4rem}
h2{font-size:1.15rem;margin:0 0 .6rem;display:flex;gap:.5rem;align-items:baseline}
h2 small{font-weight:400;color:var(--muted);font-size:.85rem}
p{margin:.4rem 0}
code,pre,.mono{font-family:ui-monospace,"SFMono-Regular","DejaVu Sans Mono",Menlo,Consolas,monospace;
font-size:.88em}
code{background:var(--code);padding:.05rem .3rem;border-radius:4px;overflow-wrap:anywhere}
pre{background:var(--code);padding:.6rem .8rem;border-radius:6px;overflow-x:auto;margin:.4rem 0;
white-space:pre-wrap;overflow-wrap:anywhere}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:1rem 1.1rem;
margin:1rem 0}
.lead{color:var(--muted);max-width:46rem}
.pull{font-size:1.05rem;background:var(--code);border-radius:8px;padding:.7rem .9rem;margin:.8rem 0;
white-space:pre-wrap;overflow-wrap:anywhere}
.pull b{color:var(--muted);font-weight:400;user-select:none}
.facts{display:flex;flex-wrap:wrap;gap:.4rem 1.5rem;color:var(--muted);font-size:.92rem}
.facts b{color:var(--fg);font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(18rem,1fr));gap:0 1rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92rem}
th,td{text-align:left;padding:.4rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600;font-size:.8rem;text-transform:uppercase;letter-spacing:.03em}
td.num,th.num{text-align:right;white-space:nowrap}
tr:last-child td{border-bottom:0}
.empty{color:var(--muted);font-style:italic}
.badge{display:inline-block;border-radius:999px;padding:.05rem .55rem;font-size:.8rem;font-weight:600;
white-space:nowrap}
.run{background:var(--runbg);color:var(--run)}
.bad{background:var(--badbg);color:var(--bad)}
.dot{display:inline-block;width:.55rem;height:.55rem;border-radius:50%;background:var(--run);
margin-right:.35rem;animation:pulse 1.4s ease-in-out infinite}
@keyframes pulse{50%{opacity:.25}}
@media (prefers-reduced-motion:reduce){.dot{animation:none}}
.failure{border-top:1px solid var(--line);padding:.6rem 0}
.failure:first-of-type{border-top:0;padding-top:0}
.failure pre{background:var(--badbg);color:var(--fg);max-height:14rem}
.muted{color:var(--muted)}
.warn{background:var(--badbg);color:var(--bad);border-radius:8px;padding:.5rem .8rem}
ul.paths{margin:0;padding:0;list-style:none}
ul.paths li+li{margin-top:.15rem}
footer{color:var(--muted);font-size:.85rem;margin-top:2rem}
@media (max-width:40rem){body{font-size:15px}main{padding:.8rem .6rem 2rem}.card{padding:.8rem}
.hide-small{display:none}th,td{padding:.35rem .3rem}
.examples tr{display:block;border-bottom:1px solid var(--line);padding:.3rem 0}
.examples td{display:block;border:0;padding:.1rem .3rem}.pull{font-size:.95rem}}
"""

# Refreshes the live part in place; without script, the <noscript> meta refresh reloads the page.
_SCRIPT = """
(function(){var live=document.getElementById('live');if(!live||!window.fetch||!window.DOMParser)return;
setInterval(function(){if(document.hidden)return;fetch(location.pathname,{cache:'no-store'})
.then(function(r){return r.ok?r.text():null}).then(function(t){if(!t)return;
var n=new DOMParser().parseFromString(t,'text/html').getElementById('live');
if(n){live.innerHTML=n.innerHTML;live.dataset.refreshed=Date.now()}}).catch(function(){})},%d000)})();
""" % REFRESH_SECONDS


def _page(title: str, body: str, refresh: bool) -> str:
    head_refresh = ""
    if refresh:
        head_refresh = f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS * 2}"></noscript>'
    script = f"<script>{_SCRIPT}</script>" if refresh else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="color-scheme" content="light dark">'
        f"<title>{e(title)}</title>{head_refresh}<style>{_CSS}</style></head>\n"
        f"<body><main>\n{body}\n</main>{script}</body></html>\n"
    )


def _time(unix: float, now: float) -> str:
    return f'<time datetime="{iso(unix)}" title="{iso(unix)}">{e(ago(unix, now))}</time>'


def _short(digest: str) -> str:
    return f'<span class="mono" title="{e(digest)}">{e(digest[:19])}…</span>'


def _source_html(source: dict[str, Any]) -> str:
    name = e(source["name"])
    if source.get("url"):
        name = f'<a href="{e(source["url"])}">{name}</a>'
    latest = ""
    if source.get("latest"):
        commit = f'<code>{e(source["latest"][:12])}</code>'
        if source.get("latest_url"):
            commit = f'<a href="{e(source["latest_url"])}">{commit}</a>'
        latest = f" · <b>latest</b> = {commit}"
    elif source["kind"] in ("git", "channel"):
        latest = " · <b>latest</b>: not resolved yet"
    return f"{name}{latest}"


def _examples(about: dict[str, Any]) -> list[tuple[str, str]]:
    demo = about["source"].get("demo")
    always = ", ".join(about["always_include"]) or "nothing"
    if demo:
        examples = [
            ("hello", f"the <code>hello</code> package (and what is always included: {e(always)})"),
            ("shell/hello/goodbye", "two packages plus an interactive shell; order does not matter"),
            ("arm64/shell/hello", "the same for linux/arm64"),
            ("nonroot/hello", "<code>hello</code>, run as an unprivileged user"),
            ("demopackages.nested", "a dotted attribute path reaches into a nested package set"),
            ("helloworld", "names are lower-case; <code>helloWorld</code> is found case-insensitively"),
        ]
    else:
        examples = [
            ("shell/git/htop", "git and htop with an interactive shell"),
            ("arm64/shell/curl", "the same kind of image for linux/arm64"),
            ("nonroot/shell/python3", "python3 with a shell, run as an unprivileged user"),
            ("python3packages.numpy", "a dotted attribute path reaches into a nested package set"),
            ("hello", f"one package (and what is always included: {e(always)})"),
        ]
    return examples


def _grammar_html(about: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td><code>{name}</code></td><td>{text}</td></tr>" for name, text in _examples(about))
    metas = "".join(f"<li><code>{e(m)}</code>: {e(text)}</li>" for m, text in about["meta_packages"].items())
    source = about["source"]
    commit_example = ""
    if source["kind"] != "path":
        commit_example = (f"<p><code>{e(about['host'])}/hello:&lt;commit&gt;</code> pins the package set to a "
                          "40-hex commit: the image then never changes.</p>")
    return f"""<section class="card" id="names"><h2>Image names</h2>
<p>Every path segment names a package attribute of the package set; the image holds exactly those
packages (at most {about['max_packages']}), linked into <code>/</code>. Meta-packages count at the front of
the name:</p>
<ul>{metas}</ul>
<p>Examples, to pull as <code>{e(about['host'])}/<i>name</i></code>:</p>
<table class="examples"><tbody>{rows}</tbody></table>
<p><b>Platforms:</b> {_index_html(about)}</p>
<p><b>Tags:</b> {e(source['tags'])}.</p>{commit_example}
</section>"""


def _index_html(about: dict[str, Any]) -> str:
    if not about["index_platforms"]:
        return "a plain name means the linux/amd64 image; a leading <code>arm64</code> the linux/arm64 one."
    listed = ", ".join(f"<code>{e(p)}</code>" for p in about["index_platforms"])
    return (f"a client that accepts an image index gets one image per platform ({listed}) and picks its own "
            "(<code>docker pull --platform linux/arm64</code>); a leading <code>arm64</code> names that image alone.")


def _listing(items: list[dict[str, Any]], empty: str, head: str, row: Callable[[dict[str, Any]], str]) -> str:
    """A table of `items`, a row each, under the column heads `head`; `empty` when there are none."""
    if not items:
        return f'<p class="empty">{empty}</p>'
    rows = "".join(row(item) for item in items)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _building_html(building: list[dict[str, Any]], now: float) -> str:
    return _listing(
        building, "Nothing is building right now.",
        '<th>image</th><th class="hide-small">platform</th><th>phase</th><th class="num">since</th>',
        lambda b: f"<tr><td><span class=\"dot\"></span><code>{e(b['name'])}:{e(b['tag'])}</code></td>"
                  f"<td class=\"hide-small\">{e(b['platform'])}</td><td><span class=\"badge run\">{e(b['phase'])}</span></td>"
                  f"<td class=\"num\">{_time(b['since_unix'], now)}</td></tr>")


def _images_html(images: list[dict[str, Any]], now: float) -> str:
    return _listing(
        images, "No image has been built recently.",
        '<th>image</th><th class="hide-small">digest</th><th class="num">size</th>'
        '<th class="num hide-small">layers</th><th class="num hide-small">build</th><th class="num">built</th>',
        lambda i: f"<tr><td><a href=\"{e(i['page'])}\"><code>{e(i['name'])}:{e(i['tag'])}</code></a>"
                  f"<div class=\"muted\">{e(i['platform'])}</div></td>"
                  f"<td class=\"hide-small\">{_short(i['digest'])}</td>"
                  f"<td class=\"num\">{e(human_size(i['size']))}</td><td class=\"num hide-small\">{i['layers']}</td>"
                  f"<td class=\"num hide-small\">{e(duration(i['build_seconds']))}</td>"
                  f"<td class=\"num\">{_time(i['finished_unix'], now)}</td></tr>")


def _failures_html(failures: list[dict[str, Any]], now: float) -> str:
    if not failures:
        return '<p class="empty">No build has failed recently.</p>'
    return "".join(
        f"<div class=\"failure\"><div><code>{e(f['name'])}:{e(f['tag'])}</code> "
        f"<span class=\"muted\">{e(f['platform'])} · {_time(f['finished_unix'], now)}</span> "
        f"<span class=\"badge bad\">{e(f['code'])}</span></div><pre>{e(f['message'])}</pre></div>"
        for f in failures
    )


def render_index(facts: dict[str, Any], now: float) -> str:
    about = facts["registry"]
    problems = ""
    if facts["cache_problems"]:
        problems = (f'<p class="warn">The build cache did not answer for: {e(", ".join(facts["cache_problems"]))}. '
                    "What follows may be incomplete.</p>")
    platforms = ", ".join(f"<code>{e(p)}</code>" for p in about["platforms"])
    body = f"""<header>
<h1>Nix image registry</h1>
<p class="lead">Container images built on demand with Nix: name the packages you want in the image
name, and the registry builds an image holding exactly those packages. No Dockerfile; any client that
pulls from a registry (docker, podman, skopeo, containerd, crane) pulls from this one.</p>
<div class="pull mono"><b>$ </b>{e(about['pull'])}</div>
<div class="facts"><span><b>Packages:</b> {_source_html(about['source'])}</span>
<span><b>Platforms:</b> {platforms}</span></div>
</header>
{_grammar_html(about)}
<div id="live">{problems}
<section class="card" id="building"><h2>Building now <small>all instances · {len(facts['building'])}</small></h2>
{_building_html(facts['building'], now)}</section>
<section class="card" id="images"><h2>Recent images <small>{len(facts['images'])} newest</small></h2>
{_images_html(facts['images'], now)}</section>
<section class="card" id="failures"><h2>Recent failures <small>{len(facts['failures'])} newest</small></h2>
{_failures_html(facts['failures'], now)}</section>
<footer>Read from the shared build cache at {e(facts['read_at'])} · refreshes every {REFRESH_SECONDS} s ·
the same facts as <a href="/status.json">JSON</a></footer>
</div>"""
    return _page("Nix image registry", body, refresh=True)


def render_image(about: dict[str, Any], image: dict[str, Any], now: float) -> str:
    layers = []
    for number, layer in enumerate(image["layer_list"], 1):
        if layer["paths"]:
            paths = "".join(f"<li><code>{e(p)}</code></li>" for p in layer["paths"])
            contents = f'<ul class="paths">{paths}</ul>'
        else:
            contents = '<span class="muted">the image\'s own files: links into <code>/</code>, /etc, /tmp</span>'
        layers.append(f"<tr><td class=\"num\">{number}</td><td>{_short(layer['digest'])}</td>"
                      f"<td class=\"num\">{e(human_size(layer['size']))}</td><td>{contents}</td></tr>")
    manifests = "".join(f"<li><code>{e(m['digest'])}</code> <span class=\"muted\">{e(m['media_type'])}</span></li>"
                        for m in image["manifests"])
    title = f"{image['name']}:{image['tag']}"
    sbom_html = ""
    if image.get("sbom"):
        sbom_html = (f'<p><b>SBOM</b> (CycloneDX, a referrer of each manifest): <a href="{e(image["sbom"])}">'
                     f'{e(sbom.FILE_NAME)}</a>, or <code>oras discover {e(about["host"])}/{e(image["name"])}'
                     f'@{e(image["digest"])}</code></p>')
    body = f"""<p><a href="/">← Nix image registry</a></p>
<h1><code>{e(title)}</code></h1>
<div class="facts"><span><b>Platform:</b> {e(image['platform'])}</span>
<span><b>Size:</b> {e(human_size(image['size']))} in {image['layers']} layers</span>
<span><b>Built:</b> {_time(image['finished_unix'], now)} in {e(duration(image['build_seconds']))}</span>
<span><b>Packages:</b> <code>{e(image['source'])}</code></span></div>
<section class="card"><h2>Pull by digest</h2>
<div class="pull mono"><b>$ </b>{e(image['pull'])}</div>
<p>Manifests (the same layers, two formats):</p><ul>{manifests}</ul>{sbom_html}</section>
<section class="card"><h2>Layers <small>base first</small></h2>
<div class="scroll"><table><thead><tr><th class="num">#</th><th>digest</th><th class="num">size</th>
<th>store paths</th></tr></thead><tbody>{''.join(layers)}</tbody></table></div></section>"""
    return _page(f"{title} · Nix image registry", body, refresh=False)
