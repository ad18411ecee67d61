"""Deterministic tar layers, written and hashed in one streaming pass.

Same store paths, same bytes (sorted members, fixed mtime and owner, no timestamp), at any number of
compression threads (gzip in independent 1 MiB blocks as pigz writes it, zstd multi-threaded), since
a layer's digest is its identity. diff_id, sha256, MD5 and size are computed on the way to `out`
through 1 MiB blocks: a layer is never held in memory. Why: docs/design.md, "Packing".
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

from isal import igzip_threaded

from .nix import store_path_on_disk

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_CHUNK = 1 << 20  # the block every stage works in: file reads, gzip blocks, output batches
_MTIME = 1  # not 0: some tools treat a zero mtime as "unset"
_GZIP_LEVEL = 1  # isal's levels run 0-3; level 1 is several times faster than zlib's fastest
_ZSTD_LEVEL = 3  # zstd's default: faster than gzip -1 here, and smaller (bench/RESULTS.md)

COMPRESSIONS = ("gzip", "zstd", "none")
COMPRESSION_BLOCK = _CHUNK  # the unit compression threads share out: more threads than blocks is waste
# The byte format each compression produces, part of every layer key: bump it when the bytes change,
# so a layer cached under the old format is never taken for the new one.
FORMATS = {"gzip": "gzip-blocks-v1", "zstd": "zstd-mt-v2", "none": "none"}
# The layer format manifests name (manifest.py's media types), by compression.
MEDIA_SUFFIX = {"gzip": "tar+gzip", "zstd": "tar+zstd", "none": "tar"}
# What one packer holds at most, besides what `out` buffers: the tar block being filled, and per
# compression thread a block queued in, one being compressed with its output buffer, one queued out.
PACKER_BYTES = _CHUNK + 4 * _CHUNK


@dataclass(frozen=True)
class PackedBlob:
    digest: str  # "sha256:<hex>" of the bytes written (compressed)
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int  # bytes written
    md5: str  # hex md5 of the bytes written


@dataclass(frozen=True)
class Entry:
    """A synthetic tar member, for the customisation layer."""

    name: str  # path inside the image, no leading slash, e.g. "bin/hello"
    kind: str  # "dir" | "symlink" | "file"
    target: str = ""  # symlink target
    mode: int = 0o755
    data: bytes = b""
    uid: int = 0  # owner; a home directory belongs to its user
    gid: int = 0


class _Sink:
    """Hashes and counts what reaches `out`, the bytes clients will download."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        if not data:
            return 0
        self.sha256.update(data)
        self.md5.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        pass  # the compressor's writer calls it at the end; `out` needs no flush


def _compressor(compression: str, sink: _Sink, threads: int):
    """(writer to close at the end, its write function) compressing into `sink`; None for no compression."""
    if compression == "gzip":
        # The threaded writer's raw side is fed exact 1 MiB blocks, bypassing its buffer: the block
        # boundaries, and so the bytes, depend on nothing but the tar.
        writer = igzip_threaded.open(sink, "wb", compresslevel=_GZIP_LEVEL, threads=max(1, threads),
                                     block_size=_CHUNK)
        return writer, writer.raw.write
    if compression == "zstd":
        import zstandard  # only for images that ask for zstd

        # threads >= 1 is zstd's multi-threaded mode: the same frames for any number of workers.
        # Jobs of one block keep memory low (zstd's default jobs of 8 MiB held ~120 MB at two threads).
        parameters = zstandard.ZstdCompressionParameters.from_level(
            _ZSTD_LEVEL, threads=max(1, threads), job_size=_CHUNK, write_content_size=False)
        encoder = zstandard.ZstdCompressor(compression_params=parameters)
        writer = encoder.stream_writer(sink, closefd=False, write_size=_CHUNK)
        return writer, writer.write
    if compression == "none":
        return None
    raise ValueError(f"unknown compression {compression!r}")


