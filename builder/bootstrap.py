"""Nix for an instance that has none (Cloud Functions): fetched, verified and unpacked under /tmp.

At the first build that needs Nix, a static Nix is fetched into WORK_DIR and verified before it
runs: by store path from the trusted binary cache (NIX_BOOTSTRAP_STORE_PATH: signed narinfo, NAR
size and hash), or from a mirror (NIX_BOOTSTRAP_URL + NIX_BOOTSTRAP_SHA256), which wins when set.
Wrappers in `<root>/bin` keep Nix's home and caches under WORK_DIR. Why: docs/design.md.
"""
from __future__ import annotations

import bz2
import fcntl
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable

import zstandard

from . import nar, narinfo, nix
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

    NIX_BOOTSTRAP_URL (an operator's mirror) wins over NIX_BOOTSTRAP_STORE_PATH
    (a static Nix fetched from the binary cache); with neither, the machine's
    Nix is used (NIX_BIN_DIR or PATH). A Nix is fetched once per instance: a
    second call, or a second process sharing WORK_DIR, reuses the unpacked one.
    A failed attempt leaves nothing it would trust, so the next call tries again.
    """
    if config.nix_bootstrap_url:
        url = config.nix_bootstrap_url
        expected = _expected_sha256(config.nix_bootstrap_sha256)
        key, fields = expected[:32], {"url": url, "sha256": expected}

        def fetch(root: Path) -> str:
            return _bootstrap(config, url, expected, root, log)
    elif config.nix_bootstrap_store_path:
        store_path = config.nix_bootstrap_store_path
        try:
            key = narinfo.hash_part(store_path)
        except ValueError as e:
            raise ServerError(f"configuration: NIX_BOOTSTRAP_STORE_PATH: {e}") from None
        fields = {"store_path": store_path}

        def fetch(root: Path) -> str:
            return _bootstrap_from_cache(config, store_path, root, log)
    else:
        return config.nix_bin_dir
    base = Path(config.work_dir) / "nix-bootstrap"
    root = base / key
    bin_dir = root / "bin"
    ready = root / "ready"
    if ready.exists():
        return str(bin_dir)
    base.mkdir(parents=True, exist_ok=True)
    # Workers of one instance share /tmp: one downloads, the others wait for it.
    with open(base / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return str(bin_dir)
        try:
            return fetch(root)
        except ServerError as e:
            # Nothing half-made is trusted: `ready` is written last, and the next attempt starts afresh.
            shutil.rmtree(root, ignore_errors=True)
            log("nix-bootstrap", e.message, severity="ERROR", result="failed", **fields)
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
    bin_dir, version = _install(config, root, nix_binary)
    log(
        "nix-bootstrap", f"{version} bootstrapped from {url}",
        result="ready", version=version, url=url, sha256=expected,
        duration=round(time.monotonic() - started, 3),
        download_seconds=round(downloaded - started, 3),
        unpack_seconds=round(time.monotonic() - downloaded, 3),
        artefact_bytes=size, unpacked_bytes=nix.tree_bytes(str(unpacked)),
    )
    return str(bin_dir)


def _install(config: Config, root: Path, nix_binary: Path) -> tuple[Path, str]:
    """Wrappers for an unpacked Nix, run once; `ready` marks the root usable. Returns (bin dir, version)."""
    commands = root / "commands"
    commands.mkdir()
    for name in NIX_COMMANDS:
        # Called by these names, a multi-call Nix knows which command it is.
        sibling = nix_binary.parent / name
        (commands / name).symlink_to(sibling if os.path.lexists(sibling) else nix_binary)

    home = Path(config.work_dir) / "nix-home"
    bin_dir = root / "bin"
    write_wrappers(bin_dir, commands, home)
    version = nix_version(bin_dir)
    (root / "ready").write_text(version + "\n")
    return bin_dir, version


# --- from the binary cache ---------------------------------------------------------


def _bootstrap_from_cache(config: Config, store_path: str, root: Path, log: Callable[..., None]) -> str:
    """Fetch `store_path` from the substituters, verified by the trusted keys, and install its Nix."""
    started = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)  # leftovers of an attempt that died half-way
    root.mkdir(parents=True)
    info, cache_url, signer = fetch_narinfo(store_path, config.nix_substituters, config.nix_trusted_public_keys)
    nar_url = urllib.parse.urljoin(cache_url.rstrip("/") + "/", info.url)
    partial = root / "partial"
    partial.mkdir()
    transferred = fetch_nar(nar_url, info, partial / "out")
    downloaded = time.monotonic()
    unpacked = root / "unpacked"
    partial.rename(unpacked)  # only a verified tree gets this name
    tree = unpacked / "out"
    nix_binary = tree if tree.is_file() and not tree.is_symlink() else find_nix(tree)
    bin_dir, version = _install(config, root, nix_binary)
    log(
        "nix-bootstrap", f"{version} bootstrapped from {store_path} on {cache_url}",
        result="ready", version=version, store_path=store_path, cache=cache_url, signed_by=signer,
        duration=round(time.monotonic() - started, 3),
        download_seconds=round(downloaded - started, 3),
        artefact_bytes=transferred, unpacked_bytes=info.nar_size,
    )
    return str(bin_dir)


def fetch_narinfo(store_path: str, substituters: str, trusted_keys: str) -> tuple[narinfo.NarInfo, str, str]:
    """The first substituter's narinfo of `store_path` signed by a trusted key: (narinfo, cache URL, signer)."""
    caches = substituters.split()
    if not caches:
        raise ServerError("configuration: NIX_BOOTSTRAP_STORE_PATH needs a binary cache in NIX_SUBSTITUTERS")
    if not trusted_keys.split():
        raise ServerError("configuration: NIX_BOOTSTRAP_STORE_PATH needs NIX_TRUSTED_PUBLIC_KEYS to verify it")
    name = f"{narinfo.hash_part(store_path)}.narinfo"
    problems = []
    for cache_url in caches:
        url = f"{cache_url.rstrip('/')}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                text = response.read(narinfo.MAX_NARINFO_BYTES + 1)
        except urllib.error.HTTPError as e:
            problems.append(f"{url}: HTTP {e.code}")
            continue
        except (urllib.error.URLError, OSError, ValueError) as e:
            problems.append(f"{url}: {getattr(e, 'reason', None) or e}")
            continue
        try:
            if len(text) > narinfo.MAX_NARINFO_BYTES:
                raise narinfo.NarInfoError("the narinfo is larger than 64 KiB")
            info = narinfo.parse(text.decode("utf-8", "replace"))
            if info.store_path != store_path:
                raise narinfo.NarInfoError(f"{url} describes {info.store_path}, not {store_path}")
            signer = info.check_signature(trusted_keys)
        except narinfo.NarInfoError as e:
            raise ServerError(f"Nix bootstrap refused: {e} ({url}, NIX_TRUSTED_PUBLIC_KEYS)") from None
        others = [r for r in info.references if r != store_path.rsplit("/", 1)[1]]
        if others:
            raise ServerError(
                f"Nix bootstrap refused: {store_path} is not self-contained (it references {', '.join(others)}); "
                "NIX_BOOTSTRAP_STORE_PATH must name a static Nix"
            )
        if info.nar_size > MAX_ARTEFACT_BYTES:
            raise ServerError(f"Nix bootstrap refused: {store_path} is larger than {MAX_ARTEFACT_BYTES >> 20} MiB")
        return info, cache_url, signer
    raise ServerError(f"cannot fetch the Nix to bootstrap, {store_path}: {'; '.join(problems)}")


class _Counted:
    """A readable stream that hashes and counts what passes through, refusing more than `limit` bytes."""

    def __init__(self, stream, limit: int, what: str):
        self.stream, self.limit, self.what = stream, limit, what
        self.size = 0
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n if n is not None and n > 0 else CHUNK)
        self.size += len(data)
        if self.size > self.limit:
            raise _Refused(f"{self.what} is larger than the {self.limit} bytes the narinfo states")
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


