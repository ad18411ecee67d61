"""A per-instance memory in front of a shared cache.

Image and layer records never change once written, so they are kept until the image record's
`expires_at` (layer records: their own) without asking the shared cache again; facts until their own expiry. Misses are
not remembered (another instance may build a moment later) and build leases and the
front page's listings always go through.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

from ..lru import Lru
from . import BuildLease, BuildProgress, BuiltImage, Cache, Fact, FailedBuild, ImageRecord, LayerRecord

class MemoryCache:
    """`Cache` over another `Cache`, keeping up to `max_entries` images and as many layers."""

    def __init__(self, inner: Cache, max_entries: int = 10_000):
        self.inner = inner
        self._images: Lru[ImageRecord] = Lru(max_entries)
        self._layers: Lru[LayerRecord] = Lru(max_entries)
        self._facts: Lru[Fact] = Lru(max_entries)

    def get_image(self, key: str, now: float) -> ImageRecord | None:
        return self._images.get_or_load(key, lambda: self.inner.get_image(key, now),
                                        fresh=lambda record: record.expires_at > now)

    def put_image(self, record: ImageRecord) -> None:
        # Remembered before the shared write: the blobs are stored already, so the record is
        # true even if the shared cache is down, and this instance need not rebuild it.
        self._images.put(record.key, record)
        self.inner.put_image(record)

    def drop_image(self, key: str) -> None:
        self._images.drop(key)
        self.inner.drop_image(key)

    def drop_images_with_blob(self, digest: str) -> list[str]:
        # Dropped here first, so this instance rebuilds even when the shared cache is down.
        # A scan: this happens once per lost blob, and the memory holds at most max_entries images.
        dropped = set(self._images.drop_where(lambda record: digest in record.blobs))
        for key in self.inner.drop_images_with_blob(digest):
            self._images.drop(key)
            dropped.add(key)
        return sorted(dropped)

    def get_layer(self, key: str) -> LayerRecord | None:
        return self._layers.get_or_load(key, lambda: self.inner.get_layer(key),
                                        fresh=lambda record: record.live(time.time()))

    def put_layer(self, record: LayerRecord) -> None:
        self._layers.put(record.key, record)
        self.inner.put_layer(record)

    def claim_build(self, key: str, holder: str, expires_at: float, now: float) -> BuildLease:
        return self.inner.claim_build(key, holder, expires_at, now)

    def renew_build(self, key: str, holder: str, expires_at: float) -> bool:
        return self.inner.renew_build(key, holder, expires_at)

    def get_build(self, key: str) -> BuildLease | None:
        return self.inner.get_build(key)

    def finish_build(self, key: str, holder: str, error: dict | None, remember_until: float) -> None:
        self.inner.finish_build(key, holder, error, remember_until)

    def get_facts(self, kind: str, keys: Sequence[str], now: float) -> dict[str, Fact]:
        found: dict[str, Fact] = {}
        missing = []
        for key in dict.fromkeys(keys):
            held = self._facts.get(f"{kind}\0{key}")
            if held is not None and held.expires_at > now:
                found[key] = held
            else:
                missing.append(key)
        if missing:
            for key, fact in self.inner.get_facts(kind, missing, now).items():
                self._facts.put(f"{kind}\0{key}", fact)
                found[key] = fact
        return found

    def put_facts(self, kind: str, facts: Mapping[str, dict], expires_at: float) -> None:
        # Remembered before the shared write, like images: true even if the shared cache is down.
        for key, value in facts.items():
            self._facts.put(f"{kind}\0{key}", Fact(value, expires_at))
        self.inner.put_facts(kind, facts, expires_at)

    def record_image(self, image: BuiltImage) -> None:
        self.inner.record_image(image)

    def recent_images(self, now: float, limit: int) -> list[BuiltImage]:
        return self.inner.recent_images(now, limit)

    def built_image(self, digest: str, now: float) -> BuiltImage | None:
        return self.inner.built_image(digest, now)

    def record_failure(self, failure: FailedBuild) -> None:
        self.inner.record_failure(failure)

    def recent_failures(self, now: float, limit: int) -> list[FailedBuild]:
        return self.inner.recent_failures(now, limit)

    def report_build(self, key: str, holder: str, progress: BuildProgress) -> None:
        self.inner.report_build(key, holder, progress)

    def builds_in_progress(self, now: float, limit: int) -> list[BuildProgress]:
        return self.inner.builds_in_progress(now, limit)
