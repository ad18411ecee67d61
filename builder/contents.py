"""What an image holds besides its packages: users, the run-time user, the default command.

The rules, in one place (README "What an image contains"):

- Every image has `/etc/passwd` and `/etc/group` with `root` (0) and `nobody`
  (65534), and an `/etc/nsswitch.conf` that looks users, groups and hosts up in
  those files (what nixpkgs' dockerTools.fakeNss gives), so programs that ask
  who they run as get an answer. These generated files win over a requested
  package's own `/etc/passwd`, `/etc/group` or `/etc/nsswitch.conf`: the image
  config's `User` must name a user the image has, whatever the packages ship.
- The `nonroot` meta-package adds user and group `nonroot` (65532, as
  distroless images have it) with the home `/home/nonroot` owned by it, and the
  config runs as `65532:65532` with `HOME=/home/nonroot`. Other images run as
  root, as Nixery's do.
- The default command (`Cmd`, never `Entrypoint`, so `docker run IMAGE prog
  args` still runs `prog`): `bash` when the image has the shell; otherwise,
  for an image with exactly one requested package whose `meta.mainProgram`
  names a program in its `bin/`, that program; otherwise none.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from . import archive, names

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
    if not os.path.lexists(os.path.join(store_root, path.lstrip("/"))):
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
