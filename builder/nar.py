"""Unpack a Nix archive (NAR) from a stream, refusing anything that would leave the target.

A NAR (what `nix-store --dump` writes, how binary caches ship a store path) names one entry per
directory level; names are checked and must ascend strictly, files are created O_EXCL|O_NOFOLLOW,
and contents stream to disk in chunks. Why this keeps writes inside the target: docs/design.md.
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO

MAGIC = b"nix-archive-1"
CHUNK = 1 << 20
MAX_TOKEN = 4096  # names, link targets and keywords; file contents are streamed instead
MAX_DEPTH = 256


class NarError(Exception):
    """The stream is not a well-formed NAR, or it would write outside the target."""


class _Reader:
    def __init__(self, stream: BinaryIO):
        self.stream = stream

    def exact(self, n: int) -> bytes:
        parts = []
        while n > 0:
            chunk = self.stream.read(min(n, CHUNK))
            if not chunk:
                raise NarError("the NAR ends early")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def length(self) -> int:
        return struct.unpack("<Q", self.exact(8))[0]

    def padding(self, n: int) -> None:
        if n % 8 and self.exact(8 - n % 8).strip(b"\0"):
            raise NarError("the NAR has non-zero padding")

    def token(self, limit: int = MAX_TOKEN) -> bytes:
        n = self.length()
        if n > limit:
            raise NarError(f"the NAR has a string of {n} bytes where at most {limit} are allowed")
        data = self.exact(n)
        self.padding(n)
        return data

    def expect(self, *words: bytes) -> None:
        for word in words:
            got = self.token()
            if got != word:
                raise NarError(f"the NAR has {got[:40]!r} where {word.decode()!r} belongs")

    def contents_into(self, fd: int) -> int:
        n = remaining = self.length()
        while remaining:
            chunk = self.stream.read(min(remaining, CHUNK))
            if not chunk:
                raise NarError("the NAR ends inside a file")
            _write_all(fd, chunk)
            remaining -= len(chunk)
        self.padding(n)
        return n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def unpack(stream: BinaryIO, target: str) -> str:
    """Unpack the NAR read from `stream` at `target`, which must not exist yet.

    Returns the kind of the root ("regular", "symlink" or "directory"). Reads
    exactly the NAR: whatever follows it in `stream` is left unread. On error
    the partial tree stays for the caller to remove (it unpacks into a scratch
    place it deletes).
    """
    reader = _Reader(stream)
    if reader.token() != MAGIC:
        raise NarError("not a NAR (no nix-archive-1 magic)")
    return _node(reader, os.fsencode(target), 0)


def _node(reader: _Reader, path: bytes, depth: int) -> str:
    if depth > MAX_DEPTH:
        raise NarError(f"the NAR nests deeper than {MAX_DEPTH} directories")
    reader.expect(b"(", b"type")
    kind = reader.token()
    if kind == b"regular":
        token = reader.token()
        executable = token == b"executable"
        if executable:
            reader.expect(b"")
            token = reader.token()
        if token != b"contents":
            raise NarError(f"the NAR has {token[:40]!r} where 'contents' belongs")
        # O_EXCL and O_NOFOLLOW: never through or over anything that exists.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            reader.contents_into(fd)
        finally:
            os.close(fd)
        os.chmod(path, 0o555 if executable else 0o444, follow_symlinks=False)
        reader.expect(b")")
    elif kind == b"symlink":
        reader.expect(b"target")
        link = reader.token()
        if not link or b"\0" in link:
            raise NarError(f"the NAR has an invalid symbolic link target {link[:40]!r}")
        os.symlink(link, path)
        reader.expect(b")")
    elif kind == b"directory":
        os.mkdir(path, 0o755)
        previous = None
        while True:
            token = reader.token()
            if token == b")":
                break
            if token != b"entry":
                raise NarError(f"the NAR has {token[:40]!r} where 'entry' belongs")
            reader.expect(b"(", b"name")
            name = reader.token(255)
            _check_name(name)
            if previous is not None and name <= previous:
                # A repeated name could write through a link made by its first occurrence.
                raise NarError(f"the NAR's directory entries are not in strictly ascending order at {name!r} "
                               "(a repeated name would write over or through an earlier entry)")
            previous = name
            reader.expect(b"node")
            _node(reader, os.path.join(path, name), depth + 1)
            reader.expect(b")")
    else:
        raise NarError(f"the NAR has an unknown node type {kind[:40]!r}")
    return kind.decode()


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise NarError(f"the NAR has an entry named {name!r}, which would escape its directory")
