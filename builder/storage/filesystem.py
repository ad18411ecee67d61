"""Blobs in a local folder: the embedded default, needing no server.

Layout: `<root>/blobs/sha256/<hex>`, the layer index in `<root>/layers/<hex>`; uploads go to
`<root>/tmp/` and are renamed into place.
A file is hashed against its digest before this process first serves or reuses it (remembered
while unchanged); a damaged one is removed. Leftovers, full disk: docs/design.md, "Self-healing".
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import ServerError, StorageFull
from ..logs import event
from . import BlobStat, LocalFile, check_digest_of, check_index_name, digest_hex, has_digest

_CHUNK = 1 << 20
_UPLOAD_PREFIX = "upload-"
_REMEMBERED = 200_000  # verified files remembered per process (~150 bytes each)
_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def _disk_errors(action: str) -> Iterator[None]:
    """A full disk becomes `StorageFull` (a 507 that says so); other OSErrors pass through."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL:
            raise StorageFull(f"the registry's storage is full: no space left on its disk {action}") from e
        raise


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FilesystemUpload:
    def __init__(self, storage: "FilesystemStorage"):
        self._storage = storage
        with storage._creating(), _disk_errors("starting an upload"):
            fd, name = tempfile.mkstemp(dir=storage.tmp_dir, prefix=_UPLOAD_PREFIX)
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the file is closed: "a live upload"
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=_CHUNK)
        self._done = False
        self._published = False  # renamed to its final name: nothing left to delete

    def write(self, data: bytes) -> int:
        with _disk_errors("writing a blob"):
            return self._file.write(data)

    def commit(self, digest: str, md5_hex: str, size: int, media_type: str) -> bool:
        if self._done:
            raise ServerError("commit of a finished upload")
        try:
            with _disk_errors(f"writing {digest}"):
                self._file.flush()  # a full disk often shows only here; the file stays open (and locked)
            written = os.fstat(self._file.fileno()).st_size
            if written != size:
                raise ServerError(f"upload of {digest} wrote {written} bytes, expected {size}")
            # An intact copy already there is kept as it is; a damaged one was just removed.
            existing = self._storage._intact(digest)
            if existing is not None and existing.st_size == size:
                return False
            final = self._storage.blob_path(digest)
            with _disk_errors(f"storing {digest}"):
                os.replace(self._path, final)
            self._published = True
            # The caller hashed these bytes as it wrote them: no need to hash them again.
            self._storage._remember(digest, os.stat(final))
            return True
        finally:
            self._discard()

    def abort(self) -> None:
        if not self._done:
            self._discard()

    def _discard(self) -> None:
        """Close and delete the temporary file; closing may fail (a full disk), deleting still happens."""
        self._done = True
        try:
            self._file.close()
        except OSError:
            pass
        finally:
            if not self._published:
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
        self._verified: dict[str, tuple[int, ...]] = {}
        self._verified_lock = threading.Lock()
        self._index = self.root / "layers"

    def check(self) -> None:
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self._blobs.mkdir(parents=True, exist_ok=True)
            self._index.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ServerError(f"storage folder {self.root} is not writable: {e.strerror}") from None
        if not os.access(self._blobs, os.W_OK) or not os.access(self.tmp_dir, os.W_OK):
            raise ServerError(f"storage folder {self.root} is not writable")
        self.clear_stale_uploads()

    def clear_stale_uploads(self) -> int:
        """Delete temporary files whose upload died with its process; returns how many went.

        A live upload holds a lock on its file, so processes sharing the folder keep theirs.
        """
        removed = 0
        with self._creating(exclusive=True):
            for entry in os.scandir(self.tmp_dir):
                if not entry.name.startswith(_UPLOAD_PREFIX):
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live upload
                finally:
                    os.close(fd)
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        if removed:
            event("storage-cleared", f"deleted {removed} temporary files of interrupted uploads", removed=removed)
        return removed

    @contextmanager
    def _creating(self, exclusive: bool = False) -> Iterator[None]:
        """Uploads create their (locked) file under a shared lock, the cleaner scans under an exclusive one,
        so the cleaner never sees a file in the moment between its creation and its lock."""
        fd = os.open(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def blob_path(self, digest: str) -> Path:
        return self._blobs / digest_hex(digest)

    # -- integrity ---------------------------------------------------------------

    def _remember(self, digest: str, st: os.stat_result) -> None:
        with self._verified_lock:
            if len(self._verified) >= _REMEMBERED:
                self._verified.clear()
            self._verified[digest] = _identity(st)

    def _intact(self, digest: str) -> os.stat_result | None:
        """The blob's file status when it holds the bytes its digest names; None when missing or damaged.

        Hashes the file the first time this process sees it (or after it changed), then remembers.
        """
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        with self._verified_lock:
            if self._verified.get(digest) == _identity(st):
                return st
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                actual = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            return None
        if actual == digest:
            self._remember(digest, st)
            return st
        self._remove_damaged(digest, path, st)
        return None

    def _remove_damaged(self, digest: str, path: Path, st: os.stat_result) -> None:
        try:
            if _identity(path.stat()) == _identity(st):  # not replaced by a good copy meanwhile
                path.unlink()
        except FileNotFoundError:
            pass
        event("blob-damaged", f"blob {digest} did not match its digest; removed it so it is packed again",
              severity="WARNING", digest=digest, size=st.st_size)

    def verify(self, digest: str, size: int, md5_hex: str) -> bool:
        # The file's SHA-256 is checked against its digest, which proves its bytes (and so its MD5).
        st = self._intact(digest)
        return st is not None and st.st_size == size

    # -- writing and reading ------------------------------------------------------

    def upload(self) -> FilesystemUpload:
        return FilesystemUpload(self)

    def put_bytes(self, digest: str, data: bytes, media_type: str) -> None:
        check_digest_of(data, digest)
        if self._intact(digest) is not None:
            return
        with self.upload() as upload:
            upload.write(data)
            upload.commit(digest, hashlib.md5(data).hexdigest(), len(data), media_type)

    def read_bytes(self, digest: str) -> bytes | None:
        if self._intact(digest) is None:
            return None
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            return None
        return data if has_digest(data, digest) else None

    def put_layer_index(self, name: str, data: bytes) -> None:
        path = self._index / check_index_name(name)
        self._index.mkdir(parents=True, exist_ok=True)
        with _disk_errors("writing the layer index"):
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="index-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers see the old record or the new, never half of one

    def read_layer_index(self, name: str) -> bytes | None:
        try:
            return (self._index / check_index_name(name)).read_bytes()
        except FileNotFoundError:
            return None

    def stat(self, digest: str) -> BlobStat | None:
        st = self._intact(digest)
        return None if st is None else BlobStat(size=st.st_size)

    def locate(self, digest: str) -> LocalFile | None:
        st = self._intact(digest)
        return None if st is None else LocalFile(path=str(self.blob_path(digest)), size=st.st_size)
