"""Pytest fixtures: a pinned Nix artefact and a signed binary cache, both served over HTTP.

Load with `pytest_plugins = ["tests.fixtures_nixcache"]`.

- `nix_artefact`: the machine's Nix packaged by `scripts/make-nix-artefact` (a
  .tar.xz holding bin/nix), served by a loopback HTTP server, with its sha256 —
  what NIX_BOOTSTRAP_URL and NIX_BOOTSTRAP_SHA256 name for a mirrored Nix. Debian's Nix
  is linked against the machine's libraries, which is fine on this machine;
  production uses a static Nix build.
- `binary_cache`: demo packages (nix/demo) built in a chroot store of their own,
  signed with a freshly generated key and copied with `nix copy --to file://...`,
  then served over HTTP exactly as cache.nixos.org serves nixpkgs. `goodbye` is
  left out on purpose: it is the package the cache does not have. The cache also
  holds the machine's Nix published as a store path laid out like a static Nix's
  (`nix_store_path`): what NIX_BOOTSTRAP_STORE_PATH names in production.

Both are real: real Nix builds the cache, real HTTP serves it. A missing tool
fails the tests instead of skipping them.

`CloudFunction` starts one function instance as Cloud Functions runs it:
functions-framework with entry point `registry`, as `nobody`, from a root-owned
read-only copy of the source (`make_function_source`), HOME unwritable, PATH
empty (no Nix but the bootstrapped one), and /tmp a fresh private tmpfs (a mount
namespace of its own) as the only writable place, like the function's
memory-backed /tmp. The Python is the machine's /usr/bin/python3 with a copy of
the project's installed packages on PYTHONPATH (the development virtualenv's
interpreter lives under /root, which `nobody` cannot enter, and a checkout under
/tmp would be hidden by the private /tmp), as Cloud Functions installs
requirements.txt next to the source.
"""
from __future__ import annotations

import hashlib
import math
import http.server
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import hcl2
import pytest

from tests.registry_process import RegistryProcess

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "nix" / "demo"
MAKE_ARTEFACT = REPO / "scripts" / "make-nix-artefact"

# What the cache holds: enough for `hello` with the always-included packages.
CACHED_PACKAGES = ("hello", "coreutils", "busybox", "bashInteractive", "cacert", "iana-etc")
# In the demo set, builds fine, yet not in the cache.
UNCACHED_PACKAGE = "goodbye"

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
TMPFS_SIZE = "4g"  # an upper bound like the function's memory; only what is written uses memory

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
    nix_store_path: str = ""  # the published Nix


def make_nix_artefact(out: Path) -> str:
    """The machine's Nix as a .tar.xz artefact; returns its sha256."""
    require_tools("nix", "tar", "xz", "sha256sum")
    run([str(MAKE_ARTEFACT), str(out)])
    return hashlib.sha256(out.read_bytes()).hexdigest()


# The name of the published Nix's store path (production: nix-static-x86_64-unknown-linux-musl-<version>).
PUBLISHED_NIX_NAME = "nix-static-for-tests"


def publish_nix(store: Path, scratch: Path) -> str:
    """The machine's Nix added to the chroot `store` as a static Nix's store path is laid out.

    bin/nix plus each command name as a relative link to it. Returns the store path.
    """
    require_tools("nix")
    tree = scratch / PUBLISHED_NIX_NAME
    (tree / "bin").mkdir(parents=True)
    shutil.copyfile(os.path.realpath(shutil.which("nix")), tree / "bin" / "nix")
    (tree / "bin" / "nix").chmod(0o555)
    for name in ("nix-build", "nix-instantiate", "nix-store", "nix-env", "nix-hash", "nix-prefetch-url",
                 "nix-collect-garbage", "nix-channel", "nix-shell", "nix-copy-closure"):
        (tree / "bin" / name).symlink_to("nix")
    path = run(["nix", *NIX_OPTIONS, "--store", str(store), "store", "add-path", str(tree),
                "--name", PUBLISHED_NIX_NAME]).stdout.strip()
    shutil.rmtree(tree)
    return path


def make_binary_cache(root: Path, packages=CACHED_PACKAGES, compression: str = "xz",
                      key_name: str = "nixery-test-cache-1") -> tuple[str, dict[str, str]]:
    """Build `packages` of the demo set and copy their closures, signed, into a file:// cache (`root/cache`).

    The machine's Nix goes in too, as store path `<result>["nix"]` (see `publish_nix`).
    Returns the public key (`name:base64`) and the output path of each package; the
    secret key stays in `root/cache-key.sec`.
    """
    require_tools("nix", "nix-build", "nix-store")
    root.mkdir(parents=True, exist_ok=True)
    store = root / "build-store"  # a chroot store: nothing touches the machine's /nix
    cache = root / "cache"
    secret, public = root / "cache-key.sec", root / "cache-key.pub"
    run(["nix-store", "--generate-binary-cache-key", key_name, str(secret), str(public)])
    outputs = []
    if packages:
        args = ["nix-build", "--no-out-link", *NIX_OPTIONS, "--option", "store", str(store), str(DEMO)]
        for package in packages:
            args += ["-A", package]
        outputs = run(args).stdout.split()
    nix_path = publish_nix(store, root)
    paths = [*outputs, nix_path]
    run(["nix", *NIX_OPTIONS, "--store", str(store), "store", "sign", "--key-file", str(secret), "--recursive", *paths])
    run(["nix", *NIX_OPTIONS, "--store", str(store), "copy", "--to", f"file://{cache}?compression={compression}",
         *paths])
    shutil.rmtree(store, ignore_errors=True)
    if not (cache / "nix-cache-info").exists():
        raise RuntimeError(f"nix copy made no binary cache in {cache}")
    return public.read_text().strip(), {**dict(zip(packages, outputs)), "nix": nix_path}


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
    nix_store_path = store_paths.pop("nix")
    server = FileServer(root / "cache").start()
    try:
        yield BinaryCache(url=server.url, public_key=public_key, root=root / "cache", store_paths=store_paths,
                          server=server, nix_store_path=nix_store_path)
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# A function instance as Cloud Functions runs it


