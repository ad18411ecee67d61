"""OCI 1.1 referrers: artifact manifests whose `subject` is an image manifest, and their index.

An image's SBOM is served as an artifact manifest (an empty config, the SBOM as its one layer)
per image manifest; `GET /v2/<name>/referrers/<digest>` and the referrers tag schema
(`sha256-<hex>`) answer an image index of them. Which artifacts refer to a manifest is kept in
the cache as facts of kind `referrers`, keyed by the subject's digest.
"""
from __future__ import annotations

import base64
import json
import re
from typing import Iterable

from . import manifest

INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_CONFIG = b"{}"
EMPTY_DIGEST = manifest.digest_of(EMPTY_CONFIG)
FACT_KIND = "referrers"
# Referrers outlive the image's cache record: its manifests stay pullable by digest (for as long
# as storage keeps blobs: LAYER_EXPIRY_DAYS shortens this).
FACT_TTL = 10 * 365 * 24 * 3600
# The referrers tag schema: clients without the referrers API look for this tag.
TAG = re.compile(r"sha256-([a-f0-9]{64})")


def artifact_manifest(subject: manifest.Blob, subject_media_type: str, artifact_type: str,
                      blob: manifest.Blob, file_name: str, annotations: dict[str, str]) -> bytes:
    """An OCI image manifest carrying one artifact blob and pointing at `subject`."""
    document = {
        "schemaVersion": 2,
        "mediaType": manifest.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_CONFIG),
                   "data": base64.b64encode(EMPTY_CONFIG).decode()},
        "layers": [{"mediaType": artifact_type, "digest": blob.digest, "size": blob.size,
                    "annotations": {"org.opencontainers.image.title": file_name}}],
        "subject": {"mediaType": subject_media_type, "digest": subject.digest, "size": subject.size},
        "annotations": dict(sorted(annotations.items())),
    }
    return json.dumps(document, indent=3).encode()


def descriptor(data: bytes, artifact_type: str, annotations: dict[str, str]) -> dict:
    """How a referrers index lists the artifact manifest `data`."""
    return {"mediaType": manifest.OCI_MANIFEST, "digest": manifest.digest_of(data), "size": len(data),
            "artifactType": artifact_type, "annotations": dict(sorted(annotations.items()))}


def index(descriptors: Iterable[dict], artifact_type: str | None = None) -> bytes:
    """The image index of `descriptors`, only those of `artifact_type` when one is given."""
    chosen = [d for d in descriptors if artifact_type is None or d.get("artifactType") == artifact_type]
    chosen.sort(key=lambda d: d["digest"])
    return json.dumps({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": chosen}, indent=3).encode()