class _Refused(Exception):
    pass


def _decompressing(stream, compression: str):
    """A reader of the uncompressed NAR, as the narinfo's Compression says."""
    if compression == "none":
        return stream
    if compression == "xz":
        return lzma.LZMAFile(stream)
    if compression == "bzip2":
        return bz2.BZ2File(stream)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    raise _Refused(f"its compression {compression!r} is not supported (xz, zstd, bzip2, none)")


def fetch_nar(url: str, info: narinfo.NarInfo, target: Path) -> int:
    """Stream the NAR at `url` into `target`, checking NarSize and NarHash (and FileSize, FileHash).

    Unpacks while downloading (no second copy in memory-backed /tmp); what was
    unpacked is only used once every check has passed: the caller unpacks into
    a scratch folder it renames afterwards and deletes on error. Returns the bytes transferred.
    """
    what = f"the NAR of {info.store_path} ({url})"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            raw = _Counted(response, info.file_size if info.file_size is not None else MAX_ARTEFACT_BYTES,
                           "the compressed NAR")
            nar_stream = _Counted(_decompressing(raw, info.compression), info.nar_size, "the NAR")
            nar.unpack(nar_stream, str(target))
            nar_stream.drain()  # trailing bytes count against NarSize and NarHash
            raw.drain()
    except _Refused as e:
        raise ServerError(f"Nix bootstrap refused: {what}: {e}") from None
    except nar.NarError as e:
        raise ServerError(f"Nix bootstrap refused: {what}: {e}") from None
    except urllib.error.HTTPError as e:
        raise ServerError(f"cannot download {what}: HTTP {e.code}") from None
    except urllib.error.URLError as e:
        raise ServerError(f"cannot download {what}: {e.reason}") from None
    except (OSError, EOFError, ValueError, lzma.LZMAError, zstandard.ZstdError) as e:
        raise ServerError(f"Nix bootstrap refused: {what}: cannot read it: {e}") from None
    if nar_stream.size != info.nar_size:
        raise ServerError(f"Nix bootstrap refused: {what}: it has {nar_stream.size} bytes, the signed NarSize is "
                          f"{info.nar_size}")
    if nar_stream.sha256.digest() != info.nar_hash:
        raise ServerError(
            f"Nix bootstrap refused: {what}: its hash is sha256:{narinfo.nix32_encode(nar_stream.sha256.digest())}, "
            f"the signed NarHash is sha256:{narinfo.nix32_encode(info.nar_hash)}"
        )
    if info.file_size is not None and raw.size != info.file_size:
        raise ServerError(f"Nix bootstrap refused: {what}: {raw.size} bytes downloaded, FileSize is {info.file_size}")
    if info.file_hash is not None and raw.sha256.digest() != info.file_hash:
        raise ServerError(f"Nix bootstrap refused: {what}: the download does not match its FileHash")
    return raw.size


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
