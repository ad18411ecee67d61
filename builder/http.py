"""The registry's HTTP face: the pull side of the distribution spec.

Routes a request, calls the builder or storage, renders every `RegistryError` to the spec's JSON
body (cleaned by `redact.py`) and logs each request once: here and nowhere else. A blob, manifest
or config that storage lost makes its images rebuild (docs/design.md, "Self-healing").
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import traceback
from typing import NoReturn

from werkzeug.exceptions import RequestedRangeNotSatisfiable
from werkzeug.utils import send_file
from werkzeug.wrappers import Request, Response

from . import admission, errors, manifest, names, referrers
from .build import ImageBuilder
from .cache import ImageRecord
from .config import Config, open_cache, open_storage
from .logs import event
from .lru import Lru
from .platforms import IndexBuilder
from .redact import Redactor
from .page import FrontPage
from .storage import LocalFile, Redirect, Storage

# DOTALL: a name holding an encoded control character (%0A) reaches the name check and its 400.
_MANIFEST = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]*)", re.DOTALL)
_BLOB = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]*)", re.DOTALL)
_TAGS = re.compile(r"/v2/(?P<name>.+)/tags/list", re.DOTALL)
_SINGLE_RANGE = re.compile(r"bytes=(?:(?P<first>[0-9]+)-(?P<last>[0-9]*)|-[0-9]+)")
_MAX_TAGS_PAGE = 10_000  # tags/list?n= bound
_LOGGED_PATH = 256  # characters of a request's path that reach the log
_REFERRERS = re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]*)", re.DOTALL)
_MAX_MANIFEST_SIZE = 4 << 20  # larger blobs are layers, never read as manifests
_API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}


def _json(status: int, body: bytes, content_type: str = "application/json", **headers: str) -> Response:
    response = Response(body, status=status, content_type=content_type)
    response.headers.update(_API_HEADERS)
    response.headers.update(headers)
    return response


def _logged_path(path: str) -> dict:
    if len(path) <= _LOGGED_PATH:
        return {"path": path}
    return {"path": path[:_LOGGED_PATH] + "...", "path_length": len(path)}


def _fault(error: BaseException) -> dict:
    """What the log keeps of a 5xx: the message, the cause, and the traceback of our own faults."""
    own = not isinstance(error, errors.RegistryError)
    fields: dict = {"error": f"{type(error).__name__}: {error}" if own else str(error)}
    cause = error.__cause__ or error.__context__
    if cause is not None:
        fields["cause"] = f"{type(cause).__name__}: {cause}"
        own = own or not isinstance(cause, errors.RegistryError)
    if own:
        fields["traceback"] = "".join(traceback.format_exception(error))
    return fields


def _single_valid_range(header: str) -> bool:
    """RFC 9110: a server may ignore a Range it does not understand; only one `bytes=` range is honoured."""
    match = _SINGLE_RANGE.fullmatch(header.strip())
    return match is not None and not (match["first"] and match["last"] and int(match["last"]) < int(match["first"]))


OMITTED_PLATFORMS_HEADER = "Nixery-Omitted-Platforms"


def _note_omitted_platforms(response: Response, index: bytes) -> None:
    """Platforms an index leaves out, and why, as a JSON object in a header clients can show."""
    omitted = manifest.omitted_platforms(index)
    if omitted:
        response.headers[OMITTED_PLATFORMS_HEADER] = json.dumps(omitted, sort_keys=True)


class Registry:
    def __init__(self, config: Config, storage: Storage, builder: ImageBuilder):
        self.config = config
        self.storage = storage
        self.builder = builder
        # Manifests this instance served, by digest, up to MANIFEST_MEMORY_BYTES: a digest names its
        # bytes for ever, so a copy never goes stale, and a warm manifest request skips storage.
        # Bytes are checked against their digest before they are kept.
        self.manifests: Lru[tuple[str, bytes]] = Lru(config.manifest_memory_bytes, weight=lambda item: len(item[1]))
        self.redact = Redactor.from_config(config)
        self.indexes = IndexBuilder(builder, config.platforms, memory_entries=config.memory_cache_entries)
        self.page = FrontPage(config, builder.cache, lambda: builder.resolve_source("latest"), self.redact.text,
                              lambda digest: builder.referrers(digest), storage.read_bytes)

    @classmethod
    def from_config(cls, config: Config, check_storage: bool = True) -> "Registry":
        storage = open_storage(config)
        if check_storage:
            storage.check()
        return cls(config, storage, ImageBuilder(config, storage, open_cache(config)))

    # -- dispatch --------------------------------------------------------

    def error_response(self, error: errors.RegistryError) -> Response:
        return _json(error.status, error.body(self.redact.value), **error.headers)

    def handle(self, request: Request) -> Response:
        started = time.monotonic()
        path = request.path
        fault: dict = {}
        # Who asks, for build admission (admission.py).
        client = admission.CLIENT.set(admission.client_of(request.headers.get("X-Forwarded-For"), request.remote_addr))
        try:
            response = self._route(request, path)
        except errors.RegistryError as e:
            response = self.error_response(e)
            if e.status >= 500:
                fault = _fault(e)
        except Exception as e:  # our own fault: log it whole, tell the client little
            fault = _fault(e)
            response = self.error_response(errors.ServerError("internal server error; see the registry's logs"))
        finally:
            admission.CLIENT.reset(client)
        status = response.status_code
        message = f"{request.method} {status}" + (f": {fault['error']}" if fault else "")
        event("request", message, severity="INFO" if status < 500 else "ERROR", method=request.method,
              **_logged_path(path), status=status, duration=round(time.monotonic() - started, 4), **fault)
        return response

    def _route(self, request: Request, path: str) -> Response:
        if self.page.handles(path):
            return self.page.handle(request, path)
        if not (path == "/v2" or path.startswith("/v2/")):
            raise errors.NameUnknown(f"no such endpoint: {path[:200]}")
        if request.method not in ("GET", "HEAD"):
            raise errors.Unsupported(f"{request.method} is not supported: this registry is pull-only")
        if path in ("/v2", "/v2/"):
            return _json(200, b"{}")
        if match := _MANIFEST.fullmatch(path):
            return self.manifest(request, match["name"], match["reference"])
        if match := _BLOB.fullmatch(path):
            return self.blob(request, match["name"], match["digest"])
        if match := _TAGS.fullmatch(path):
            return self.tags(request, match["name"])
        if match := _REFERRERS.fullmatch(path):
            return self.referrers(request, match["name"], match["digest"])
        raise errors.NameUnknown(f"no such endpoint: {path[:200]}")

    # -- endpoints -------------------------------------------------------

    def manifest(self, request: Request, name: str, reference: str) -> Response:
        if names.is_digest(reference):
            names.check_repository(name, self.config.max_name_length)
            names.check_digest(reference)
            try:
                return self._manifest_by_digest(reference)
            except errors.ManifestUnknown:
                if self.storage.stat(reference) is None:  # gone (not merely no manifest): heal what names it
                    self.builder.forget_blob(reference)
                raise
        if match := referrers.TAG.fullmatch(reference):
            names.check_repository(name, self.config.max_name_length)
            return self.referrers_tag(name, "sha256:" + match[1])
        image = names.parse_image_name(  # checks the repository name
            name, always_include=self.config.always_include, max_packages=self.config.max_packages,
            max_length=self.config.max_name_length,
        )
        names.check_tag(reference)
        accept = request.headers.getlist("Accept")
        if self.indexes.serves(image) and (index_type := manifest.choose_index_type(accept)) is not None:
            build, wanted = (lambda: self.indexes.index(image, reference)), index_type
        else:
            build, wanted = (lambda: self.builder.image(image, reference)), manifest.choose_media_type(accept)
        record = build()
        try:
            return self._image_manifest(record, wanted)
        except errors.ManifestUnknown as e:
            # The cache names an image storage no longer holds whole: build it again, now.
            self.builder.forget_image(record.key, e.message)
        record = build()
        try:
            return self._image_manifest(record, wanted)
        except errors.ManifestUnknown as e:
            raise errors.ServerError(f"storage lost image {image.name} right after it was stored: {e.message}") from e

    def _image_manifest(self, record: ImageRecord, wanted: str) -> Response:
        ref = next((m for m in record.manifests if m.media_type == wanted), record.manifests[0])
        if self.manifests.get(ref.digest) is None:
            media_type, data = self._read_manifest(ref.digest)
            # Read from storage (not this instance's memory): its config must be there too.
            config = json.loads(data).get("config", {}).get("digest")
            if config and self.storage.stat(config) is None:
                raise errors.ManifestUnknown(f"config {config} of manifest {ref.digest} is missing from storage")
            self.manifests.put(ref.digest, (media_type, data))
        return self._manifest_by_digest(ref.digest)

    def _manifest_by_digest(self, digest: str) -> Response:
        media_type, data = self.manifests.get_or_load(digest, lambda: self._read_manifest(digest))
        response = _json(200, data, content_type=media_type, **{"Docker-Content-Digest": digest})
        if media_type in manifest.INDEX_TYPES:
            _note_omitted_platforms(response, data)
        return response

    def _read_manifest(self, digest: str) -> tuple[str, bytes]:
        stat = self.storage.stat(digest)
        data = self.storage.read_bytes(digest) if stat is not None and stat.size <= _MAX_MANIFEST_SIZE else None
        # A layer or config is no manifest, and neither are bytes that do not match their digest.
        intact = data is not None and manifest.digest_of(data) == digest
        media_type = manifest.manifest_media_type(data) if intact else None
        if media_type is None:
            raise errors.ManifestUnknown(f"manifest {digest} is not known to this registry", {"digest": digest})
        return media_type, data

    def blob(self, request: Request, name: str, digest: str) -> Response:
        names.check_repository(name, self.config.max_name_length)
        names.check_digest(digest)
        if request.method == "HEAD":
            stat = self.storage.stat(digest)
            if stat is None:
                self._blob_unknown(digest)
            response = _json(200, b"", content_type="application/octet-stream", **{"Docker-Content-Digest": digest})
            response.headers["Content-Length"] = str(stat.size)
            return response
        location = self.storage.locate(digest)
        if location is None:
            self._blob_unknown(digest)
        if isinstance(location, Redirect):
            response = _json(307, b"", content_type="application/octet-stream",
                             **{"Docker-Content-Digest": digest, "Location": location.url})
            return response
        assert isinstance(location, LocalFile)
        if not _single_valid_range(request.headers.get("Range", "bytes=0-")):
            request.environ.pop("HTTP_RANGE", None)  # answered with the whole blob
        try:
            response = send_file(location.path, request.environ, mimetype="application/octet-stream",
                                 conditional=True, etag=digest, max_age=31536000)
        except RequestedRangeNotSatisfiable:
            raise errors.RangeInvalid(
                f"range {request.headers.get('Range', '')[:100]!r} is not satisfiable for a blob of {location.size} bytes"
            ) from None
        response.headers.update(_API_HEADERS)
        response.headers["Docker-Content-Digest"] = digest
        return response

    def _blob_unknown(self, digest: str) -> NoReturn:
        # Images naming a blob storage lost (or damaged) are rebuilt at their next request.
        self.builder.forget_blob(digest)
        raise errors.BlobUnknown(f"blob {digest} is not known to this registry", {"digest": digest})

    def tags(self, request: Request, name: str) -> Response:
        names.check_repository(name, self.config.max_name_length)
        tags = ["latest"]
        last = request.args.get("last")
        if last:
            tags = [t for t in tags if t > last]
        n = request.args.get("n")
        if n is not None:
            # ASCII digits only: str.isdigit() would let "²" through to int().
            if not re.fullmatch(r"[0-9]{1,6}", n) or int(n) > _MAX_TAGS_PAGE:
                raise errors.PaginationNumberInvalid(f"n must be a whole number from 0 to {_MAX_TAGS_PAGE}, not {n[:20]!r}")
            tags = tags[: int(n)]
        return _json(200, json.dumps({"name": name, "tags": tags}).encode())

    # -- referrers (OCI 1.1) ---------------------------------------------

    def referrers(self, request: Request, name: str, digest: str) -> Response:
        """The referrers API: an index of the artifacts whose subject is `digest`, empty when none."""
        names.check_repository(name, self.config.max_name_length)
        names.check_digest(digest)
        artifact_type = request.args.get("artifactType") or None
        body = referrers.index(self.builder.referrers(digest), artifact_type)
        headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type else {}
        return _json(200, body, content_type=referrers.INDEX_MEDIA_TYPE, **headers)

    def referrers_tag(self, name: str, digest: str) -> Response:
        """The referrers tag schema (`sha256-<hex>`), for clients without the referrers API: 404 when none."""
        found = self.builder.referrers(digest)
        if not found:
            raise errors.ManifestUnknown(f"no referrers of {digest}", {"digest": digest})
        body = referrers.index(found)
        return _json(200, body, content_type=referrers.INDEX_MEDIA_TYPE,
                     **{"Docker-Content-Digest": manifest.digest_of(body)})


class RegistryPerProcess:
    """One `Registry` per process, the first one made, and its storage checked, right away.

    The server (gunicorn) imports the function once, then forks its worker processes.
    Storage and cache clients hold connections (HTTP pools, gRPC channels) that must not
    be shared between processes: a forked worker makes its own on its first request,
    without network calls (the storage was checked before the fork), so it cannot fail there.
    """

    def __init__(self, config: Config):
        self._config = config
        self._lock = threading.Lock()
        self._registry: Registry | None = Registry.from_config(config)
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()  # a lock held at the fork would stay held in the child
        self._registry = None

    def shutdown(self) -> None:
        """This process is stopping: end its builds and give their leases back."""
        registry = self._registry
        if registry is not None:
            registry.builder.shutdown()

    def get(self) -> Registry:
        registry = self._registry
        if registry is None:
            with self._lock:
                if self._registry is None:
                    self._registry = Registry.from_config(self._config, check_storage=False)
                registry = self._registry
        return registry
