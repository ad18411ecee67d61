"""Nix bootstrapped from a pinned artefact over HTTP (builder/bootstrap.py), with real Nix."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from builder import bootstrap, nix, sources
from builder.config import Config
from builder.errors import ServerError
from tests.fixtures_nixcache import DEMO, UNCACHED_PACKAGE, FileServer


class Log:
    def __init__(self):
        self.entries: list[dict] = []

    def __call__(self, event: str, message: str, severity: str = "INFO", **fields):
        self.entries.append({"event": event, "message": message, "severity": severity, **fields})

    def events(self, name: str) -> list[dict]:
        return [e for e in self.entries if e["event"] == name]


def config_for(work_dir: Path, url: str | None, sha256: str | None, **env: str) -> Config:
    values = {"WORK_DIR": str(work_dir), **env}
    if url:
        values["NIX_BOOTSTRAP_URL"] = url
    if sha256:
        values["NIX_BOOTSTRAP_SHA256"] = sha256
    return Config.from_env(values)


def test_without_a_bootstrap_url_the_machines_nix_is_used(tmp_path):
    log = Log()
    assert bootstrap.ensure_nix(config_for(tmp_path, None, None), log) is None
    assert bootstrap.ensure_nix(config_for(tmp_path, None, None, NIX_BIN_DIR="/opt/nix/bin"), log) == "/opt/nix/bin"
    assert log.entries == []
    assert not (tmp_path / "nix-bootstrap").exists()


def test_bootstraps_once_and_the_unpacked_nix_runs(tmp_path, nix_artefact):
    log = Log()
    config = config_for(tmp_path / "work", nix_artefact.url, nix_artefact.sha256)
    before = nix_artefact.server.count(nix_artefact.path.name)

    bin_dir = bootstrap.ensure_nix(config, log)

    assert bin_dir is not None and Path(bin_dir).is_relative_to(tmp_path / "work")
    for command in ("nix", "nix-build", "nix-instantiate", "nix-store"):
        result = subprocess.run([os.path.join(bin_dir, command), "--version"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(command), result.stdout  # a multi-call binary answers to its name
    [event] = log.events("nix-bootstrap")
    assert event["result"] == "ready" and event["sha256"] == nix_artefact.sha256
    assert event["artefact_bytes"] == nix_artefact.path.stat().st_size
    assert event["unpacked_bytes"] > event["artefact_bytes"]
    assert event["duration"] >= event["download_seconds"]
    # The archive is deleted once unpacked: /tmp is memory on the function.
    assert not list((tmp_path / "work").rglob("artefact"))

    # Idempotent: a second call (or a second worker of the instance) reuses it.
    assert bootstrap.ensure_nix(config, log) == bin_dir
    assert len(log.events("nix-bootstrap")) == 1
    assert nix_artefact.server.count(nix_artefact.path.name) == before + 1


def test_a_wrong_checksum_is_refused_before_anything_is_unpacked(tmp_path, nix_artefact):
    log = Log()
    wrong = "0" * 64
    config = config_for(tmp_path / "work", nix_artefact.url, wrong)
    with pytest.raises(ServerError) as raised:
        bootstrap.ensure_nix(config, log)
    message = raised.value.message
    assert raised.value.status == 500
    assert nix_artefact.url in message and wrong in message and nix_artefact.sha256 in message
    [event] = log.events("nix-bootstrap")
    assert event["severity"] == "ERROR" and event["result"] == "failed" and nix_artefact.sha256 in event["message"]
    leftovers = [p.name for p in (tmp_path / "work").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == []


def test_an_unreachable_artefact_is_a_clear_server_error(tmp_path, nix_artefact):
    missing = nix_artefact.url + ".missing"
    with pytest.raises(ServerError, match="cannot download the Nix artefact") as raised:
        bootstrap.ensure_nix(config_for(tmp_path, missing, nix_artefact.sha256), Log())
    assert missing in raised.value.message


def test_a_malformed_checksum_is_a_configuration_error(tmp_path, nix_artefact):
    with pytest.raises(ServerError, match="NIX_BOOTSTRAP_SHA256"):
        bootstrap.ensure_nix(config_for(tmp_path, nix_artefact.url, "sha256-abc"), Log())


def test_a_single_static_style_executable_is_accepted(tmp_path):
    """Nix's static build is one executable; each command name links to it."""
    binary = Path(shutil.which("nix")).resolve()
    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copyfile(binary, folder / "nix")
    sha256 = hashlib.sha256((folder / "nix").read_bytes()).hexdigest()
    server = FileServer(folder).start()
    try:
        bin_dir = bootstrap.ensure_nix(config_for(tmp_path / "work", f"{server.url}/nix", sha256), Log())
    finally:
        server.stop()
    result = subprocess.run([os.path.join(bin_dir, "nix-instantiate"), "--eval", "-E", "1 + 1"],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout.strip()) == (0, "2"), result.stderr


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = 0o755
    return info, data


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


