"""The shared cache for deployments: Firestore (native mode), one database for all instances.

Collections `<prefix>manifests`, `layers`, `builds`, `facts`, `recent-images`, `recent-failures`;
document IDs are the SHA-256 of the key, which each document also keeps and every read compares.
Expired documents are ignored before the TTL policy deletes them. No call hangs: after a failure
Firestore is skipped for a cool-down and `FirestoreUnavailable` (a miss to callers) is raised.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Mapping, Sequence, TypeVar

from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry, if_transient_error

from ..errors import Unavailable
from ..names import key_hash
from . import (BuildLease, BuildProgress, BuiltImage, BuiltLayer, Fact, FailedBuild, ImageRecord, LayerRecord,
               ManifestRef)

DEFAULT_TIMEOUT = 3.0  # seconds per RPC, retries included; a cold connection takes over 1 s
DEFAULT_COOLDOWN = 5.0  # seconds without Firestore calls after one failed to reach it
_CLAIM_ATTEMPTS = 8  # create / read / take over rounds before giving up on a churning lease
# A document holds at most 1 MiB; a larger fact is not shared (it is an optimisation).
_FACT_MAX_BYTES = 900_000
_BATCH = 300  # documents per batched read or write (Firestore allows 500 writes per batch)

T = TypeVar("T")

# A conditional write refused because the lease changed (or vanished) since we read it.
_LOST_RACE = (api_exceptions.FailedPrecondition, api_exceptions.NotFound)


class FirestoreUnavailable(Unavailable):
    """Firestore could not answer in time, refused the call, or holds a document we cannot read.

    A subclass of `errors.Unavailable` (503), so if it ever escapes the cache-as-miss
    handling a client still gets a well-formed registry error.
    """

    default_message = "build cache unavailable"


def _timestamp(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, timezone.utc)


def _unix(data: dict[str, Any]) -> float:
    exact = data.get("expires_at_unix")
    if isinstance(exact, (int, float)):
        return float(exact)
    return data["expires_at"].timestamp()


class FirestoreCache:
    """The `Cache` interface over a `google.cloud.firestore.Client`.

    Thread-safe: the client's gRPC channel is shared by this instance's threads.
    """

    def __init__(
        self,
        client: Any,
        prefix: str = "nixery-",
        timeout: float = DEFAULT_TIMEOUT,
        cooldown: float = DEFAULT_COOLDOWN,
    ):
        self._client = client
        self._timeout = timeout
        self._cooldown = cooldown
        self._skip_until = 0.0  # time.monotonic() before which calls fail without an RPC
        # Transient errors (UNAVAILABLE, INTERNAL, 429) are retried within the same budget
        # as the call itself; a stopped server therefore costs about `timeout`, not minutes.
        self._retry = Retry(
            predicate=if_transient_error, initial=0.05, maximum=0.5, multiplier=2.0, timeout=timeout
        )
        self._manifests = client.collection(f"{prefix}manifests")
        self._layers = client.collection(f"{prefix}layers")
        self._builds = client.collection(f"{prefix}builds")
        self._facts = client.collection(f"{prefix}facts")
        self._recent_images = client.collection(f"{prefix}recent-images")
        self._recent_failures = client.collection(f"{prefix}recent-failures")

    @classmethod
    def from_config(cls, config: Any) -> "FirestoreCache":
        from google.cloud import firestore

        try:
            client = firestore.Client(project=config.firestore_project, database=config.firestore_database)
        except Exception as exc:  # credentials or project discovery failed
            raise FirestoreUnavailable(f"build cache unavailable: cannot open Firestore: {exc}") from exc
        return cls(client, prefix=config.firestore_prefix)

    # -- images ---------------------------------------------------------------

    def get_image(self, key: str, now: float) -> ImageRecord | None:
        data = self._get(self._manifests.document(key_hash(key)), key)
        if data is None:
            return None
        return self._decode(lambda: self._image(data, now), key)

    @staticmethod
    def _image(data: dict[str, Any], now: float) -> ImageRecord | None:
        expires_at = _unix(data)
        if expires_at <= now:
            return None  # expired, and the TTL policy has not deleted it yet
        return ImageRecord(
            key=data["key"],
            manifests=tuple(
                ManifestRef(digest=m["digest"], size=int(m["size"]), media_type=m["media_type"])
                for m in data["manifests"]
            ),
            source=data["source"],
            created=float(data["created"]),
            expires_at=expires_at,
            blobs=tuple(data.get("blobs") or ()),
        )

    def put_image(self, record: ImageRecord) -> None:
        document = {
            "key": record.key,
            "manifests": [
                {"digest": m.digest, "size": m.size, "media_type": m.media_type} for m in record.manifests
            ],
            "source": record.source,
            "created": float(record.created),
            "expires_at": _timestamp(record.expires_at),
            "expires_at_unix": float(record.expires_at),
            # Firestore indexes array members by itself: drop_images_with_blob finds them in one query.
            "blobs": list(record.blobs),
        }
        ref = self._manifests.document(key_hash(record.key))
        self._call(lambda: ref.set(document, timeout=self._timeout, retry=self._retry))

    def drop_image(self, key: str) -> None:
        ref = self._manifests.document(key_hash(key))
        self._call(lambda: ref.delete(timeout=self._timeout, retry=self._retry))

    def drop_images_with_blob(self, digest: str) -> list[str]:
        from google.cloud.firestore_v1.base_query import FieldFilter

        query = self._manifests.where(filter=FieldFilter("blobs", "array_contains", digest)).select(["key"])
        snapshots = self._call(lambda: list(query.stream(timeout=self._timeout, retry=self._retry)))
        keys = []
        for snapshot in snapshots:
            ref = snapshot.reference
            self._call(lambda: ref.delete(timeout=self._timeout, retry=self._retry))
            keys.append((snapshot.to_dict() or {}).get("key", snapshot.id))
        return keys

    # -- layers ---------------------------------------------------------------

    def get_layer(self, key: str) -> LayerRecord | None:
        data = self._get(self._layers.document(key_hash(key)), key)
        if data is None:
            return None
        record = self._decode(
            lambda: LayerRecord(
                key=data["key"],
                digest=data["digest"],
                diff_id=data["diff_id"],
                size=int(data["size"]),
                md5=data["md5"],
                expires_at=float(data.get("expires_at_unix") or 0.0),
            ),
            key,
        )
        return record if record is not None and record.live(time.time()) else None

    def put_layer(self, record: LayerRecord) -> None:
        document = {
            "key": record.key,
            "digest": record.digest,
            "diff_id": record.diff_id,
            "size": record.size,
            "md5": record.md5,
        }
        if record.expires_at:  # for Firestore's TTL policy on the layers collection
            document.update(expires_at=_timestamp(record.expires_at), expires_at_unix=float(record.expires_at))
        ref = self._layers.document(key_hash(record.key))
        self._call(lambda: ref.set(document, timeout=self._timeout, retry=self._retry))

    # -- facts --------------------------------------------------------------------

    def get_facts(self, kind: str, keys: Sequence[str], now: float) -> dict[str, Fact]:
        wanted = {key_hash(f"{kind}\0{key}"): key for key in dict.fromkeys(keys)}
        found: dict[str, Fact] = {}
        ids = list(wanted)
        for start in range(0, len(ids), _BATCH):
            refs = [self._facts.document(i) for i in ids[start:start + _BATCH]]
            snapshots = self._call(lambda: list(self._client.get_all(refs, timeout=self._timeout, retry=self._retry)))
            for snapshot in snapshots:
                if not snapshot.exists:
                    continue
                data = snapshot.to_dict() or {}
                key = wanted.get(snapshot.id)
                if key is None or data.get("kind") != kind or data.get("key") != key:
                    continue  # a foreign document: not this key's fact
                fact = self._decode(lambda: Fact(json.loads(data["value"]), _unix(data)), key)
                if fact.expires_at > now:
                    found[key] = fact
        return found

    def put_facts(self, kind: str, facts: Mapping[str, dict], expires_at: float) -> None:
        documents = []
        for key, value in facts.items():
            text = json.dumps(value, sort_keys=True)
            if len(text) + len(key) > _FACT_MAX_BYTES:
                continue
            documents.append((key_hash(f"{kind}\0{key}"), {
                "kind": kind, "key": key, "value": text,
                "expires_at": _timestamp(expires_at), "expires_at_unix": float(expires_at),
            }))
        # A commit carries at most 500 writes and 10 MiB: cut the batches well below both.
        chunks: list[list] = [[]]
        size = 0
        for ident, document in documents:
            if len(chunks[-1]) >= _BATCH or size + len(document["value"]) > 4 * _FACT_MAX_BYTES:
                chunks.append([])
                size = 0
            chunks[-1].append((ident, document))
            size += len(document["value"])
        for chunk in chunks:
            if not chunk:
                continue
            batch = self._client.batch()
            for ident, document in chunk:
                batch.set(self._facts.document(ident), document)
            self._call(lambda: batch.commit(timeout=self._timeout, retry=self._retry))

    # -- build leases -----------------------------------------------------------

    def claim_build(self, key: str, holder: str, expires_at: float, now: float) -> BuildLease:
        ref = self._builds.document(key_hash(key))
        fields = {
            "key": key,
            "holder": holder,
            "expires_at": _timestamp(expires_at),
            "expires_at_unix": float(expires_at),
            "error": None,
            "progress": None,  # a taken-over lease starts without its old holder's progress
        }
        ours = BuildLease(key, holder, expires_at, None)
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                self._call(
                    lambda: ref.create(fields, timeout=self._timeout, retry=self._retry),
                    expected=(api_exceptions.AlreadyExists,),
                )
                return ours
            except api_exceptions.AlreadyExists:
                pass
            snapshot = self._snapshot(ref)
            if not snapshot.exists:
                continue  # released between our create and our read: create again
            lease = self._decode(lambda: self._lease(snapshot.to_dict(), key), key)
            if lease.expires_at > now and lease.holder != holder:
                return lease  # someone builds, or a failure is remembered
            # Expired (its holder died, or a remembered failure ran out), or our own:
            # take it over unless someone else changed it since we read it.
            if self._write_unless_changed(snapshot, partial(ref.update, fields)):
                return ours
            # Another instance took it over (or released it) first: look again.
        raise FirestoreUnavailable(f"build cache unavailable: lease for {key!r} kept changing")

    def renew_build(self, key: str, holder: str, expires_at: float) -> bool:
        ref = self._builds.document(key_hash(key))
        update = {"expires_at": _timestamp(expires_at), "expires_at_unix": float(expires_at)}
        for _ in range(_CLAIM_ATTEMPTS):
            snapshot = self._snapshot(ref)
            if not snapshot.exists:
                return False
            data = snapshot.to_dict()
            if data.get("holder") != holder or data.get("key") != key or data.get("error"):
                return False
            # Conditional on what we read: a takeover between read and write wins.
            if self._write_unless_changed(snapshot, partial(ref.update, update)):
                return True
        raise FirestoreUnavailable(f"build cache unavailable: lease for {key!r} kept changing")

    def get_build(self, key: str) -> BuildLease | None:
        data = self._get(self._builds.document(key_hash(key)), key)
        if data is None:
            return None
        return self._decode(lambda: self._lease(data, key), key)

    def finish_build(self, key: str, holder: str, error: dict | None, remember_until: float) -> None:
        ref = self._builds.document(key_hash(key))
        for _ in range(_CLAIM_ATTEMPTS):
            snapshot = self._snapshot(ref)
            if not snapshot.exists:
                return
            data = snapshot.to_dict()
            if data.get("holder") != holder or data.get("key") != key:
                return  # taken over after our lease expired: not ours to release
            if error is None:
                write = ref.delete
            else:
                write = partial(ref.update, {
                    "error": json.dumps(error, sort_keys=True),
                    "expires_at": _timestamp(remember_until),
                    "expires_at_unix": float(remember_until),
                })
            if self._write_unless_changed(snapshot, write):
                return
            # Changed since we read it: read again.
        raise FirestoreUnavailable(f"build cache unavailable: lease for {key!r} kept changing")

    @staticmethod
    def _lease(data: dict[str, Any], key: str) -> BuildLease:
        raw_error = data.get("error")
        return BuildLease(
            key=key,
            holder=data["holder"],
            expires_at=_unix(data),
            error=json.loads(raw_error) if raw_error else None,
        )

    # -- the front page ---------------------------------------------------------------
    # A listing is one query (one RunQuery round trip): newest `limit` documents by
    # `finished` (a single-field index Firestore keeps by default), expired ones dropped
    # here. Image listings project away the layers, which can hold thousands of paths.

    def record_image(self, image: BuiltImage) -> None:
        document = {f: getattr(image, f) for f in _IMAGE_FIELDS}
        document.update(
            digest=image.digest,
            manifests=[{"digest": m.digest, "size": m.size, "media_type": m.media_type} for m in image.manifests],
            expires_at=_timestamp(image.expires_at),
            expires_at_unix=float(image.expires_at),
            layers=[{"digest": l.digest, "size": l.size, "paths": list(l.paths)} for l in image.layers],
        )
        ref = self._recent_images.document(key_hash(image.digest))
        self._call(lambda: ref.set(document, timeout=self._timeout, retry=self._retry))

    def recent_images(self, now: float, limit: int) -> list[BuiltImage]:
        fields = [*_IMAGE_FIELDS, "manifests", "expires_at", "expires_at_unix"]
        found = self._newest(self._recent_images, limit, fields)
        return [image for data in found if (image := self._decode(lambda: _built_image(data, now, False), "recent"))]

    def built_image(self, digest: str, now: float) -> BuiltImage | None:
        snapshot = self._snapshot(self._recent_images.document(key_hash(digest)))
        data = snapshot.to_dict() if snapshot.exists else None
        if not data or data.get("digest") != digest:
            return None
        return self._decode(lambda: _built_image(data, now, True), digest)

    def record_failure(self, failure: FailedBuild) -> None:
        document = {**failure.__dict__, "expires_at": _timestamp(failure.expires_at),
                    "expires_at_unix": float(failure.expires_at)}
        ref = self._recent_failures.document(key_hash(failure.key))
        self._call(lambda: ref.set(document, timeout=self._timeout, retry=self._retry))

    def recent_failures(self, now: float, limit: int) -> list[FailedBuild]:
        failures = []
        for data in self._newest(self._recent_failures, limit):
            expires_at = self._decode(lambda: _unix(data), "recent failure")
            if expires_at > now:
                failures.append(self._decode(lambda: FailedBuild(
                    **{f: data[f] for f in _FAILURE_FIELDS}, expires_at=expires_at), "recent failure"))
        return failures

    def report_build(self, key: str, holder: str, progress: BuildProgress) -> None:
        ref = self._builds.document(key_hash(key))
        snapshot = self._snapshot(ref)
        data = snapshot.to_dict() if snapshot.exists else None
        if not data or data.get("holder") != holder or data.get("key") != key or data.get("error"):
            return
        # Lost when the lease was renewed, released or taken over meanwhile: the next report says where it is.
        self._write_unless_changed(snapshot, partial(ref.update, {"progress": progress.__dict__}))

    def builds_in_progress(self, now: float, limit: int) -> list[BuildProgress]:
        from google.cloud.firestore import FieldFilter

        query = (self._builds.where(filter=FieldFilter("expires_at", ">", _timestamp(now))).order_by("expires_at")
                 .select(["expires_at", "expires_at_unix", "error", "progress"]).limit(limit))
        found = self._call(lambda: [s.to_dict() for s in query.stream(timeout=self._timeout, retry=self._retry)])
        builds = []
        for data in found:
            progress = data.get("progress")
            if progress and not data.get("error") and self._decode(lambda: _unix(data), "lease") > now:
                builds.append(self._decode(lambda: BuildProgress(**progress), "lease"))
        return sorted(builds, key=lambda b: b.started)

    def _newest(self, collection: Any, limit: int, fields: list[str] | None = None) -> list[dict[str, Any]]:
        from google.cloud.firestore import Query

        query = collection.order_by("finished", direction=Query.DESCENDING).limit(limit)
        if fields is not None:
            query = query.select(fields)
        return self._call(lambda: [s.to_dict() for s in query.stream(timeout=self._timeout, retry=self._retry)])

    # -- plumbing -----------------------------------------------------------------

    def _write_unless_changed(self, snapshot: Any, write: Callable[..., Any]) -> bool:
        """`write` (a document's update or delete) on condition that the document is still as
        `snapshot` read it; False when someone changed or removed it since."""
        option = self._client.write_option(last_update_time=snapshot.update_time)
        try:
            self._call(lambda: write(option=option, timeout=self._timeout, retry=self._retry), expected=_LOST_RACE)
            return True
        except _LOST_RACE:
            return False

    def _call(self, fn: Callable[[], T], expected: tuple[type[Exception], ...] = ()) -> T:
        """One RPC; `expected` errors are answers (a lost race), re-raised as they are."""
        if time.monotonic() < self._skip_until:
            raise FirestoreUnavailable("build cache unavailable: Firestore failed moments ago, skipped")
        try:
            return fn()
        except expected:
            raise
        except api_exceptions.GoogleAPIError as exc:  # includes RetryError after the retry budget
            self._skip_until = time.monotonic() + self._cooldown
            raise FirestoreUnavailable(f"build cache unavailable: {type(exc).__name__}: {exc}") from exc

    def _snapshot(self, ref: Any) -> Any:
        return self._call(lambda: ref.get(timeout=self._timeout, retry=self._retry))

    def _get(self, ref: Any, key: str) -> dict[str, Any] | None:
        snapshot = self._snapshot(ref)
        if not snapshot.exists:
            return None
        data = snapshot.to_dict() or {}
        if data.get("key") != key:
            return None  # a digest collision or a foreign document: not this key's record
        return data

    @staticmethod
    def _decode(fn: Callable[[], T], key: str) -> T:
        try:
            return fn()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FirestoreUnavailable(f"build cache unavailable: unreadable record for {key!r}: {exc!r}") from exc


_IMAGE_FIELDS = ("key", "name", "tag", "architecture", "source", "size", "layer_count", "build_seconds", "finished")
_FAILURE_FIELDS = ("key", "name", "tag", "architecture", "code", "message", "finished")


def _built_image(data: dict[str, Any], now: float, with_layers: bool) -> BuiltImage | None:
    expires_at = _unix(data)
    if expires_at <= now:
        return None
    return BuiltImage(
        **{f: data[f] for f in _IMAGE_FIELDS},
        manifests=tuple(ManifestRef(m["digest"], int(m["size"]), m["media_type"]) for m in data["manifests"]),
        expires_at=expires_at,
        layers=tuple(BuiltLayer(l["digest"], int(l["size"]), tuple(l["paths"])) for l in data["layers"])
        if with_layers else (),
    )
