"""Nix for an instance that has none (Cloud Functions): fetched, verified and unpacked under /tmp.

At the first build that needs Nix, the pinned artefact (NIX_BOOTSTRAP_URL: a static `nix`, or
a tarball holding `bin/nix`) is downloaded into WORK_DIR and its SHA-256 checked against
NIX_BOOTSTRAP_SHA256 before it is unpacked or run; wrappers in `<root>/bin` keep Nix's home,
configuration and caches under WORK_DIR. Why static, and why wrappers: docs/design.md.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable

from .config import Config
from .errors import ServerError

# Names Nix answers to; each gets a wrapper (a static Nix is one multi-call binary).
NIX_COMMANDS = (
    "nix", "nix-build", "nix-instantiate", "nix-store", "nix-env", "nix-hash",
    "nix-prefetch-url", "nix-collect-garbage", "nix-channel", "nix-shell", "nix-copy-closure",
)

DOWNLOAD_TIMEOUT = 60  # seconds without progress before the download is given up
CHUNK = 1 << 20
# /tmp is memory on the function: a wrong URL must not fill it.
MAX_ARTEFACT_BYTES = 512 << 20
VERSION_TIMEOUT = 30

_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def ensure_nix(config: Config, log: Callable[..., None]) -> str | None:
    """The directory holding nix-build & co., or None to use PATH.

    Without NIX_BOOTSTRAP_URL the machine's Nix is used (NIX_BIN_DIR or PATH).
    Otherwise the artefact is fetched once per instance: a second call, or a
    second process sharing WORK_DIR, reuses the unpacked Nix.
    """
    if not config.nix_bootstrap_url:
        return config.nix_bin_dir
    url = config.nix_bootstrap_url
    expected = _expected_sha256(config.nix_bootstrap_sha256)
    base = Path(config.work_dir) / "nix-bootstrap"
    root = base / expected[:32]
    bin_dir = root / "bin"
    ready = root / "ready"
    if ready.exists():
        return str(bin_dir)
    base.mkdir(parents=True, exist_ok=True)
    # Workers of one instance share /tmp: one downloads, the others wait for it.
    with open(base / f".{expected[:32]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return str(bin_dir)
        try:
            return _bootstrap(config, url, expected, root, log)
        except ServerError as e:
            log("nix-bootstrap", e.message, severity="ERROR", result="failed", url=url, sha256=expected)
            raise


def _expected_sha256(value: str | None) -> str:
    text = (value or "").strip().lower()
    if not _HEX_SHA256.match(text):
        raise ServerError("configuration: NIX_BOOTSTRAP_SHA256 must be 64 hexadecimal digits")
    return text


def _bootstrap(config: Config, url: str, expected: str, root: Path, log: Callable[..., None]) -> str:
    started = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)  # leftovers of an attempt that died half-way
    root.mkdir(parents=True)
    artefact = root / "artefact"
    size = download(url, artefact, expected)
    downloaded = time.monotonic()

    unpacked = root / "unpacked"
    nix_binary = unpack(artefact, unpacked)
    artefact.unlink()  # /tmp is memory: the archive is not needed once unpacked
    commands = root / "commands"
    commands.mkdir()
    for name in NIX_COMMANDS:
        # Called by these names, a multi-call Nix knows which command it is.
        sibling = nix_binary.parent / name
        (commands / name).symlink_to(sibling if os.path.lexists(sibling) else nix_binary)

    home = Path(config.work_dir) / "nix-home"
    bin_dir = root / "bin"
    write_wrappers(bin_dir, commands, home)
    unpacked_at = time.monotonic()

    version = nix_version(bin_dir)
    (root / "ready").write_text(version + "\n")
    log(
        "nix-bootstrap", f"{version} bootstrapped from {url}",
        result="ready", version=version, url=url, sha256=expected,
        duration=round(time.monotonic() - started, 3),
        download_seconds=round(downloaded - started, 3),
        unpack_seconds=round(unpacked_at - downloaded, 3),
        artefact_bytes=size, unpacked_bytes=tree_size(unpacked),
    )
    return str(bin_dir)


def download(url: str, target: Path, expected_sha256: str) -> int:
    """Stream `url` into `target` and check its SHA-256; the file is removed when it does not match."""
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(target, "wb") as out:
            while chunk := response.read(CHUNK):
                size += len(chunk)
                if size > MAX_ARTEFACT_BYTES:
                    raise ServerError(f"Nix artefact {url} is larger than {MAX_ARTEFACT_BYTES >> 20} MiB: refused")
                digest.update(chunk)
                out.write(chunk)
    except ServerError:
        target.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        target.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise ServerError(f"cannot download the Nix artefact {url}: {reason}") from None
    actual = digest.hexdigest()
    if actual != expected_sha256:
        target.unlink(missing_ok=True)
        raise ServerError(
            f"Nix artefact {url} refused: its sha256 is {actual}, expected {expected_sha256} (NIX_BOOTSTRAP_SHA256)"
        )
    return size


def unpack(artefact: Path, target: Path) -> Path:
    """Unpack a verified artefact into `target`; returns the path of its `nix` executable."""
    target.mkdir()
    with open(artefact, "rb") as f:
        magic = f.read(4)
    if magic == b"\x7fELF":
        binary = target / "bin" / "nix"
        binary.parent.mkdir()
        shutil.copyfile(artefact, binary)
        binary.chmod(0o555)
        return binary
    try:
        with tarfile.open(artefact, "r:*") as tar:
            members = tar.getmembers()
            check_members(members)
            if hasattr(tarfile, "tar_filter"):
                tar.extractall(target, filter="tar")
            else:  # Python without extraction filters: the members were checked above
                tar.extractall(target)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ServerError(f"cannot unpack the Nix artefact: {e}") from None
    return find_nix(target)


def check_members(members: list[tarfile.TarInfo]) -> None:
    """Refuse archives that would write outside the target or create devices.

    The checksum already vouches for the artefact; this keeps a wrongly pinned
    one from doing harm. Symbolic links may point anywhere (a Nix store holds
    absolute ones), but nothing may be extracted through one.
    """
    links: set[str] = set()
    for member in members:
        name = _relative(member.name)
        if name is None:
            raise ServerError(f"Nix artefact refused: unsafe member name {member.name!r}")
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise ServerError(f"Nix artefact refused: {member.name!r} is not a file, directory or link")
        if member.islnk() and _relative(member.linkname) is None:
            raise ServerError(f"Nix artefact refused: hard link {member.name!r} leaves the archive")
        parts = PurePosixPath(name).parts
        if any(str(PurePosixPath(*parts[:i])) in links for i in range(1, len(parts))):
            raise ServerError(f"Nix artefact refused: {member.name!r} lies beneath a symbolic link")
        if member.issym():
            links.add(name)


def _relative(name: str) -> str | None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return str(path)


def find_nix(tree: Path) -> Path:
    """The `nix` executable of an unpacked artefact: the shallowest `bin/nix`."""
    found = sorted(
        (p for p in tree.rglob("nix") if p.parent.name == "bin" and os.access(p, os.X_OK) and not p.is_dir()),
        key=lambda p: (len(p.relative_to(tree).parts), str(p)),
    )
    if not found:
        raise ServerError("the Nix artefact holds no bin/nix executable")
    return found[0]


def write_wrappers(bin_dir: Path, commands: Path, home: Path) -> None:
    """One small script per command: Nix's home, caches and configuration under WORK_DIR."""
    bin_dir.mkdir()
    dirs = {
        "HOME": home,
        "XDG_CACHE_HOME": home / ".cache",
        "XDG_CONFIG_HOME": home / ".config",
        "XDG_DATA_HOME": home / ".local" / "share",
        "XDG_STATE_HOME": home / ".local" / "state",
        # An empty configuration directory: every setting comes on the command line.
        "NIX_CONF_DIR": home / "etc-nix",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    exports = "".join(f"{name}={shlex.quote(str(path))}; export {name}\n" for name, path in dirs.items())
    for name in NIX_COMMANDS:
        wrapper = bin_dir / name
        wrapper.write_text(f"#!/bin/sh\n{exports}exec {shlex.quote(str(commands / name))} \"$@\"\n")
        wrapper.chmod(0o555)


def nix_version(bin_dir: Path) -> str:
    """Run the unpacked Nix once: a Nix that cannot start fails here, not in a build."""
    try:
        result = subprocess.run(
            [str(bin_dir / "nix"), "--version"], stdin=subprocess.DEVNULL, capture_output=True,
            timeout=VERSION_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServerError(f"the bootstrapped Nix does not run: {e}") from None
    output = result.stdout.decode("utf-8", "replace").strip()
    if result.returncode != 0 or not output:
        error = result.stderr.decode("utf-8", "replace").replace("\x00", "").strip()[-500:]
        raise ServerError(f"the bootstrapped Nix does not run (exit {result.returncode}): {error}")
    return output.splitlines()[0]


def tree_size(path: Path) -> int:
    """Bytes of the regular files under `path` (links not followed)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total
