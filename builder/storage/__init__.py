"""Content-addressed blob storage: layers, image configs and manifests, and the layer index.

Every blob lives under its sha256 digest; `open_storage` (in `builder/config.py`) picks a backend.
Bytes stream into an `Upload` while the caller computes the digest; `commit` publishes them atomically,
or skips the write when an object with the same MD5 is there. The layer index records, per layer key,
the blob it produced, so an emptied cache repacks nothing stored (docs/design.md, "Packing").
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol, Union

from ..errors import ServerError

_HEX = re.compile(r"[0-9a-f]{64}")


def digest_hex(digest: str) -> str:
    """The 64 hex digits of a `sha256:` digest, which a blob is stored under; ValueError otherwise."""
    algorithm, _, encoded = digest.partition(":")
    if algorithm != "sha256" or not _HEX.fullmatch(encoded):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return encoded


def has_digest(data: bytes, digest: str) -> bool:
    return "sha256:" + hashlib.sha256(data).hexdigest() == digest


def check_digest_of(data: bytes, digest: str) -> None:
    """Refuse (ServerError) to store bytes under a digest they do not have."""
    if not has_digest(data, digest):
        raise ServerError(f"refusing to store bytes under a digest they do not have: {digest}")


def check_index_name(name: str) -> str:
    """A layer index object's name: the hex SHA-256 of its layer key, nothing a path could escape with."""
    if not _HEX.fullmatch(name):
        raise ValueError(f"not a layer index name: {name!r}")
    return name


@dataclass(frozen=True)
class BlobStat:
    size: int
    md5: str | None = None  # hex; None when the backend does not know it cheaply


@dataclass(frozen=True)
class LocalFile:
    """The blob is a file this process can send itself (Range is honoured)."""

    path: str
    size: int


@dataclass(frozen=True)
class Redirect:
    """The client fetches the blob elsewhere (a signed URL)."""

    url: str
    size: int | None = None


BlobLocation = Union[LocalFile, Redirect]


class Upload(Protocol):
    """A blob being written. Use as a context manager: leaving without commit aborts."""

    def write(self, data: bytes) -> int: ...

    def commit(self, digest: str, md5_hex: str, size: int, media_type: str) -> bool:
        """Publish under `digest`; returns False when an identical object was already there."""
        ...

    def abort(self) -> None: ...

    def __enter__(self) -> "Upload": ...

    def __exit__(self, *exc: object) -> None: ...


class Storage(Protocol):
    def upload(self) -> Upload: ...

    def put_bytes(self, digest: str, data: bytes, media_type: str) -> None:
        """Store a small blob (config, manifest) held in memory; idempotent."""
        ...

    def read_bytes(self, digest: str) -> bytes | None:
        """A small blob's bytes, or None when it is not stored (or its bytes do not match)."""
        ...

    def stat(self, digest: str) -> BlobStat | None:
        """Size (and MD5 where cheap) of a stored blob, or None when it is not stored or is damaged."""
        ...

    def verify(self, digest: str, size: int, md5_hex: str) -> bool:
        """Whether the stored blob is whole: there, `size` bytes, and not damaged.

        The check a recorded layer passes before it is reused (`ImageBuilder.reusable`):
        GCS compares the object's size and `md5Hash` (one metadata read); the filesystem
        hashes the file against its digest once per process and remembers the result
        for as long as the file is unchanged.
        """
        ...

    def locate(self, digest: str) -> BlobLocation | None:
        """Where a client gets the blob's bytes, or None when it is not stored (or damaged)."""
        ...

    def put_layer_index(self, name: str, data: bytes) -> None:
        """Record what a layer key produced (`name`: 64 hex); replaces an older record."""
        ...

    def read_layer_index(self, name: str) -> bytes | None:
        """The record `put_layer_index` stored under `name`, or None."""
        ...

    def check(self) -> None:
        """Raise ServerError with a clear message when the backend is unusable."""
        ...
