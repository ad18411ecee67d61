"""The build cache: built images, stored layers, build leases, facts, and the front page's records.

A backend offers exactly this interface; `open_cache` (in `builder/config.py`) picks one.
The cache is an optimisation: callers treat a failing backend as a miss and build anyway.
Records are written only after every blob they point at is stored; facts (which
commit a channel is at, ...) carry a kind, a key and an expiry, and readers ignore expired ones.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping, Protocol, Sequence


@dataclass(frozen=True)
class ManifestRef:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class ImageRecord:
    """A built image: one manifest per media type, all over the same blobs."""

    key: str
    manifests: tuple[ManifestRef, ...]
    source: str  # resolved package-source identity
    created: float  # unix seconds
    expires_at: float  # unix seconds; readers treat an expired record as absent
    blobs: tuple[str, ...] = ()  # digests of its config and layers: which images a lost blob breaks


@dataclass(frozen=True)
class LayerRecord:
    """A layer packed and stored once, found again by the store paths it holds."""

    key: str
    digest: str
    diff_id: str
    size: int
    md5: str  # hex
    # unix seconds (see Config.layer_record_ttl); readers treat an expired record as absent. 0: never
    # (records written before layers expired).
    expires_at: float = 0.0

    def live(self, now: float) -> bool:
        return not self.expires_at or self.expires_at > now

    def to_json(self) -> bytes:
        """The record as storage's layer index keeps it."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "LayerRecord | None":
        """A record read back from the layer index; None when the bytes are not one."""
        try:
            fields = json.loads(data)
            record = cls(**{name: fields[name] for name in ("key", "digest", "diff_id", "size", "md5")})
        except (ValueError, TypeError, KeyError):
            return None
        valid = all(isinstance(getattr(record, n), str) for n in ("key", "digest", "diff_id", "md5"))
        return record if valid and isinstance(record.size, int) else None


@dataclass(frozen=True)
class BuildLease:
    """Who builds an image now, or how its last build failed."""

    key: str
    holder: str
    expires_at: float
    error: dict | None = field(default=None)  # a failed build's error, remembered briefly


@dataclass(frozen=True)
class Fact:
    """One fact (a channel's commit, the referrers of a manifest; JSON-serialisable `value`), live until `expires_at`."""

    value: dict
    expires_at: float  # unix seconds; readers treat an expired fact as absent


@dataclass(frozen=True)
class BuiltLayer:
    """One layer of a built image, as its image page lists it."""

    digest: str
    size: int  # bytes of the blob as served
    paths: tuple[str, ...]  # store paths it holds; empty for the customisation layer


@dataclass(frozen=True)
class BuiltImage:
    """A finished build, for the front page: which name, what it made, how long it took.

    One per image manifest: `manifests[0].digest` identifies it. Listings
    (`recent_images`) leave `layers` empty; `built_image` fills it.
    """

    key: str  # the image's cache key (ImageRecord.key)
    name: str  # the repository name the client asked for
    tag: str
    architecture: str
    source: str  # resolved package-source identity
    manifests: tuple[ManifestRef, ...]
    size: int  # bytes of config and layers
    layer_count: int
    build_seconds: float
    finished: float  # unix seconds
    expires_at: float  # unix seconds; gone from listings after this
    layers: tuple[BuiltLayer, ...] = ()

    @property
    def digest(self) -> str:
        return self.manifests[0].digest


@dataclass(frozen=True)
class FailedBuild:
    """A build that failed, for the front page; one per image key (the latest failure)."""

    key: str
    name: str
    tag: str
    architecture: str
    code: str  # the registry error code the client got
    message: str  # Nix's words, as the client got them (untrusted text: escape it)
    finished: float
    expires_at: float


@dataclass(frozen=True)
class BuildProgress:
    """Where a build in progress is, for the front page: recorded in its lease by the holder."""

    key: str
    name: str
    tag: str
    architecture: str
    started: float  # unix seconds
    phase: str  # evaluating | realising | packing N of M layers | uploading


class Cache(Protocol):
    def get_image(self, key: str, now: float) -> ImageRecord | None: ...

    def put_image(self, record: ImageRecord) -> None: ...

    def drop_image(self, key: str) -> None:
        """Forget an image record (its manifest or config is gone from storage): the next request rebuilds it."""
        ...

    def drop_images_with_blob(self, digest: str) -> list[str]:
        """Forget every image record naming blob `digest` (gone or damaged in storage); returns their keys."""
        ...

    def get_layer(self, key: str) -> LayerRecord | None: ...

    def put_layer(self, record: LayerRecord) -> None: ...

    def claim_build(self, key: str, holder: str, expires_at: float, now: float) -> BuildLease:
        """Take the build lease for `key` unless a live one exists; returns the lease in force.

        The caller holds the lease when the returned holder is `holder`. An expired
        lease (its holder died) is taken over. A live lease carrying an error is a
        remembered failure: the caller reports it instead of building.
        """
        ...

    def renew_build(self, key: str, holder: str, expires_at: float) -> bool:
        """The holder's heartbeat: extend its live lease to `expires_at`.

        False when `holder` no longer holds the lease (it expired and was taken over,
        or carries a remembered failure): the caller has lost it.
        """
        ...

    def get_build(self, key: str) -> BuildLease | None: ...

    def finish_build(self, key: str, holder: str, error: dict | None, remember_until: float) -> None:
        """Release the lease; with an error, keep it until `remember_until` for waiters and retries."""
        ...

    def get_facts(self, kind: str, keys: Sequence[str], now: float) -> dict[str, Fact]:
        """The live facts of `kind` among `keys`, in one round trip; absent keys are left out."""
        ...

    def put_facts(self, kind: str, facts: Mapping[str, dict], expires_at: float) -> None:
        """Write (or replace) facts of `kind`, each a JSON-serialisable dict, live until `expires_at`."""
        ...

    # -- the front page: bounded listings, newest first, never a scan ----------------

    def record_image(self, image: BuiltImage) -> None: ...

    def recent_images(self, now: float, limit: int) -> list[BuiltImage]:
        """Up to `limit` unexpired built images, newest first, without their `layers`: one query."""
        ...

    def built_image(self, digest: str, now: float) -> BuiltImage | None:
        """The unexpired built image whose first manifest is `digest`, with its layers."""
        ...

    def record_failure(self, failure: FailedBuild) -> None:
        """Remember a failure until its `expires_at`; replaces the previous one of its key."""
        ...

    def recent_failures(self, now: float, limit: int) -> list[FailedBuild]:
        """Up to `limit` unexpired failures, newest first: one query."""
        ...

    def report_build(self, key: str, holder: str, progress: BuildProgress) -> None:
        """Record `progress` in the lease of `key` if `holder` holds it; otherwise change nothing."""
        ...

    def builds_in_progress(self, now: float, limit: int) -> list[BuildProgress]:
        """Up to `limit` builds whose live lease carries progress (no failures): one query."""
        ...
