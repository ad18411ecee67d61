"""A CycloneDX SBOM of an image's exact runtime closure, made with cyclonedx-python-lib.

One component per store path (name and version from the derivation for requested packages,
parsed from the store path name for the rest), with its NAR hash and size, licenses, description
and homepage where the package set says them, and the references between store paths.
Everything in it comes from the image itself, so the same image gives the same bytes anywhere.
"""
from __future__ import annotations

import base64
import datetime
import re
import uuid

from cyclonedx.model import ExternalReference, ExternalReferenceType, HashAlgorithm, HashType, Property, XsUri
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.dependency import Dependency
from cyclonedx.model.license import DisjunctiveLicense
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from . import nix

MEDIA_TYPE = "application/vnd.cyclonedx+json"
FILE_NAME = "sbom.cdx.json"  # what `oras pull` names the file

_NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
_STORE_NAME = re.compile(r"/nix/store/([0-9a-z]{32})-(.+)")
_SERIAL_NAMESPACE = uuid.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")  # uuid.NAMESPACE_URL


def parse_name(store_path: str) -> tuple[str, str | None]:
    """(name, version) of a store path name the way `builtins.parseDrvName` splits it."""
    match = _STORE_NAME.fullmatch(store_path)
    full = match.group(2) if match else store_path.rsplit("/", 1)[-1]
    parts = full.split("-")
    for i in range(1, len(parts)):
        if parts[i][:1].isdigit():
            return "-".join(parts[:i]), "-".join(parts[i:])
    return full, None


def sha256_hex(nar_hash: str) -> str | None:
    """Nix's `sha256:<nix-base32>` (Nix 2.8) or SRI `sha256-<base64>` (newer Nix) as hex."""
    if nar_hash.startswith("sha256-"):
        try:
            return base64.b64decode(nar_hash[7:], validate=True).hex()
        except ValueError:
            return None
    text = nar_hash.removeprefix("sha256:")
    if re.fullmatch(r"[0-9a-f]{64}", text):
        return text
    if len(text) != 52 or any(c not in _NIX_BASE32 for c in text):
        return None
    out = bytearray(32)
    for n in range(52):
        digit = _NIX_BASE32.index(text[51 - n])
        bit, byte = (n * 5) % 8, (n * 5) // 8
        out[byte] |= (digit << bit) & 0xFF
        if byte + 1 < 32:
            out[byte + 1] |= digit >> (8 - bit)
    return out.hex()


def _component(path: nix.StorePath, info: dict | None, requested: bool) -> Component:
    name, version = parse_name(path.path)
    info = info or {}
    if isinstance(info.get("pname"), str) and info["pname"]:
        name = info["pname"]
    if isinstance(info.get("version"), str) and info["version"]:
        version = info["version"]
    store_hash = _STORE_NAME.fullmatch(path.path)
    purl = PackageURL(type="nix", name=name, version=version,
                      qualifiers={"outputhash": store_hash.group(1)} if store_hash else None)
    properties = [Property(name="nix:store_path", value=path.path), Property(name="nix:nar_size", value=str(path.nar_size))]
    hashes = []
    if path.nar_hash:
        properties.append(Property(name="nix:nar_hash", value=path.nar_hash))
        hex_digest = sha256_hex(path.nar_hash)
        if hex_digest:
            hashes.append(HashType(alg=HashAlgorithm.SHA_256, content=hex_digest))
    licenses = []
    for entry in info.get("licenses") or []:
        if isinstance(entry.get("spdxId"), str) and entry["spdxId"]:
            licenses.append(DisjunctiveLicense(id=entry["spdxId"]))
        elif isinstance(entry.get("name"), str) and entry["name"]:
            licenses.append(DisjunctiveLicense(name=entry["name"]))
    references = []
    if isinstance(info.get("homepage"), str) and info["homepage"]:
        references.append(ExternalReference(type=ExternalReferenceType.WEBSITE, url=XsUri(info["homepage"])))
    description = info.get("description") if isinstance(info.get("description"), str) else None
    return Component(
        name=name, version=version, bom_ref=path.path, purl=purl, hashes=hashes, properties=properties,
        type=ComponentType.APPLICATION if requested else ComponentType.LIBRARY,
        licenses=licenses, description=description or None, external_references=references,
    )


def generate(closure: nix.Closure, title: str, labels: dict[str, str], config_digest: str) -> bytes:
    """The SBOM (CycloneDX 1.6 JSON) of the image whose config is `config_digest`."""
    root_names = {path: name for name, path in closure.roots.items()}
    components = {
        path: _component(info, closure.info.get(root_names[path]) if path in root_names else None, path in root_names)
        for path, info in sorted(closure.paths.items())
    }
    created = datetime.datetime.strptime(labels["org.opencontainers.image.created"], "%Y-%m-%dT%H:%M:%SZ")
    image = Component(
        name=title, type=ComponentType.CONTAINER, bom_ref="image",
        version=labels.get("org.opencontainers.image.revision"),
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=config_digest.removeprefix("sha256:"))],
        properties=[Property(name=key, value=value) for key, value in sorted(labels.items())],
    )
    # The graph as Dependency objects: Bom.register_dependency scans every dependency per call.
    def depends(component: Component, on: list[str]) -> Dependency:
        return Dependency(ref=component.bom_ref, dependencies=[Dependency(ref=components[p].bom_ref) for p in on])

    graph = [depends(image, sorted(set(closure.roots.values())))]
    graph += [depends(components[path], [r for r in info.references if r in components])
              for path, info in sorted(closure.paths.items())]
    bom = Bom(
        components=components.values(),
        # Derived from the image, never random: the same image has the same SBOM bytes.
        serial_number=uuid.uuid5(_SERIAL_NAMESPACE, f"sbom:{config_digest}"),
        metadata=BomMetaData(component=image, timestamp=created.replace(tzinfo=datetime.timezone.utc)),
        dependencies=graph,
    )
    return JsonV1Dot6(bom).output_as_string(indent=None).encode()
