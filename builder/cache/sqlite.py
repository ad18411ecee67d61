"""The embedded cache: one SQLite file, no server.

Several processes may share the file (WAL mode; build leases are claimed in
an IMMEDIATE transaction, so one process wins).
"""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Mapping, Sequence

from . import BuildLease, Fact, ImageRecord, LayerRecord, ManifestRef

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (key TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS layers (key TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS builds (key TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS facts (kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, expires_at REAL NOT NULL,
                                  PRIMARY KEY (kind, key));
"""


class SqliteCache:
    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()  # one connection, shared by this instance's threads
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def get_image(self, key: str, now: float) -> ImageRecord | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM images WHERE key = ? AND expires_at > ?", (key, now)).fetchone()
        if row is None:
            return None
        data = json.loads(row[0])
        data["manifests"] = tuple(ManifestRef(**m) for m in data["manifests"])
        return ImageRecord(**data)

    def put_image(self, record: ImageRecord) -> None:
        data = {
            "key": record.key,
            "manifests": [m.__dict__ for m in record.manifests],
            "source": record.source,
            "created": record.created,
            "expires_at": record.expires_at,
        }
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO images (key, record, expires_at) VALUES (?, ?, ?)",
                (record.key, json.dumps(data), record.expires_at),
            )

    def get_layer(self, key: str) -> LayerRecord | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM layers WHERE key = ?", (key,)).fetchone()
        return LayerRecord(**json.loads(row[0])) if row else None

    def put_layer(self, record: LayerRecord) -> None:
        with self._lock:
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
            with self._lock:
                rows = self._db.execute(
                    f"SELECT key, value, expires_at FROM facts WHERE kind = ? AND expires_at > ? AND key IN ({marks})",
                    (kind, now, *chunk),
                ).fetchall()
            found.update((key, Fact(json.loads(value), expires_at)) for key, value, expires_at in rows)
        return found

    def put_facts(self, kind: str, facts: Mapping[str, dict], expires_at: float) -> None:
        rows = [(kind, key, json.dumps(value, sort_keys=True), expires_at) for key, value in facts.items()]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO facts (kind, key, value, expires_at) VALUES (?, ?, ?, ?)", rows
                )
            finally:
                self._db.execute("COMMIT")