def make_function_source(root: Path) -> Path:
    """A root-owned, read-only copy of what is deployed (main.py, builder/, nix/) under `root`.

    `root` must be outside /tmp (each instance gets a /tmp of its own) and readable by nobody.
    Returns the source folder; `root/packages` holds the installed requirements,
    `root/secrets` takes files the function reads, `root/empty-path` is its PATH.
    """
    require_tools("unshare", "mount", "setpriv")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise RuntimeError(f"{SYSTEM_PYTHON} is needed: the function runs as nobody, who cannot reach the venv's")
    version = run([SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]).stdout.strip()
    if version != "%d.%d" % sys.version_info[:2]:
        raise RuntimeError(f"{SYSTEM_PYTHON} is Python {version}, the venv's packages are for {sys.version}")
    root.chmod(0o755)
    source = root / "source"
    source.mkdir()
    shutil.copy2(REPO / "main.py", source / "main.py")
    shutil.copy2(REPO / "requirements.txt", source / "requirements.txt")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "builder", source / "builder", ignore=ignore)
    shutil.copytree(REPO / "nix", source / "nix", ignore=ignore)
    shutil.copytree(sysconfig.get_paths()["purelib"], root / "packages", ignore=ignore)
    _read_only(root / "packages")
    (root / "empty-path").mkdir()
    (root / "secrets").mkdir()
    _read_only(source)
    _read_only(root / "empty-path")
    return source


def function_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="nixery-function-", dir="/var/tmp"))


def terraform_environment() -> dict[str, str]:
    """The function's environment as terraform/function.tf writes it, with the variables' defaults."""
    merged: dict = {}
    for path in sorted((REPO / "terraform").glob("*.tf")):
        with path.open() as f:
            for kind, blocks in hcl2.load(f).items():
                merged.setdefault(kind, []).extend(blocks)
    defaults = {name: body.get("default") for block in merged["variable"] for name, body in block.items()}
    base = next(block["base_environment"] for block in merged["locals"] if "base_environment" in block)
    env = {}
    for name, value in base.items():
        match = re.fullmatch(r"\$\{(?:tostring\()?var\.(\w+)\)?\}", str(value))
        if match:
            value = defaults[match.group(1)]
        env[name] = str(value)
    # local.server_environment, evaluated as terraform does (tests/test_terraform.py pins its text).
    workers = max(1, math.floor(float(defaults["cpu"])))
    env.update(WORKERS=str(workers), THREADS=str(math.ceil(int(defaults["concurrency"]) / workers)))
    return env


def _read_only(root: Path) -> None:
    for directory, dirs, files in os.walk(root):
        os.chmod(directory, 0o555)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)


class CloudFunction(RegistryProcess):
    """One function instance: nobody, read-only source, a private tmpfs at /tmp.

    `source_root` is a folder made by `make_function_source`; `env` the function's
    configuration (see `terraform_environment`).
    """

    kind = "function"

    def __init__(self, state_dir: Path, source_root: Path, env: dict[str, str]):
        super().__init__(state_dir)
        self.source_root = source_root
        self.env = {
            "PATH": str(source_root / "empty-path"),  # no Nix anywhere but the bootstrapped one
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(source_root / "packages"),
            "PYTHONUNBUFFERED": "1",
            # What Cloud Functions sets for a function.
            "PORT": str(self.port),
            "K_SERVICE": "registry",
            "K_REVISION": "registry-00001",
            "FUNCTION_TARGET": "registry",
            "FUNCTION_SIGNATURE_TYPE": "http",
            **env,
        }

    def start(self, timeout: float = 60) -> "CloudFunction":
        # PATH is empty in there: the tools are named by their full paths.
        inner = " ".join([
            f"{shutil.which('mount')} -t tmpfs -o size={TMPFS_SIZE},mode=1777 tmpfs /tmp &&",
            f"exec {shutil.which('setpriv')} --reuid={NOBODY} --regid={NOBODY} --clear-groups --",
            f"{SYSTEM_PYTHON} -m functions_framework --target=registry --source=main.py",
            f"--host=127.0.0.1 --port={self.port}",
        ])
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [shutil.which("unshare"), "--mount", "--propagation", "private", "/bin/sh", "-c", inner],
            cwd=self.source_root / "source", env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()  # the function holds its own copy
        return self._wait_ready(timeout)

    def tmp(self) -> Path:
        """The instance's /tmp, seen from outside its mount namespace."""
        return Path(f"/proc/{self.process.pid}/root/tmp")

    def tmp_used_bytes(self) -> int:
        stat = os.statvfs(self.tmp())
        return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


