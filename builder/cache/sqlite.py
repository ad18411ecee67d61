"""The embedded cache: one SQLite file, no server.

Several processes may share the file (WAL mode; leases are claimed in an IMMEDIATE transaction).
A file SQLite finds corrupt is moved aside as `<file>.broken-<time>` and a new one started
(docs/design.md, "Self-healing").
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from ..logs import event
from . import (BuildLease, BuildProgress, BuiltImage, BuiltLayer, Fact, FailedBuild, ImageRecord, LayerRecord,
               ManifestRef)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (key TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS layers (key TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS builds (key TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS facts (kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, expires_at REAL NOT NULL,
                                  PRIMARY KEY (kind, key));
CREATE TABLE IF NOT EXISTS image_blobs (digest TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (digest, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS builds_expires ON builds (expires_at);
CREATE TABLE IF NOT EXISTS recent_images (digest TEXT PRIMARY KEY, finished REAL NOT NULL, expires_at REAL NOT NULL,
                                          summary TEXT NOT NULL, layers TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS recent_images_finished ON recent_images (finished);
CREATE INDEX IF NOT EXISTS recent_images_expires ON recent_images (expires_at);
CREATE TABLE IF NOT EXISTS recent_failures (key TEXT PRIMARY KEY, finished REAL NOT NULL, expires_at REAL NOT NULL,
                                            record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS recent_failures_finished ON recent_failures (finished);
CREATE INDEX IF NOT EXISTS recent_failures_expires ON recent_failures (expires_at);
"""


_BROKEN = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _broken(error: sqlite3.DatabaseError) -> bool:
    """Corrupt or not a database at all; "locked", "busy" and "disk full" are not reasons to reset."""
    return getattr(error, "sqlite_errorcode", None) in _BROKEN


def _connect(path: str) -> sqlite3.Connection:
    """A connection to a sound cache file, schema in place; raises DatabaseError when the file is broken."""
    db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        # A build's progress lives in its lease row; files made before it existed gain the column,
        # in one IMMEDIATE transaction: worker processes opening one file at once add it once.
        db.execute("BEGIN IMMEDIATE")
        try:
            if "progress" not in {row[1] for row in db.execute("PRAGMA table_info(builds)")}:
                db.execute("ALTER TABLE builds ADD COLUMN progress TEXT")
        finally:
            db.execute("COMMIT")
        verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
        if verdict != "ok":
            error = sqlite3.DatabaseError(f"quick_check: {verdict}")
            error.sqlite_errorcode = sqlite3.SQLITE_CORRUPT  # type: ignore[attr-defined]
            raise error
    except BaseException:
        db.close()
        raise
    return db


