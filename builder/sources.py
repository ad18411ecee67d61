"""Package sources: which package set an image tag means.

Nixery's three ways to name a package set, one per variable:

- NIXERY_PKGS_PATH: a local directory. Only the tag `latest` exists.
- NIXERY_PKGS_REPO: a git repository. `latest` is the default branch's HEAD;
  a branch or tag name resolves (with `git ls-remote`) to its commit; a
  40-hex tag is that commit.
- NIXERY_CHANNEL: a nixpkgs channel (or commit) fetched as a GitHub tarball.
  `latest` is the channel; a 40-hex tag is that nixpkgs commit.

Anything else is an unknown tag (MANIFEST_UNKNOWN), never a server error.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from .errors import ManifestUnknown, ServerError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
NIXPKGS_ARCHIVE = "https://github.com/NixOS/nixpkgs/archive/{}.tar.gz"
LS_REMOTE_TIMEOUT = 60


@dataclass(frozen=True)
class PackageSource:
    kind: str  # "path" | "git" | "channel"
    location: str  # path, repo url, or tarball url
    revision: str | None  # git commit (40 hex) or None
    identity: str  # unambiguous identity for cache keys
    # The identity names content that never changes (a commit), so cache
    # entries keyed by it may live longer.
    pinned: bool
    ref: str | None = None  # git: the ref the commit was found under, which helps fetchGit find it

    def to_nix(self) -> dict:
        """The source description nix/image.nix receives as JSON."""
        if self.kind == "path":
            return {"kind": "path", "path": self.location}
        if self.kind == "git":
            return {"kind": "git", "url": self.location, "rev": self.revision, "ref": self.ref}
        return {"kind": "channel", "url": self.location}


def resolve(tag: str, *, channel: str | None, pkgs_repo: str | None, pkgs_path: str | None) -> PackageSource:
    """The package source image tag `tag` means under the configured source."""
    if not TAG.match(tag):
        raise ManifestUnknown(f"unknown tag {tag!r}")
    if pkgs_path:
        if tag != "latest":
            raise ManifestUnknown(f"unknown tag {tag!r}: a local package set only has the tag 'latest'")
        path = os.path.abspath(pkgs_path)
        return PackageSource("path", path, None, f"path:{path}", pinned=False)
    if pkgs_repo:
        return _git(tag, pkgs_repo)
    if channel:
        return _channel(tag, channel)
    raise ServerError("configuration: no package source")


def _channel(tag: str, channel: str) -> PackageSource:
    if tag == "latest":
        name = channel
    elif COMMIT.match(tag):
        name = tag
    else:
        raise ManifestUnknown(f"unknown tag {tag!r}: use 'latest' or a nixpkgs commit")
    if "://" in name:  # a full tarball URL instead of a channel name
        return PackageSource("channel", name, None, f"channel:{name}", pinned=False)
    pinned = bool(COMMIT.match(name))
    return PackageSource(
        "channel",
        NIXPKGS_ARCHIVE.format(name),
        name if pinned else None,
        f"channel:{name}",
        pinned=pinned,
    )


def _git(tag: str, repo: str) -> PackageSource:
    if COMMIT.match(tag):
        commit, ref = tag, None
    elif tag == "latest":
        commit, ref = _ls_remote(repo, "HEAD"), None
        if commit is None:
            raise ServerError(f"package repository {repo} has no HEAD")
    else:
        # A branch wins over a tag of the same name; an annotated tag is
        # peeled (`^{}`) to the commit it points at.
        refs = _ls_remote_all(repo, [f"refs/heads/{tag}", f"refs/tags/{tag}", f"refs/tags/{tag}^{{}}"])
        for name in (f"refs/heads/{tag}", f"refs/tags/{tag}^{{}}", f"refs/tags/{tag}"):
            if name in refs:
                commit, ref = refs[name], name.removesuffix("^{}")
                break
        else:
            raise ManifestUnknown(f"unknown tag {tag!r}: no such branch, tag or commit in the package repository")
    return PackageSource("git", repo, commit, f"git:{repo}@{commit}", pinned=True, ref=ref)


def _ls_remote(repo: str, ref: str) -> str | None:
    return _ls_remote_all(repo, [ref]).get(ref)


def _ls_remote_all(repo: str, patterns: list[str]) -> dict[str, str]:
    # Arguments go as a list, never through a shell; the tag grammar forbids
    # a leading '-', and `--` ends the options before the repository anyway.
    args = ["git", "ls-remote", "--", repo, *patterns]
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=LS_REMOTE_TIMEOUT, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServerError(f"cannot list the package repository: {e}") from None
    if result.returncode != 0:
        raise ServerError("cannot list the package repository: " + result.stderr.strip()[-500:])
    refs: dict[str, str] = {}
    for line in result.stdout.splitlines():
        commit, _, name = line.partition("\t")
        # ls-remote patterns match any ref ending in the pattern; keep exact ones.
        if name in patterns and COMMIT.match(commit):
            refs[name] = commit
    return refs
