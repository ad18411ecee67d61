"""Package sources: which package set an image tag means.

One of NIXERY_PKGS_PATH (a directory: only `latest`), NIXERY_PKGS_REPO (a git repository:
branches, tags, commits) or NIXERY_CHANNEL (a nixpkgs channel or commit). Each tag resolves to a
`revision` naming the exact content (a commit, or a local path's content hash); anything else is
an unknown tag (MANIFEST_UNKNOWN), never a server error. Details: docs/design.md.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from .errors import ManifestUnknown, ServerError
from .names import check_tag

COMMIT = re.compile(r"^[0-9a-f]{40}$")
NIXPKGS_ARCHIVE = "https://github.com/NixOS/nixpkgs/archive/{rev}.tar.gz"
NIXPKGS_CHANNELS = "https://channels.nixos.org"
LS_REMOTE_TIMEOUT = 60
CHANNEL_TIMEOUT = 30

# `remember(key, lookup)`: the shared answer for a moving reference (a channel or branch),
# calling `lookup()` only when nobody has a live one. The default asks every time.
Remember = Callable[[str, Callable[[], dict]], dict]


def _ask(key: str, lookup: Callable[[], dict]) -> dict:
    return lookup()


@dataclass(frozen=True)
class PackageSource:
    kind: str  # "path" | "git" | "channel"
    location: str  # path, repo url, or tarball url
    # What the content is: a commit (40 hex) for git and channels, "sha256:<hex>" of the
    # files of a local path; None only for a channel given as a bare tarball URL.
    revision: str | None
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


def resolve(tag: str, *, channel: str | None, pkgs_repo: str | None, pkgs_path: str | None,
            remember: Remember = _ask, channels_url: str = NIXPKGS_CHANNELS,
            archive_url: str = NIXPKGS_ARCHIVE) -> PackageSource:
    """The package source image tag `tag` means under the configured source.

    `remember` shares the commits moving references point at (see `Remember`);
    `channels_url` serves `<channel>/git-revision`, `archive_url` the tarball of `{rev}`.
    """
    check_tag(tag)  # the grammar keeps a tag from reaching git as an option
    if pkgs_path:
        if tag != "latest":
            raise ManifestUnknown(f"unknown tag {tag!r}: a local package set only has the tag 'latest'")
        path = os.path.abspath(pkgs_path)
        digest = content_hash(path, recheck_after=PATH_RECHECK_SECONDS)
        return PackageSource("path", path, digest, f"path:{path}@{digest}", pinned=False)
    if pkgs_repo:
        return _git(tag, pkgs_repo, remember)
    if channel:
        return _channel(tag, channel, remember, channels_url, archive_url)
    raise ServerError("configuration: no package source")


def _channel(tag: str, channel: str, remember: Remember, channels_url: str, archive_url: str) -> PackageSource:
    if tag == "latest":
        name = channel
    elif COMMIT.match(tag):
        name = tag
    else:
        raise ManifestUnknown(f"unknown tag {tag!r}: use 'latest' or a nixpkgs commit")
    if "://" in name:  # a full tarball URL instead of a channel name: no commit to name
        return PackageSource("channel", name, None, f"channel:{name}", pinned=False)
    if COMMIT.match(name):
        commit = name
    else:
        try:
            commit = remember(f"channel:{channels_url}/{name}",
                              lambda: {"revision": channel_revision(channels_url, name)})["revision"]
        except (KeyError, TypeError):
            raise ServerError(f"cannot resolve channel {name!r}: unreadable shared record") from None
    # By commit: the tarball and everything built from it never change.
    return PackageSource("channel", archive_url.format(rev=commit), commit, f"channel:{commit}", pinned=True)


def channel_revision(channels_url: str, name: str) -> str:
    """The nixpkgs commit channel `name` is at: the channel's `git-revision` file."""
    url = f"{channels_url.rstrip('/')}/{name}/git-revision"
    try:
        with urllib.request.urlopen(url, timeout=CHANNEL_TIMEOUT) as response:
            text = response.read(200).decode("ascii", "replace").strip()
    except (OSError, urllib.error.URLError, ValueError) as e:
        raise ServerError(f"cannot resolve channel {name!r} to a commit: {e}") from None
    if not COMMIT.match(text):
        raise ServerError(f"cannot resolve channel {name!r} to a commit: {url} holds no commit")
    return text


def _git(tag: str, repo: str, remember: Remember) -> PackageSource:
    if COMMIT.match(tag):
        return PackageSource("git", repo, tag, f"git:{repo}@{tag}", pinned=True)
    try:
        found = remember(f"git:{repo}#{tag}", lambda: _git_ref(tag, repo))
        commit, ref = found["revision"], found.get("ref")
    except (KeyError, TypeError):
        raise ServerError(f"cannot resolve {tag!r}: unreadable shared record") from None
    return PackageSource("git", repo, commit, f"git:{repo}@{commit}", pinned=True, ref=ref)


def _git_ref(tag: str, repo: str) -> dict:
    """{"revision": commit, "ref": the ref it was found under or None} of branch, tag or HEAD `tag`."""
    if tag == "latest":
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
    return {"revision": commit, "ref": ref}


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


# -- content hash of a local package set --------------------------------------------

# A local package set's tree is stat-walked at most this often by `resolve` (every warm by-tag
# manifest request resolves its tag): an edit shows in the pull that follows a second later.
PATH_RECHECK_SECONDS = 1.0
_hash_memo: dict[str, tuple[tuple, str, float]] = {}  # root -> (stat fingerprint, digest, when walked)
_hash_lock = threading.Lock()


def content_hash(root: str, recheck_after: float = 0.0) -> str:
    """"sha256:<hex>" over every file of the tree at `root`: names, kinds, modes, contents, link targets.

    `.git` folders are left out. Files are read again only when a stat of the tree (names,
    sizes, mtimes, inodes) changed since the last call; within `recheck_after` seconds of the
    last stat-walk, its answer stands without one.
    """
    now = time.monotonic()
    with _hash_lock:
        memo = _hash_memo.get(root)
    if memo is not None and now - memo[2] < recheck_after:
        return memo[1]
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            entries.append((os.path.relpath(full, root), st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino))
    entries.sort()
    fingerprint = tuple(entries)
    if memo is not None and memo[0] == fingerprint:
        with _hash_lock:
            _hash_memo[root] = (fingerprint, memo[1], now)
        return memo[1]
    digest = hashlib.sha256()
    for rel, mode, _, _, _ in entries:
        full = os.path.join(root, rel)
        if stat.S_ISLNK(mode):
            digest.update(f"l {rel}\0{os.readlink(full)}\0".encode())
        elif stat.S_ISDIR(mode):
            digest.update(f"d {rel}\0".encode())
        elif stat.S_ISREG(mode):
            kind = "x" if mode & 0o111 else "f"
            with open(full, "rb") as f:
                digest.update(f"{kind} {rel}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\0".encode())
    value = "sha256:" + digest.hexdigest()
    with _hash_lock:
        _hash_memo[root] = (fingerprint, value, now)
    return value