@pytest.mark.parametrize("members, why", [
    ([_file("../escape")], "unsafe member name"),
    ([_file("/etc/escape")], "unsafe member name"),
    ([_symlink("d", str(Path("/tmp"))), _file("d/escape")], "beneath a symbolic link"),
    ([_file("nix/bin/not-nix")], "no bin/nix"),
])
def test_unsafe_or_useless_archives_are_refused(tmp_path, members, why):
    folder = tmp_path / "served"
    folder.mkdir()
    data = _tar(members)
    (folder / "nix.tar.gz").write_bytes(data)
    server = FileServer(folder).start()
    try:
        with pytest.raises(ServerError, match=why):
            bootstrap.ensure_nix(
                config_for(tmp_path / "work", f"{server.url}/nix.tar.gz", hashlib.sha256(data).hexdigest()), Log())
    finally:
        server.stop()
    assert not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()


def test_bootstrapped_nix_keeps_home_and_fetch_caches_under_work_dir(tmp_path, nix_artefact):
    """fetchTarball (how a nixpkgs channel arrives) downloads once per instance, with a read-only HOME."""
    bin_dir = bootstrap.ensure_nix(config_for(tmp_path / "work", nix_artefact.url, nix_artefact.sha256), Log())
    home = tmp_path / "work" / "nix-home"

    source = tmp_path / "served"
    (source / "pkgs").mkdir(parents=True)
    (source / "pkgs" / "default.nix").write_text("{ ... }: { answer = 42; }\n")
    with tarfile.open(source / "pkgs.tar.gz", "w:gz") as tar:
        tar.add(source / "pkgs", arcname="pkgs")
    server = FileServer(source).start()
    store = tmp_path / "store"
    expression = (
        f'[ (builtins.getEnv "HOME") ((import (builtins.fetchTarball "{server.url}/pkgs.tar.gz") {{}}).answer) ]'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "NIX_"))}
    env["HOME"] = "/nonexistent"
    try:
        for _ in range(2):
            result = subprocess.run(
                [os.path.join(bin_dir, "nix-instantiate"), "--eval", "--strict", "--json", "--read-write-mode",
                 "--option", "store", str(store), "--option", "substituters", "", "-E", expression],
                capture_output=True, text=True, env=env,
            )
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout) == [str(home), 42]
            assert "/nonexistent" not in result.stderr
    finally:
        server.stop()
    assert server.count("/pkgs.tar.gz") == 1  # the second evaluation used the cache
    assert (home / ".cache" / "nix").is_dir()


def test_bootstrapped_nix_substitutes_from_the_signed_cache_into_a_chroot_store(tmp_path, nix_artefact, binary_cache):
    bin_dir = bootstrap.ensure_nix(config_for(tmp_path / "work", nix_artefact.url, nix_artefact.sha256), Log())
    settings = nix.NixSettings(
        bin_dir=bin_dir, timeout=120, store=str(tmp_path / "nix"), substituters=binary_cache.url,
        trusted_public_keys=binary_cache.public_key, max_jobs=0,
    )
    source = sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(DEMO))
    closure = nix.realise(["hello"], source, "x86_64-linux", settings, str(tmp_path / "build"))
    assert closure.roots["hello"] == binary_cache.store_paths["hello"]
    hello = Path(nix.store_path_on_disk(closure.roots["hello"], settings)) / "bin" / "hello"
    assert hello.is_file()
    assert binary_cache.server.count(".narinfo") > 0

    # No compiling on the function: what the cache lacks is the package's fault, named.
    with pytest.raises(nix.PackageFailed) as raised:
        nix.realise(["hello", UNCACHED_PACKAGE], source, "x86_64-linux", settings, str(tmp_path / "build"))
    assert raised.value.names == [UNCACHED_PACKAGE]
    assert UNCACHED_PACKAGE in raised.value.message and "binary cache" in raised.value.message
