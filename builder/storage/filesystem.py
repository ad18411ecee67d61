"""Blobs in a local folder: the embedded default, needing no server.

Layout: `<root>/blobs/sha256/<hex>`. Uploads go to `<root>/tmp/` and reach
their final name by an atomic rename, so a reader never sees a partial blob,
and a crash leaves only a temporary file behind.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ..errors import ServerError
from . import BlobStat, LocalFile

_CHUNK = 1 << 20


def _md5_of_file(path: Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
    return md5.hexdigest()


class FilesystemUpload:
    def __init__(self, storage: "FilesystemStorage"):
        self._storage = storage
        fd, name = tempfile.mkstemp(dir=storage.tmp_dir, prefix="upload-")
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=_CHUNK)
        self._done = False

    def write(self, data: bytes) -> int:
        return self._file.write(data)

    def commit(self, digest: str, md5_hex: str, size: int, media_type: str) -> bool:
        self._file.close()
        self._done = True
        final = self._storage.blob_path(digest)
        written = self._path.stat().st_size
        if written != size:
            self._path.unlink(missing_ok=True)
            raise ServerError(f"upload of {digest} wrote {written} bytes, expected {size}")
        # The upload check: an object already there with the same MD5 is kept as it is.
        if final.exists() and final.stat().st_size == size and _md5_of_file(final) == md5_hex:
            self._path.unlink(missing_ok=True)
            return False
        os.replace(self._path, final)
        return True

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._file.close()
            self._path.unlink(missing_ok=True)

    def __enter__(self) -> "FilesystemUpload":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class FilesystemStorage:
    def __init__(self, root: str):
        self.root = Path(root).resolve()
        self.tmp_dir = self.root / "tmp"
        self._blobs = self.root / "blobs" / "sha256"

    def check(self) -> None:
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self._blobs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ServerError(f"storage folder {self.root} is not writable: {e.strerror}") from None
        if not os.access(self._blobs, os.W_OK) or not os.access(self.tmp_dir, os.W_OK):
            raise ServerError(f"storage folder {self.root} is not writable")

    def blob_path(self, digest: str) -> Path:
        algorithm, _, encoded = digest.partition(":")
        if algorithm != "sha256" or len(encoded) != 64 or not all(c in "0123456789abcdef" for c in encoded):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self._blobs / encoded

    def upload(self) -> FilesystemUpload:
        return FilesystemUpload(self)

    def put_bytes(self, digest: str, data: bytes, media_type: str) -> None:
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise ServerError(f"refusing to store bytes under a digest they do not have: {digest}")
        if self.blob_path(digest).exists():
            return
        with self.upload() as upload:
            upload.write(data)
            upload.commit(digest, hashlib.md5(data).hexdigest(), len(data), media_type)

    def read_bytes(self, digest: str) -> bytes | None:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def stat(self, digest: str) -> BlobStat | None:
        try:
            return BlobStat(size=self.blob_path(digest).stat().st_size)
        except FileNotFoundError:
            return None

    def locate(self, digest: str) -> LocalFile | None:
        path = self.blob_path(digest)
        try:
            return LocalFile(path=str(path), size=path.stat().st_size)
        except FileNotFoundError:
            return None
