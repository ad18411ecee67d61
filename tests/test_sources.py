"""builder.sources: tags to package sources, with a real local git repository and real Nix."""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from builder import nix, sources
from builder.errors import ManifestUnknown
from builder.nix import NixSettings, UnknownPackages

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "nix" / "demo"
SYSTEM = "x86_64-linux"
COMMIT_A = "a" * 40

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


def test_path_source_only_has_latest():
    source = sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(DEMO))
    assert source == sources.PackageSource("path", str(DEMO), None, f"path:{DEMO}", pinned=False)
    assert source.to_nix() == {"kind": "path", "path": str(DEMO)}
    with pytest.raises(ManifestUnknown):
        sources.resolve("v1", channel=None, pkgs_repo=None, pkgs_path=str(DEMO))


def test_channel_tags():
    latest = sources.resolve("latest", channel="nixos-unstable", pkgs_repo=None, pkgs_path=None)
    assert latest.location == "https://github.com/NixOS/nixpkgs/archive/nixos-unstable.tar.gz"
    assert latest.identity == "channel:nixos-unstable" and not latest.pinned
    pinned = sources.resolve(COMMIT_A, channel="nixos-unstable", pkgs_repo=None, pkgs_path=None)
    assert pinned.location == f"https://github.com/NixOS/nixpkgs/archive/{COMMIT_A}.tar.gz"
    assert pinned.identity == f"channel:{COMMIT_A}" and pinned.pinned and pinned.revision == COMMIT_A
    commit_channel = sources.resolve("latest", channel=COMMIT_A, pkgs_repo=None, pkgs_path=None)
    assert commit_channel.pinned
    with pytest.raises(ManifestUnknown):
        sources.resolve("nixos-23.05", channel="nixos-unstable", pkgs_repo=None, pkgs_path=None)


def test_realise_through_tarball_channel(tmp_path):
    # A channel is a tarball URL; a file:// one keeps the test offline.
    tarball = tmp_path / "demo.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(DEMO, arcname="nixpkgs-demo")
    source = sources.resolve("latest", channel=f"file://{tarball}", pkgs_repo=None, pkgs_path=None)
    assert source.to_nix() == {"kind": "channel", "url": f"file://{tarball}"}
    closure = nix.realise(["hello"], source, SYSTEM, NixSettings(timeout=300), str(tmp_path / "work"))
    assert closure.roots["hello"].endswith("-hello")
