"""Image config and manifests, in Docker schema2 and OCI flavours.

Both flavours point at the same blobs (the config JSON is valid for both), so
one build serves every client; the flavour is chosen per request from the
client's Accept headers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)

_CONFIG_TYPE = {
    DOCKER_MANIFEST: "application/vnd.docker.container.image.v1+json",
    OCI_MANIFEST: "application/vnd.oci.image.config.v1+json",
}
_LAYER_TYPE = {
    (DOCKER_MANIFEST, "tar+gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    (DOCKER_MANIFEST, "tar"): "application/vnd.docker.image.rootfs.diff.tar",
    (OCI_MANIFEST, "tar+gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    (OCI_MANIFEST, "tar"): "application/vnd.oci.image.layer.v1.tar",
    # Docker's schema2 has no zstd layer type: zstd images come as OCI manifests only.
    (OCI_MANIFEST, "tar+zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
}


def manifest_types(layer_format: str) -> tuple[str, ...]:
    """The manifest flavours that can describe layers of `layer_format` ("tar+gzip", "tar+zstd", "tar")."""
    return tuple(t for t in MANIFEST_TYPES if (t, layer_format) in _LAYER_TYPE)

# A fixed creation time keeps the config, and so every digest, reproducible; images of a
# package set whose commit time is known are created then (see contents.created).
CREATED = "1970-01-01T00:00:01Z"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class Layer(Blob):
    diff_id: str  # digest of the uncompressed tar
    format: str  # archive.MEDIA_SUFFIX: "tar+gzip" | "tar+zstd" | "tar"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(layers: Sequence[Layer], architecture: str, env: Sequence[str], cmd: Sequence[str] | None,
                 user: str | None = None, labels: Mapping[str, str] | None = None, created: str = CREATED) -> bytes:
    config: dict = {"Env": list(env)}
    if cmd:
        config["Cmd"] = list(cmd)
    if user:
        config["User"] = user
    if labels:
        config["Labels"] = dict(labels)
    document = {
        "architecture": architecture,
        "os": "linux",
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def image_manifest(media_type: str, config: Blob, layers: Sequence[Layer],
                   annotations: Mapping[str, str] | None = None) -> bytes:
    """A manifest of `media_type`; `annotations` go into OCI manifests (schema2 has no such field)."""
    document: dict = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": _CONFIG_TYPE[media_type], "digest": config.digest, "size": config.size},
        "layers": [
            {"mediaType": _LAYER_TYPE[(media_type, layer.format)], "digest": layer.digest, "size": layer.size}
            for layer in layers
        ],
    }
    if annotations and media_type == OCI_MANIFEST:
        document["annotations"] = dict(sorted(annotations.items()))
    return json.dumps(document, indent=3).encode()


def manifest_media_type(data: bytes) -> str | None:
    """The media type a stored manifest declares, or None when the bytes are not one of ours."""
    try:
        document = json.loads(data)
    except ValueError:
        return None
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return media_type if media_type in MANIFEST_TYPES + INDEX_TYPES else None


def _accepted(accept_headers: Iterable[str]) -> list[tuple[float, int, str]]:
    """(-quality, position, media type) for every type the Accept lines allow (q > 0).

    Go clients send one Accept line per type, others one comma-separated line: all are read.
    """
    accepted: list[tuple[float, int, str]] = []
    position = 0
    for header in accept_headers:
        for item in header.split(","):
            parts = [p.strip() for p in item.split(";")]
            media_type, quality = parts[0].lower(), 1.0
            for parameter in parts[1:]:
                if parameter.startswith("q="):
                    try:
                        quality = float(parameter[2:])
                    except ValueError:
                        quality = 0.0
            position += 1
            if quality > 0:
                accepted.append((-quality, position, media_type))
    return accepted


def choose_media_type(accept_headers: Iterable[str]) -> str:
    """The manifest flavour to serve for these Accept header lines.

    The client's first acceptable type wins (highest q first); without a usable
    Accept, Docker schema2 is what every client understands.
    """
    candidates = [c for c in _accepted(accept_headers) if c[2] in MANIFEST_TYPES]
    return min(candidates)[2] if candidates else DOCKER_MANIFEST


# -- image indexes: one name, an image per platform ----------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Each index flavour lists the image manifests of its own family.
INDEX_ENTRY_TYPE = {OCI_INDEX: OCI_MANIFEST, DOCKER_MANIFEST_LIST: DOCKER_MANIFEST}
# Why platforms are missing from an index: a JSON object, platform -> message.
OMITTED_PLATFORMS_ANNOTATION = "nixery.omitted-platforms"


@dataclass(frozen=True)
class IndexEntry:
    platform: str  # "linux/arm64"
    digest: str
    size: int


def choose_index_type(accept_headers: Iterable[str]) -> str | None:
    """The index flavour a client accepts (the OCI one whenever OCI's is accepted), or None."""
    accepted = {media_type for _, _, media_type in _accepted(accept_headers)}
    return next((t for t in INDEX_TYPES if t in accepted), None)


def image_index(media_type: str, entries: Sequence[IndexEntry], omitted: dict[str, str]) -> bytes:
    """An OCI image index or Docker manifest list of `entries`, noting the omitted platforms."""
    document: dict = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            {
                "mediaType": INDEX_ENTRY_TYPE[media_type],
                "digest": entry.digest,
                "size": entry.size,
                "platform": {"architecture": entry.platform.split("/", 1)[1], "os": entry.platform.split("/", 1)[0]},
            }
            for entry in entries
        ],
    }
    if omitted:
        document["annotations"] = {OMITTED_PLATFORMS_ANNOTATION: json.dumps(omitted, sort_keys=True)}
    return json.dumps(document, indent=3).encode()


def omitted_platforms(data: bytes) -> dict[str, str]:
    """Platform -> why it is missing, as noted in an index built by `image_index`."""
    try:
        note = json.loads(data).get("annotations", {}).get(OMITTED_PLATFORMS_ANNOTATION)
        omitted = json.loads(note) if note else {}
    except (ValueError, AttributeError, TypeError):
        return {}
    return omitted if isinstance(omitted, dict) else {}
