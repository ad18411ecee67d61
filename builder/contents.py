"""What an image holds besides its packages: users, the run-time user, the default command.

Every image has /etc/passwd, /etc/group (root, nobody) and nsswitch.conf, which win over a
package's own; the `nonroot` meta-package adds user 65532 and runs as it; `Cmd` (never
`Entrypoint`) is `bash` with the shell, else a single package's `meta.mainProgram`, else none;
labels and annotations carry the OCI provenance keys. In full: docs/design.md, "Image contents".
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from . import archive, manifest, names, redact
from .nix import store_path_on_disk
from .sources import PackageSource

NONROOT_ID = 65532
NONROOT_HOME = "/home/nonroot"
NOBODY_ID = 65534

_PROGRAM = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class RunSettings:
    """The parts of the image config that say how the image runs."""

    env: tuple[str, ...]
    cmd: tuple[str, ...] | None
    user: str | None  # "uid:gid", or None for root


def user_entries(nonroot: bool) -> list[archive.Entry]:
    """The customisation layer's own files: users, groups, name-service switch, the non-root home."""
    passwd = ["root:x:0:0:root:/root:/bin/sh", f"nobody:x:{NOBODY_ID}:{NOBODY_ID}:nobody:/var/empty:/bin/false"]
    group = ["root:x:0:", f"nobody:x:{NOBODY_ID}:"]
    entries = [archive.Entry("root", "dir", mode=0o700)]
    if nonroot:
        passwd.append(f"nonroot:x:{NONROOT_ID}:{NONROOT_ID}:nonroot:{NONROOT_HOME}:/bin/sh")
        group.append(f"nonroot:x:{NONROOT_ID}:")
        entries.append(archive.Entry(NONROOT_HOME.lstrip("/"), "dir", mode=0o755, uid=NONROOT_ID, gid=NONROOT_ID))
    nsswitch = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    entries += [
        archive.Entry("etc/passwd", "file", mode=0o644, data=("\n".join(passwd) + "\n").encode()),
        archive.Entry("etc/group", "file", mode=0o644, data=("\n".join(group) + "\n").encode()),
        archive.Entry("etc/nsswitch.conf", "file", mode=0o644, data=nsswitch.encode()),
    ]
    return entries


def main_program(request: names.ImageRequest, roots: dict[str, str], info: dict[str, dict],
                 store_root: str = "/") -> str | None:
    """The one requested package's `meta.mainProgram`, as a path in the store, when it has one."""
    if len(request.requested) != 1:
        return None
    name = request.requested[0]
    program = (info.get(name) or {}).get("mainProgram")
    if not isinstance(program, str) or not _PROGRAM.fullmatch(program) or name not in roots:
        return None
    path = f"{roots[name]}/bin/{program}"
    # A mainProgram the package does not ship would be a command that cannot start.
    if not os.path.lexists(store_path_on_disk(path, store_root)):
        return None
    return path


def run_settings(request: names.ImageRequest, roots: dict[str, str], info: dict[str, dict],
                 store_root: str = "/") -> RunSettings:
    lowered = {p.lower() for p in request.packages}
    env = ["PATH=/bin:/usr/bin"]
    if "cacert" in lowered:
        env.append("SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt")
    if request.nonroot:
        env.append(f"HOME={NONROOT_HOME}")
    if "bashinteractive" in lowered:
        cmd: tuple[str, ...] | None = ("bash",)
    else:
        program = main_program(request, roots, info, store_root)
        cmd = (program,) if program else None
    user = f"{NONROOT_ID}:{NONROOT_ID}" if request.nonroot else None
    return RunSettings(tuple(env), cmd, user)


_LICENSE_REF = re.compile(r"[^A-Za-z0-9.-]+")


def license_expression(licenses: list[dict]) -> str | None:
    """An SPDX expression for nixpkgs' `meta.license` (one or a list, all of which apply).

    A license without an SPDX id (nixpkgs' `unfree`, say) becomes a `LicenseRef-` of its name.
    """
    terms = []
    for entry in licenses:
        spdx, name = entry.get("spdxId"), entry.get("name")
        if isinstance(spdx, str) and spdx:
            terms.append(spdx)
        elif isinstance(name, str) and _LICENSE_REF.sub("-", name).strip("-"):
            terms.append("LicenseRef-" + _LICENSE_REF.sub("-", name).strip("-"))
    if not terms:
        return None
    unique = list(dict.fromkeys(terms))
    return unique[0] if len(unique) == 1 else " AND ".join(f"({t})" if " " in t else t for t in unique)


def created(source_time: int | None) -> str:
    if source_time is None or source_time <= 0:
        return manifest.CREATED
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(source_time))


def provenance(request: names.ImageRequest, source: PackageSource, info: dict[str, dict],
               source_time: int | None) -> dict[str, str]:
    """The OCI image-spec annotation keys this image's config labels and manifest carry."""
    labels = {
        "org.opencontainers.image.title": request.title,
        "org.opencontainers.image.created": created(source_time),
    }
    if source.revision:
        labels["org.opencontainers.image.revision"] = source.revision
    if source.kind != "path":
        # A private repository's URL may carry a token: images are public, tokens are not.
        labels["org.opencontainers.image.source"] = redact.without_credentials(source.location)
    if len(request.requested) == 1:
        package = info.get(request.requested[0]) or {}
        if isinstance(package.get("version"), str) and package["version"]:
            labels["org.opencontainers.image.version"] = package["version"]
        expression = license_expression(package.get("licenses") or [])
        if expression:
            labels["org.opencontainers.image.licenses"] = expression
        if isinstance(package.get("description"), str) and package["description"]:
            labels["org.opencontainers.image.description"] = package["description"]
        if isinstance(package.get("homepage"), str) and package["homepage"]:
            labels["org.opencontainers.image.url"] = package["homepage"]
    return dict(sorted(labels.items()))