class SqliteCache:
    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()  # one connection, shared by this instance's threads
        with self._lock:
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            return _connect(self._path)
        except sqlite3.DatabaseError as e:
            if not _broken(e):
                raise
        # Under the lock file, look again: another process may have replaced it already.
        with open(self._path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return _connect(self._path)
            except sqlite3.DatabaseError as e:
                if not _broken(e):
                    raise
                aside = f"{self._path}.broken-{int(time.time())}"
                os.replace(self._path, aside)
                for suffix in ("-wal", "-shm"):  # they belong to the broken file
                    Path(self._path + suffix).unlink(missing_ok=True)
                event("cache-reset", f"the SQLite cache file was broken ({e}); moved it aside and started an empty one",
                      severity="WARNING", error=str(e), moved_to=aside)
                return _connect(self._path)

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """Holds the connection lock; a call that finds the file broken resets it (and still fails)."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as e:
                if _broken(e):
                    self._db.close()
                    self._db = self._open()
                raise

    def get_image(self, key: str, now: float) -> ImageRecord | None:
        with self._guarded():
            row = self._db.execute("SELECT record FROM images WHERE key = ? AND expires_at > ?", (key, now)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        data["manifests"] = tuple(ManifestRef(**m) for m in data["manifests"])
        data["blobs"] = tuple(data.get("blobs", ()))
        return ImageRecord(**data)

    def put_image(self, record: ImageRecord) -> None:
        data = {
            "key": record.key,
            "manifests": [m.__dict__ for m in record.manifests],
            "source": record.source,
            "created": record.created,
            "expires_at": record.expires_at,
            "blobs": list(record.blobs),
        }
        with self._guarded(), self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO images (key, record, expires_at) VALUES (?, ?, ?)",
                (record.key, json.dumps(data), record.expires_at),
            )
            self._db.execute("DELETE FROM image_blobs WHERE key = ?", (record.key,))
            self._db.executemany(
                "INSERT OR IGNORE INTO image_blobs (digest, key) VALUES (?, ?)",
                [(digest, record.key) for digest in record.blobs],
            )

    def drop_image(self, key: str) -> None:
        with self._guarded(), self._transaction():
            self._db.execute("DELETE FROM images WHERE key = ?", (key,))
            self._db.execute("DELETE FROM image_blobs WHERE key = ?", (key,))

    def drop_images_with_blob(self, digest: str) -> list[str]:
        with self._guarded(), self._transaction():
            keys = [row[0] for row in self._db.execute("SELECT key FROM image_blobs WHERE digest = ?", (digest,))]
            for key in keys:
                self._db.execute("DELETE FROM images WHERE key = ?", (key,))
                self._db.execute("DELETE FROM image_blobs WHERE key = ?", (key,))
        return keys

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One IMMEDIATE transaction (the connection is in autocommit mode); the caller holds `_lock`."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get_layer(self, key: str) -> LayerRecord | None:
        with self._guarded():
            row = self._db.execute("SELECT record FROM layers WHERE key = ?", (key,)).fetchone()
        record = LayerRecord(**json.loads(row[0])) if row else None
        return record if record is not None and record.live(time.time()) else None

    def put_layer(self, record: LayerRecord) -> None:
        with self._guarded():
            self._db.execute(
                "INSERT OR REPLACE INTO layers (key, record) VALUES (?, ?)", (record.key, json.dumps(record.__dict__))
            )

    def claim_build(self, key: str, holder: str, expires_at: float, now: float) -> BuildLease:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT holder, expires_at, error FROM builds WHERE key = ?", (key,)).fetchone()
                if row is not None and row[1] > now and (row[0] != holder or row[2] is not None):
                    return BuildLease(key, row[0], row[1], json.loads(row[2]) if row[2] else None)
                self._db.execute(
                    "INSERT OR REPLACE INTO builds (key, holder, expires_at, error) VALUES (?, ?, ?, NULL)",
                    (key, holder, expires_at),
                )
                return BuildLease(key, holder, expires_at, None)
            finally:
                self._db.execute("COMMIT")

    def renew_build(self, key: str, holder: str, expires_at: float) -> bool:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE builds SET expires_at = ? WHERE key = ? AND holder = ? AND error IS NULL",
                (expires_at, key, holder),
            )
            return cursor.rowcount > 0

    def get_build(self, key: str) -> BuildLease | None:
        with self._lock:
            row = self._db.execute("SELECT holder, expires_at, error FROM builds WHERE key = ?", (key,)).fetchone()
        return BuildLease(key, row[0], row[1], json.loads(row[2]) if row[2] else None) if row else None

    def finish_build(self, key: str, holder: str, error: dict | None, remember_until: float) -> None:
        with self._lock:
            if error is None:
                self._db.execute("DELETE FROM builds WHERE key = ? AND holder = ?", (key, holder))
            else:
                self._db.execute(
                    "UPDATE builds SET error = ?, expires_at = ? WHERE key = ? AND holder = ?",
                    (json.dumps(error), remember_until, key, holder),
                )

    def get_facts(self, kind: str, keys: Sequence[str], now: float) -> dict[str, Fact]:
        found: dict[str, Fact] = {}
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), 500):  # SQLite bounds the number of parameters
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            with self._guarded():
                rows = self._db.execute(
                    f"SELECT key, value, expires_at FROM facts WHERE kind = ? AND expires_at > ? AND key IN ({marks})",
                    (kind, now, *chunk),
                ).fetchall()
            found.update((key, Fact(json.loads(value), expires_at)) for key, value, expires_at in rows)
        return found

    def put_facts(self, kind: str, facts: Mapping[str, dict], expires_at: float) -> None:
        rows = [(kind, key, json.dumps(value, sort_keys=True), expires_at) for key, value in facts.items()]
        with self._guarded():
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO facts (kind, key, value, expires_at) VALUES (?, ?, ?, ?)", rows
                )
            finally:
                self._db.execute("COMMIT")

    # -- the front page ----------------------------------------------------------------
    # Listings walk the `finished` index from the newest row and stop at `limit`; expired
    # rows are deleted whenever a row of their table is written, so they never pile up.

    def record_image(self, image: BuiltImage) -> None:
        summary = {f: getattr(image, f) for f in _IMAGE_FIELDS}
        summary["manifests"] = [m.__dict__ for m in image.manifests]
        layers = [{"digest": l.digest, "size": l.size, "paths": list(l.paths)} for l in image.layers]
        with self._guarded():
            self._db.execute("DELETE FROM recent_images WHERE expires_at <= ?", (image.finished,))
            self._db.execute(
                "INSERT OR REPLACE INTO recent_images (digest, finished, expires_at, summary, layers)"
                " VALUES (?, ?, ?, ?, ?)",
                (image.digest, image.finished, image.expires_at, json.dumps(summary), json.dumps(layers)),
            )

    def recent_images(self, now: float, limit: int) -> list[BuiltImage]:
        return [_built_image(json.loads(summary), []) for summary in self._newest("recent_images", "summary", now, limit)]

    def built_image(self, digest: str, now: float) -> BuiltImage | None:
        with self._guarded():
            row = self._db.execute(
                "SELECT summary, layers FROM recent_images WHERE digest = ? AND expires_at > ?", (digest, now)
            ).fetchone()
        return _built_image(json.loads(row[0]), json.loads(row[1])) if row else None

    def record_failure(self, failure: FailedBuild) -> None:
        with self._guarded():
            self._db.execute("DELETE FROM recent_failures WHERE expires_at <= ?", (failure.finished,))
            self._db.execute(
                "INSERT OR REPLACE INTO recent_failures (key, finished, expires_at, record) VALUES (?, ?, ?, ?)",
                (failure.key, failure.finished, failure.expires_at, json.dumps(failure.__dict__)),
            )

    def recent_failures(self, now: float, limit: int) -> list[FailedBuild]:
        return [FailedBuild(**json.loads(record)) for record in self._newest("recent_failures", "record", now, limit)]

    def _newest(self, table: str, column: str, now: float, limit: int) -> list[str]:
        """`column` of the unexpired rows of `table` (recent_images or recent_failures), newest first."""
        with self._guarded():
            rows = self._db.execute(
                f"SELECT {column} FROM {table} INDEXED BY {table}_finished"
                " WHERE expires_at > ? ORDER BY finished DESC LIMIT ?", (now, limit)
            ).fetchall()
        return [value for (value,) in rows]

    def report_build(self, key: str, holder: str, progress: BuildProgress) -> None:
        with self._guarded():
            self._db.execute(
                "UPDATE builds SET progress = ? WHERE key = ? AND holder = ? AND error IS NULL",
                (json.dumps(progress.__dict__), key, holder),
            )

    def builds_in_progress(self, now: float, limit: int) -> list[BuildProgress]:
        with self._guarded():
            rows = self._db.execute(
                "SELECT progress FROM builds WHERE expires_at > ? AND error IS NULL AND progress IS NOT NULL LIMIT ?",
                (now, limit),
            ).fetchall()
        return sorted((BuildProgress(**json.loads(p)) for (p,) in rows), key=lambda b: b.started)


_IMAGE_FIELDS = ("key", "name", "tag", "architecture", "source", "size", "layer_count", "build_seconds", "finished",
                 "expires_at")


def _built_image(summary: dict, layers: list[dict]) -> BuiltImage:
    return BuiltImage(
        **{f: summary[f] for f in _IMAGE_FIELDS},
        manifests=tuple(ManifestRef(**m) for m in summary["manifests"]),
        layers=tuple(BuiltLayer(l["digest"], l["size"], tuple(l["paths"])) for l in layers),
    )