class _TarStream:
    """Takes the uncompressed tar, hashes it (diff_id), compresses it into the sink.

    Everything goes through one 1 MiB block, filled by small writes (headers,
    padding) and by file reads straight into it; each full block is hashed
    and handed to the compressor, which keeps its own copy.
    """

    def __init__(self, out: BinaryIO, compression: str, threads: int = 1):
        self.sink = _Sink(out)
        self.compression = compression
        compressor = _compressor(compression, self.sink, threads)
        self.compressor, self.compress = compressor or (None, None)
        self.diff = hashlib.sha256() if self.compressor is not None else None  # uncompressed: diff_id = digest
        self.block = bytearray(_CHUNK)
        self.view = memoryview(self.block)
        self.fill = 0
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.offset += len(view)
        while view:
            n = min(len(view), _CHUNK - self.fill)
            self.view[self.fill:self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == _CHUNK:
                self._emit()

    def copy_file(self, fd: int, size: int, disk: str) -> None:
        """`size` bytes of an open file, read straight into the block."""
        left = size
        while left:
            n = os.readv(fd, [self.view[self.fill:self.fill + min(left, _CHUNK - self.fill)]])
            if n == 0:
                raise OSError(f"{disk} shrank while being packed")
            self.fill += n
            self.offset += n
            left -= n
            if self.fill == _CHUNK:
                self._emit()

    def _emit(self) -> None:
        if not self.fill:
            return
        data = bytes(self.view[:self.fill])  # the one copy: the compressor and `out` may keep it
        self.fill = 0
        if self.compressor is None:
            self.sink.write(data)
            return
        self.diff.update(data)  # type: ignore[union-attr]
        self.compress(data)  # type: ignore[misc]

    def header(self, info: tarfile.TarInfo) -> None:
        info.mtime = _MTIME
        info.uname = info.gname = ""
        self.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def pad(self, size: int) -> None:
        remainder = size % _BLOCK
        if remainder:
            self.write(bytes(_BLOCK - remainder))

    def finish(self) -> PackedBlob:
        # End of archive: two zero blocks, then zeros up to a whole record, as tar(1) writes it.
        end = self.offset + 2 * _BLOCK
        self.write(bytes(2 * _BLOCK + (-end) % _RECORD))
        self._emit()
        if self.compressor is not None:
            compressor, self.compressor = self.compressor, None
            compressor.close()  # waits for the threads; raises what they (or `out`) raised
            diff_id = self.diff.hexdigest()  # type: ignore[union-attr]
        else:
            diff_id = self.sink.sha256.hexdigest()
        return PackedBlob(
            digest="sha256:" + self.sink.sha256.hexdigest(),
            diff_id="sha256:" + diff_id,
            size=self.sink.size,
            md5=self.sink.md5.hexdigest(),
        )

    def abort(self) -> None:
        """Stop the compressor's threads after a failure (the output is thrown away)."""
        if self.compressor is not None:
            compressor, self.compressor = self.compressor, None
            try:
                compressor.close()
            except Exception:
                pass


def _info(name: str, kind: bytes, mode: int, size: int = 0, target: str = "", uid: int = 0,
          gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = target
    info.uid, info.gid = uid, gid
    return info


def _walk(disk: str, name: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(disk path, member name, lstat) of a tree, parents first, children sorted by name."""
    st = os.lstat(disk)
    yield disk, name, st
    if stat.S_ISDIR(st.st_mode):
        for child in sorted(os.listdir(disk)):
            yield from _walk(os.path.join(disk, child), f"{name}/{child}")


def pack_store_paths(paths: Sequence[str], out: BinaryIO, compression: str, store_root: str = "/",
                     threads: int = 1) -> PackedBlob:
    """Tar the given store paths (logical /nix/store names) as nix/store/... members.

    `threads` compression threads; the bytes are the same for any number.
    """
    for path in paths:
        if not path.startswith("/nix/store/") or "/" in path[len("/nix/store/"):]:
            raise ValueError(f"not a store path: {path!r}")
    stream = _TarStream(out, compression, threads)
    try:
        return _pack_store_paths(stream, paths, store_root)
    except BaseException:
        stream.abort()
        raise


def _pack_store_paths(stream: _TarStream, paths: Sequence[str], store_root: str) -> PackedBlob:
    stream.header(_info("nix", tarfile.DIRTYPE, 0o755))
    stream.header(_info("nix/store", tarfile.DIRTYPE, 0o755))
    for path in sorted(set(paths)):
        for disk, name, st in _walk(store_path_on_disk(path, store_root), path.lstrip("/")):
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                stream.header(_info(name, tarfile.REGTYPE, mode, st.st_size))
                fd = os.open(disk, os.O_RDONLY)
                try:
                    stream.copy_file(fd, st.st_size, disk)
                finally:
                    os.close(fd)
                stream.pad(st.st_size)
            elif stat.S_ISDIR(st.st_mode):
                stream.header(_info(name, tarfile.DIRTYPE, mode))
            elif stat.S_ISLNK(st.st_mode):
                stream.header(_info(name, tarfile.SYMTYPE, mode, target=os.readlink(disk)))
            else:  # Nix stores hold nothing else
                raise ValueError(f"unsupported file type in the store: {disk}")
    return stream.finish()


def pack_entries(entries: Sequence[Entry], out: BinaryIO, compression: str, threads: int = 1) -> PackedBlob:
    """Tar synthetic entries, sorted by name; missing parent directories are added (0755)."""
    by_name: dict[str, Entry] = {}
    for entry in entries:
        name = entry.name.strip("/")
        if not name or name in by_name:
            raise ValueError(f"empty or duplicate entry name: {entry.name!r}")
        if entry.kind not in ("dir", "symlink", "file"):
            raise ValueError(f"unknown entry kind: {entry.kind!r}")
        by_name[name] = entry
    for name in list(by_name):
        parent = os.path.dirname(name)
        while parent and parent not in by_name:
            by_name[parent] = Entry(parent, "dir")
            parent = os.path.dirname(parent)
    stream = _TarStream(out, compression, threads)
    try:
        for name in sorted(by_name):
            entry = by_name[name]
            owner = {"uid": entry.uid, "gid": entry.gid}
            if entry.kind == "dir":
                stream.header(_info(name, tarfile.DIRTYPE, entry.mode, **owner))
            elif entry.kind == "symlink":
                stream.header(_info(name, tarfile.SYMTYPE, entry.mode, target=entry.target, **owner))
            else:
                stream.header(_info(name, tarfile.REGTYPE, entry.mode, len(entry.data), **owner))
                stream.write(entry.data)
                stream.pad(len(entry.data))
        return stream.finish()
    except BaseException:
        stream.abort()
        raise


def customisation_entries(package_paths: Sequence[str], store_root: str = "/",
                          own: Sequence[Entry] = ()) -> list[Entry]:
    """The top layer: each package's tree linked into "/", plus /tmp, /usr/bin/env and `own`.

    Directories are real, so packages merge (bin/ holds every package's
    programs); files and symlinks become absolute symlinks into the store. On
    a conflict the first package in the given order wins. The image's `own`
    entries (its users and groups) win over every package; their parent
    directories are made real.
    """
    entries: dict[str, Entry] = {"tmp": Entry("tmp", "dir", mode=0o1777)}
    for entry in own:
        parent = os.path.dirname(entry.name)
        while parent:
            entries.setdefault(parent, Entry(parent, "dir"))
            parent = os.path.dirname(parent)
        entries[entry.name] = entry
    env_target = ""
    for package in package_paths:
        disk_root = store_path_on_disk(package, store_root)
        if not os.path.isdir(disk_root) or os.path.islink(disk_root):
            continue  # a single-file package has nothing to link in
        if not env_target and os.path.lexists(os.path.join(disk_root, "bin", "env")):
            env_target = f"{package}/bin/env"
        _link_tree(entries, disk_root, package, "")
    if env_target:
        usr, usr_bin = entries.get("usr"), entries.get("usr/bin")
        if (usr is None or usr.kind == "dir") and (usr_bin is None or usr_bin.kind == "dir"):
            entries.setdefault("usr", Entry("usr", "dir"))
            entries.setdefault("usr/bin", Entry("usr/bin", "dir"))
            entries["usr/bin/env"] = Entry("usr/bin/env", "symlink", target=env_target, mode=0o777)
    return [entries[name] for name in sorted(entries)]


def _link_tree(entries: dict[str, Entry], disk_dir: str, package: str, prefix: str) -> None:
    for child in sorted(os.listdir(disk_dir)):
        name = prefix + child
        disk = os.path.join(disk_dir, child)
        existing = entries.get(name)
        if os.path.isdir(disk) and not os.path.islink(disk):
            if existing is None:
                entries[name] = Entry(name, "dir")
            elif existing.kind != "dir":
                continue  # an earlier package put a link here; it wins
            _link_tree(entries, disk, package, name + "/")
        elif existing is None:
            entries[name] = Entry(name, "symlink", target=f"{package}/{name}", mode=0o777)
