"""Pytest fixtures: a pinned Nix artefact and a signed binary cache, both served over HTTP.

Load with `pytest_plugins = ["tests.fixtures_nixcache"]`.

- `nix_artefact`: the machine's Nix packaged by `scripts/make-nix-artefact` (a
  .tar.xz holding bin/nix), served by a loopback HTTP server, with its sha256 —
  what NIX_BOOTSTRAP_URL and NIX_BOOTSTRAP_SHA256 name in production. Debian's Nix
  is linked against the machine's libraries, which is fine on this machine;
  production uses a static Nix build.
- `binary_cache`: demo packages (nix/demo) built in a chroot store of their own,
  signed with a freshly generated key and copied with `nix copy --to file://...`,
  then served over HTTP exactly as cache.nixos.org serves nixpkgs. `goodbye` is
  left out on purpose: it is the package the cache does not have.

Both are real: real Nix builds the cache, real HTTP serves it. A missing tool
fails the tests instead of skipping them.
"""
from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "nix" / "demo"
MAKE_ARTEFACT = REPO / "scripts" / "make-nix-artefact"

# What the cache holds: enough for `hello` with the always-included packages.
CACHED_PACKAGES = ("hello", "coreutils", "busybox", "bashInteractive", "cacert", "iana-etc")
# In the demo set, builds fine, yet not in the cache.
UNCACHED_PACKAGE = "goodbye"

NIX_OPTIONS = (
    "--option", "substituters", "",
    "--option", "sandbox", "false",
    "--option", "build-users-group", "",
    "--option", "experimental-features", "nix-command",
)


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise RuntimeError(f"missing tools for these tests: {', '.join(missing)} (see scripts/install-deps)")


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:3]))} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # requests are counted, not printed
        pass


@dataclass
class FileServer:
    """A directory served over HTTP on loopback, counting the requests for each path."""

    root: Path
    requests: list[str] = field(default_factory=list)
    _server: http.server.ThreadingHTTPServer | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FileServer":
        served = self

        class Handler(_QuietHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(served.root), **kwargs)

            def send_head(self):
                served.requests.append(self.path)
                return super().send_head()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def count(self, suffix: str) -> int:
        return sum(1 for path in self.requests if path.endswith(suffix))


@dataclass(frozen=True)
class NixArtefact:
    path: Path
    sha256: str
    url: str
    server: FileServer


@dataclass(frozen=True)
class BinaryCache:
    url: str
    public_key: str
    root: Path
    store_paths: dict[str, str]  # attribute -> output path
    server: FileServer


def make_nix_artefact(out: Path) -> str:
    """The machine's Nix as a .tar.xz artefact; returns its sha256."""
    require_tools("nix", "tar", "xz", "sha256sum")
    run([str(MAKE_ARTEFACT), str(out)])
    return hashlib.sha256(out.read_bytes()).hexdigest()


def make_binary_cache(root: Path, packages=CACHED_PACKAGES) -> tuple[str, dict[str, str]]:
    """Build `packages` of the demo set and copy their closures, signed, into a file:// cache.

    Returns the public key (`name:base64`) and the output path of each package.
    """
    require_tools("nix", "nix-build", "nix-store")
    store = root / "build-store"  # a chroot store: nothing touches the machine's /nix
    cache = root / "cache"
    secret, public = root / "cache-key.sec", root / "cache-key.pub"
    run(["nix-store", "--generate-binary-cache-key", "nixery-test-cache-1", str(secret), str(public)])
    args = ["nix-build", "--no-out-link", *NIX_OPTIONS, "--option", "store", str(store), str(DEMO)]
    for package in packages:
        args += ["-A", package]
    outputs = run(args).stdout.split()
    run(["nix", *NIX_OPTIONS, "--store", str(store), "store", "sign", "--key-file", str(secret), "--recursive", *outputs])
    run(["nix", *NIX_OPTIONS, "--store", str(store), "copy", "--to", f"file://{cache}", *outputs])
    shutil.rmtree(store, ignore_errors=True)
    if not (cache / "nix-cache-info").exists():
        raise RuntimeError(f"nix copy made no binary cache in {cache}")
    return public.read_text().strip(), dict(zip(packages, outputs))


@pytest.fixture(scope="session")
def nix_artefact(tmp_path_factory) -> NixArtefact:
    folder = tmp_path_factory.mktemp("nix-artefact")
    path = folder / "nix-x86_64-linux.tar.xz"
    sha256 = make_nix_artefact(path)
    server = FileServer(folder).start()
    try:
        yield NixArtefact(path=path, sha256=sha256, url=f"{server.url}/{path.name}", server=server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def binary_cache(tmp_path_factory) -> BinaryCache:
    root = tmp_path_factory.mktemp("binary-cache")
    public_key, store_paths = make_binary_cache(root)
    server = FileServer(root / "cache").start()
    try:
        yield BinaryCache(url=server.url, public_key=public_key, root=root / "cache", store_paths=store_paths,
                          server=server)
    finally:
        server.stop()
