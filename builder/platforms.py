"""Image indexes: one image name for every platform (PLATFORMS).

Each entry is the very image its platform's name (`arm64/<name>`) returns, built and
cached by `ImageBuilder.image`, all platforms at once; a failing platform is left out
and named in the index, the request fails only when all do. Why: docs/design.md.
"""
from __future__ import annotations

import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

from . import errors, manifest, names, sources
from .build import ImageBuilder
from .coordination import SingleFlight
from .cache import ImageRecord, ManifestRef
from .lru import Lru

# The longest reason for an omitted platform that an index notes.
OMISSION_MAX_CHARS = 300


def index_key(images: dict[str, names.ImageRequest | errors.RegistryError], source_identity: str) -> str:
    """The cache key of an index: its entries' image keys, in order (never equal to an image key)."""
    entries = [names.image_key(image, source_identity) if isinstance(image, names.ImageRequest) else platform
               for platform, image in images.items()]
    return json.dumps(["index", *entries], separators=(",", ":"))


def _one_line(message: str) -> str:
    text = " / ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= OMISSION_MAX_CHARS else text[: OMISSION_MAX_CHARS - 3].rstrip() + "..."


def _all_failed(failures: dict[str, errors.RegistryError]) -> errors.RegistryError:
    """One error for a request no platform could serve, naming each platform's error."""
    first = next(iter(failures.values()))
    if all(type(e) is type(first) and e.message == first.message and e.detail == first.detail
           for e in failures.values()):
        return type(first)(f"{', '.join(failures)}: {first.message}", first.detail)
    message = "\n".join(f"{platform}: {e.message}" for platform, e in failures.items())
    detail = {"platforms": {platform: {"code": e.code, "message": e.message, "detail": e.detail}
                            for platform, e in failures.items()}}
    kinds = {type(e) for e in failures.values()}
    if len(kinds) == 1:
        return first.__class__(message, detail)
    # The name is at fault somewhere (a package missing everywhere it was asked for): a 404.
    if any(e.status < 500 for e in failures.values()):
        return errors.ManifestUnknown(message, detail)
    return errors.ServerError(message, detail)


class IndexBuilder:
    def __init__(self, builder: ImageBuilder, platforms: tuple[str, ...], *, memory_entries: int):
        self.builder = builder
        self.platforms = platforms
        self._in_flight: SingleFlight[ImageRecord] = SingleFlight()
        # (name, source identity) -> the platforms' images and the index key: what every warm
        # by-tag request would otherwise parse and hash again for each platform. One entry per
        # image name, bounded like the instance's memory of image records (MEMORY_CACHE_ENTRIES).
        self._named: Lru[tuple[dict, str]] = Lru(memory_entries)

    def serves(self, request: names.ImageRequest) -> bool:
        """Whether this name gets an index: platforms are configured and the name chose none."""
        return bool(self.platforms) and not names.names_platform(request)

    def index(self, request: names.ImageRequest, tag: str) -> ImageRecord:
        """The index of `request` under `tag`: one manifest per index flavour."""
        source = self.builder.resolve_source(tag)
        images, key = self._named.get_or_load(f"{source.identity}\n{request.name}",
                                              lambda: self._named_and_keyed(request, source.identity))
        record = self.builder.cached_image(key)
        if record is not None:
            return record
        return self._in_flight.run(key, lambda: self._assemble(request, images, tag, source, key))

    def _named_and_keyed(self, request: names.ImageRequest, identity: str) -> tuple[dict, str]:
        images = self._images_named(request)
        return images, index_key(images, identity)

    def _images_named(self, request: names.ImageRequest) -> dict[str, names.ImageRequest | errors.RegistryError]:
        """Platform -> the image its name (`arm64/<name>`) asks for: the same request, key and digest."""
        config = self.builder.config
        images: dict[str, names.ImageRequest | errors.RegistryError] = {}
        for platform in self.platforms:
            try:
                images[platform] = names.parse_image_name(
                    names.platform_name(request.name, platform), always_include=config.always_include,
                    max_packages=config.max_packages, max_length=config.max_name_length)
            except errors.RegistryError as e:  # the longer name may exceed a bound: that platform only
                images[platform] = e
        return images

    def _images(self, images: dict[str, names.ImageRequest | errors.RegistryError],
                tag: str) -> dict[str, ImageRecord | errors.RegistryError]:
        """Every platform's image (or why not), built at the same time."""
        def one(platform: str) -> ImageRecord | errors.RegistryError:
            image = images[platform]
            if isinstance(image, errors.RegistryError):
                return image
            try:
                return self.builder.image(image, tag)
            except errors.RegistryError as e:
                return e
            except Exception as e:  # our own fault: logged whole, the other platforms still served
                self.builder.log("index-platform-error", f"{image.name}: {e}", severity="ERROR",
                                 traceback=traceback.format_exc())
                return errors.ServerError("internal server error; see the registry's logs")

        with ThreadPoolExecutor(max_workers=len(self.platforms), thread_name_prefix="platform") as pool:
            return dict(zip(self.platforms, pool.map(one, self.platforms)))

    def _assemble(self, request: names.ImageRequest, images_named: dict, tag: str,
                  source: sources.PackageSource, key: str) -> ImageRecord:
        results = self._images(images_named, tag)
        images = {p: r for p, r in results.items() if isinstance(r, ImageRecord)}
        failures = {p: r for p, r in results.items() if not isinstance(r, ImageRecord)}
        if not images:
            raise _all_failed(failures)
        omitted = {platform: _one_line(e.message) for platform, e in failures.items()}
        refs = []
        for media_type in manifest.INDEX_TYPES:
            entry_type = manifest.INDEX_ENTRY_TYPE[media_type]
            if not all(any(m.media_type == entry_type for m in image.manifests) for image in images.values()):
                continue  # zstd images have no Docker schema2 manifest, so no Docker manifest list either
            entries = []
            for platform, image in images.items():
                ref = next(m for m in image.manifests if m.media_type == entry_type)
                entries.append(manifest.IndexEntry(platform, ref.digest, ref.size))
            data = manifest.image_index(media_type, entries, omitted)
            digest = manifest.digest_of(data)
            self.builder.storage.put_bytes(digest, data, media_type)
            refs.append(ManifestRef(digest, len(data), media_type))
        now = time.time()
        # No longer than its entries live; a platform left out is tried again once its failure is forgotten.
        expires_at = min(image.expires_at for image in images.values())
        if failures:
            expires_at = min(expires_at, now + self.builder.config.failure_ttl)
        # Every blob of every entry: a lost layer drops the index with the images that hold it.
        blobs = tuple(dict.fromkeys(digest for image in images.values()
                                    for digest in (*(m.digest for m in image.manifests), *image.blobs)))
        record = ImageRecord(key, tuple(refs), source.identity, now, expires_at, blobs)
        if omitted:
            self.builder.log("index-partial", f"index of {request.name} leaves out {', '.join(omitted)}",
                             severity="WARNING", image=request.name, omitted=omitted)
        try:  # written last: every blob of every entry, and the index itself, are stored by now
            self.builder.cache.put_image(record)
        except Exception as e:  # the cache is an optimisation
            self.builder.log("cache-degraded", f"cache index write failed: {e}", severity="WARNING",
                             error=type(e).__name__)
        return record
