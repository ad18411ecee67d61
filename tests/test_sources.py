"""builder.sources: tags to package sources, with a real local git repository and real Nix."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from builder import nix, sources
from builder.build import ImageBuilder
from builder.cache.memory import MemoryCache
from builder.cache.sqlite import SqliteCache
from builder.config import Config
from builder.errors import ManifestUnknown, ServerError
from builder.storage.filesystem import FilesystemStorage
from builder.nix import NixSettings, UnknownPackages

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "nix" / "demo"
SYSTEM = "x86_64-linux"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40

pytestmark = pytest.mark.timeout(600)

BRANCH_ONLY = '''
  // {
    branchOnly = derivation {
      name = "branch-only";
      system = builtins.currentSystem;
      builder = "${(import ./. { }).busybox}/bin/busybox";
      args = [ "sh" "-c" "echo only on the branch > $out" ];
    };
  }
'''


def git(repo: Path, *args: str) -> str:
    env = dict(
        os.environ,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Test",
        GIT_AUTHOR_EMAIL="test@example.org",
        GIT_COMMITTER_NAME="Test",
        GIT_COMMITTER_EMAIL="test@example.org",
        HOME=str(repo.parent),
    )
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> dict[str, str]:
    """A git repository holding the demo set: main (latest), branch `feature`
    with one more package, an annotated tag `v1` and a light tag `v0` on main."""
    path = tmp_path / "pkgs"
    shutil.copytree(DEMO, path)
    git(path, "init", "-q", "-b", "main")
    git(path, "add", ".")
    git(path, "commit", "-q", "-m", "demo set")
    main = git(path, "rev-parse", "HEAD")
    git(path, "tag", "v0")
    git(path, "tag", "-a", "v1", "-m", "release 1")
    git(path, "checkout", "-q", "-b", "feature")
    default = path / "default.nix"
    default.write_text(default.read_text().rstrip() + "\n" + BRANCH_ONLY)
    git(path, "commit", "-q", "-am", "a package only on the branch")
    feature = git(path, "rev-parse", "HEAD")
    git(path, "checkout", "-q", "main")
    return {"path": str(path), "main": main, "feature": feature}


def git_source(tag: str, url: str) -> sources.PackageSource:
    return sources.resolve(tag, channel=None, pkgs_repo=url, pkgs_path=None)


@pytest.mark.fast
def test_git_tags_resolve_to_commits(repo):
    url = repo["path"]
    latest = git_source("latest", url)
    assert (latest.kind, latest.location, latest.revision) == ("git", url, repo["main"])
    assert latest.identity == f"git:{url}@{repo['main']}" and latest.pinned

    assert git_source("feature", url).revision == repo["feature"]
    assert git_source("main", url).revision == repo["main"]
    assert git_source("v0", url).revision == repo["main"]
    # An annotated tag means the commit it points at, not the tag object.
    assert git_source("v1", url).revision == repo["main"]
    assert git_source(repo["feature"], url).revision == repo["feature"]
    assert git_source(repo["feature"], url).ref is None


@pytest.mark.fast
def test_unknown_git_tag(repo):
    with pytest.raises(ManifestUnknown):
        git_source("nosuchbranch", repo["path"])
    with pytest.raises(ManifestUnknown):
        git_source("-upload-pack=x", repo["path"])  # not a valid tag at all


def test_realise_through_git_source(repo, tmp_path):
    settings = NixSettings(timeout=300)
    for url in (repo["path"], "file://" + repo["path"]):
        feature = git_source("feature", url)
        closure = nix.realise(["branchOnly", "hello"], feature, SYSTEM, settings, str(tmp_path / "work"))
        assert Path(closure.roots["branchOnly"]).read_text() == "only on the branch\n"
        with pytest.raises(UnknownPackages) as caught:
            nix.realise(["branchOnly"], git_source("latest", url), SYSTEM, settings, str(tmp_path / "work"))
        assert caught.value.names == ["branchOnly"]
    # A bare commit on a branch other than the default one is found too.
    pinned = git_source(repo["feature"], repo["path"])
    closure = nix.realise(["branchOnly"], pinned, SYSTEM, settings, str(tmp_path / "work"))
    assert closure.roots["branchOnly"].endswith("-branch-only")


@pytest.mark.fast
def test_path_source_only_has_latest_and_its_revision_is_a_content_hash(tmp_path):
    source = sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(DEMO))
    digest = source.revision
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert source == sources.PackageSource("path", str(DEMO), digest, f"path:{DEMO}@{digest}", pinned=False)
    assert source.to_nix() == {"kind": "path", "path": str(DEMO)}
    with pytest.raises(ManifestUnknown):
        sources.resolve("v1", channel=None, pkgs_repo=None, pkgs_path=str(DEMO))
    # The same files elsewhere are the same revision; a changed file is another one.
    copy = tmp_path / "copy"
    shutil.copytree(DEMO, copy)
    assert sources.content_hash(str(copy)) == digest
    default = copy / "default.nix"
    default.write_text(default.read_text() + "\n")
    assert sources.content_hash(str(copy)) != digest
    (copy / "default.nix").write_text((DEMO / "default.nix").read_text())
    assert sources.content_hash(str(copy)) == digest
    (copy / "new.nix").write_text("{ }")
    assert sources.content_hash(str(copy)) != digest


@pytest.mark.fast
def test_a_local_package_set_edited_on_disk_is_seen_within_a_second(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(sources.time, "monotonic", lambda: clock[0])
    copy = tmp_path / "copy"
    shutil.copytree(DEMO, copy)
    before = sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(copy)).revision
    (copy / "default.nix").write_text((copy / "default.nix").read_text() + "\n")
    clock[0] += sources.PATH_RECHECK_SECONDS / 2  # warm requests in between do not walk the tree
    assert sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(copy)).revision == before
    clock[0] += sources.PATH_RECHECK_SECONDS
    after = sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(copy)).revision
    assert after != before and after == sources.content_hash(str(copy))


def channel_dir(tmp_path: Path, **channels: str) -> str:
    """A folder served like channels.nixos.org: <channel>/git-revision."""
    root = tmp_path / "channels"
    for name, commit in channels.items():
        (root / name.replace("_", "-")).mkdir(parents=True, exist_ok=True)
        (root / name.replace("_", "-") / "git-revision").write_text(commit + "\n")
    return f"file://{root}"


@pytest.mark.fast
def test_channel_tags_resolve_to_commits_and_fetch_by_commit(tmp_path):
    url = channel_dir(tmp_path, nixos_unstable=COMMIT_A)
    archive = "https://example.org/archive/{rev}.tar.gz"
    latest = sources.resolve("latest", channel="nixos-unstable", pkgs_repo=None, pkgs_path=None,
                             channels_url=url, archive_url=archive)
    assert latest.location == f"https://example.org/archive/{COMMIT_A}.tar.gz"
    assert (latest.revision, latest.identity, latest.pinned) == (COMMIT_A, f"channel:{COMMIT_A}", True)
    pinned = sources.resolve(COMMIT_B, channel="nixos-unstable", pkgs_repo=None, pkgs_path=None)
    assert pinned.location == f"https://github.com/NixOS/nixpkgs/archive/{COMMIT_B}.tar.gz"
    assert pinned.identity == f"channel:{COMMIT_B}" and pinned.pinned and pinned.revision == COMMIT_B
    commit_channel = sources.resolve("latest", channel=COMMIT_A, pkgs_repo=None, pkgs_path=None)
    assert commit_channel.pinned and commit_channel.revision == COMMIT_A
    with pytest.raises(ManifestUnknown):
        sources.resolve("nixos-23.05", channel="nixos-unstable", pkgs_repo=None, pkgs_path=None)
    with pytest.raises(ServerError, match="cannot resolve channel 'nixos-99.99'"):
        sources.resolve("latest", channel="nixos-99.99", pkgs_repo=None, pkgs_path=None, channels_url=url)


@pytest.mark.fast
def test_moving_references_go_through_remember():
    asked = []

    def remember(key, lookup):
        asked.append(key)
        return {"revision": COMMIT_B}

    source = sources.resolve("latest", channel="nixos-unstable", pkgs_repo=None, pkgs_path=None,
                             remember=remember, channels_url="https://channels.example")
    assert source.revision == COMMIT_B and asked == ["channel:https://channels.example/nixos-unstable"]
    source = sources.resolve("main", channel=None, pkgs_repo="https://git.example/pkgs", pkgs_path=None,
                             remember=remember)
    assert source.revision == COMMIT_B and asked[-1] == "git:https://git.example/pkgs#main"


@pytest.mark.fast
def test_instances_share_a_channels_commit_until_it_expires(tmp_path):
    """Two instances over one cache build the same commit; after REVISION_TTL the channel is asked again."""
    url = channel_dir(tmp_path, nixos_unstable=COMMIT_A)
    env = {"NIXERY_CHANNEL": "nixos-unstable", "NIXPKGS_CHANNELS_URL": url, "REVISION_TTL": "1",
           "WORK_DIR": str(tmp_path / "work")}
    shared = SqliteCache(str(tmp_path / "cache.sqlite"))
    first = ImageBuilder(Config.from_env(env), FilesystemStorage(str(tmp_path / "s")), MemoryCache(shared))
    second = ImageBuilder(Config.from_env(env), FilesystemStorage(str(tmp_path / "s")), MemoryCache(shared))
    assert first.resolve_source("latest").revision == COMMIT_A
    channel_dir(tmp_path, nixos_unstable=COMMIT_B)  # the channel moves
    assert second.resolve_source("latest").revision == COMMIT_A
    time.sleep(1.1)
    assert second.resolve_source("latest").revision == COMMIT_B
    assert first.resolve_source("latest").revision == COMMIT_B


def test_realise_through_tarball_channel(tmp_path):
    # A channel is a tarball URL; a file:// one keeps the test offline.
    tarball = tmp_path / "demo.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(DEMO, arcname="nixpkgs-demo")
    source = sources.resolve("latest", channel=f"file://{tarball}", pkgs_repo=None, pkgs_path=None)
    assert source.to_nix() == {"kind": "channel", "url": f"file://{tarball}"}
    closure = nix.realise(["hello"], source, SYSTEM, NixSettings(timeout=300), str(tmp_path / "work"))
    assert closure.roots["hello"].endswith("-hello-2.12.1")


def test_a_channel_that_cannot_be_reached_is_served_at_its_last_known_commit(tmp_path):
    url = channel_dir(tmp_path, nixos_unstable=COMMIT_A)
    env = {"NIXERY_CHANNEL": "nixos-unstable", "NIXPKGS_CHANNELS_URL": url, "REVISION_TTL": "1",
           "WORK_DIR": str(tmp_path / "work")}
    logged = []
    builder = ImageBuilder(Config.from_env(env), FilesystemStorage(str(tmp_path / "s")),
                           MemoryCache(SqliteCache(str(tmp_path / "cache.sqlite"))),
                           log=lambda event, *a, **k: logged.append(event))
    assert builder.resolve_source("latest").revision == COMMIT_A
    shutil.rmtree(tmp_path / "channels")  # the channel host is down
    time.sleep(1.1)
    assert builder.resolve_source("latest").revision == COMMIT_A
    assert logged == ["revision-stale"]
    fresh = ImageBuilder(Config.from_env(env), FilesystemStorage(str(tmp_path / "s")),
                         MemoryCache(SqliteCache(str(tmp_path / "other.sqlite"))))
    with pytest.raises(ServerError):  # nothing known to fall back on
        fresh.resolve_source("latest")
