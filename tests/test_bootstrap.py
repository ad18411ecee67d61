"""Nix bootstrapped over HTTP (builder/bootstrap.py), with real Nix: from a pinned artefact, or by store
path from a signed binary cache."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from builder import bootstrap, narinfo, nix, sources
from builder.config import Config
from builder.errors import ServerError
from tests.fixtures_nixcache import DEMO, UNCACHED_PACKAGE, FileServer, make_binary_cache
from tests.test_nar import archive, directory, regular, symlink


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
    hello = Path(nix.store_path_on_disk(closure.roots["hello"], settings.store)) / "bin" / "hello"
    assert hello.is_file()
    assert binary_cache.server.count(".narinfo") > 0

    # No compiling on the function: what the cache lacks is the package's fault, named.
    with pytest.raises(nix.PackageFailed) as raised:
        nix.realise(["hello", UNCACHED_PACKAGE], source, "x86_64-linux", settings, str(tmp_path / "build"))
    assert raised.value.names == [UNCACHED_PACKAGE]
    assert UNCACHED_PACKAGE in raised.value.message and "binary cache" in raised.value.message


# --- from the binary cache, by store path (NIX_BOOTSTRAP_STORE_PATH) ------------------


@dataclass
class NixCache:
    """A signed binary cache holding only the published Nix, served on loopback; files may be tampered with."""

    root: Path  # the cache folder (nix-cache-info, *.narinfo, nar/)
    public_key: str
    secret_key: str
    store_path: str
    server: FileServer

    @property
    def narinfo(self) -> Path:
        return self.root / f"{narinfo.hash_part(self.store_path)}.narinfo"

    def nar(self) -> Path:
        return self.root / narinfo.parse(self.narinfo.read_text()).url

    def config(self, work: Path, **env: str) -> Config:
        values = {"NIX_BOOTSTRAP_STORE_PATH": self.store_path, "NIX_SUBSTITUTERS": self.server.url,
                  "NIX_TRUSTED_PUBLIC_KEYS": self.public_key, **env}
        return config_for(work, None, None, **values)

    def resign(self, text: str) -> str:
        """`text` (a narinfo) with its signatures replaced by one of this cache's key."""
        name, _, secret = self.secret_key.partition(":")
        key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(secret)[:32])
        signature = base64.b64encode(key.sign(narinfo.parse(text).fingerprint())).decode()
        lines = [line for line in text.splitlines() if not line.startswith("Sig: ")]
        return "\n".join(lines + [f"Sig: {name}:{signature}"]) + "\n"

    def publish_nar(self, data: bytes) -> None:
        """Serve `data` as the Nix's NAR (uncompressed), with a narinfo the trusted key signs."""
        (self.root / "nar" / "other.nar").write_bytes(data)
        fields = {
            "URL": "nar/other.nar", "Compression": "none", "NarSize": str(len(data)),
            "NarHash": "sha256:" + narinfo.nix32_encode(hashlib.sha256(data).digest()),
            "FileSize": str(len(data)), "FileHash": "sha256:" + narinfo.nix32_encode(hashlib.sha256(data).digest()),
        }
        self.narinfo.write_text(self.resign(_with_fields(self.narinfo.read_text(), fields)))


def _with_fields(text: str, fields: dict[str, str]) -> str:
    lines = []
    for line in text.splitlines():
        key = line.partition(": ")[0]
        lines.append(f"{key}: {fields[key]}" if key in fields else line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def published_nix(tmp_path_factory) -> dict[str, Path]:
    """The machine's Nix published in three signed binary caches, one per compression Nix writes."""
    made = {}
    for compression in ("xz", "zstd", "none"):
        root = tmp_path_factory.mktemp(f"nix-cache-{compression}")
        make_binary_cache(root, packages=(), compression=compression)
        made[compression] = root
    return made


@pytest.fixture
def nix_cache(published_nix, tmp_path, request) -> NixCache:
    """A fresh copy of one of the published caches (xz unless parametrised), which tests may tamper with."""
    compression = getattr(request, "param", "xz")
    source = published_nix[compression]
    root = tmp_path / "cache-copy"
    shutil.copytree(source / "cache", root)
    [info] = root.glob("*.narinfo")
    server = FileServer(root).start()
    try:
        yield NixCache(root=root, public_key=(source / "cache-key.pub").read_text().strip(),
                       secret_key=(source / "cache-key.sec").read_text().strip(),
                       store_path=narinfo.parse(info.read_text()).store_path, server=server)
    finally:
        server.stop()


def _nothing_trusted_left(work: Path) -> None:
    left = [p.relative_to(work) for p in work.rglob("*") if not p.name.endswith(".lock")]
    assert left in ([], [Path("nix-bootstrap")]), left


@pytest.mark.parametrize("nix_cache", ["xz", "zstd", "none"], indirect=True)
def test_nix_is_fetched_from_the_signed_binary_cache_by_store_path_verified_and_run(tmp_path, nix_cache):
    log = Log()
    config = nix_cache.config(tmp_path / "work")

    bin_dir = bootstrap.ensure_nix(config, log)

    for command in ("nix", "nix-build", "nix-store"):
        result = subprocess.run([os.path.join(bin_dir, command), "--version"], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.startswith(command), result.stderr
    [event] = log.events("nix-bootstrap")
    assert event["result"] == "ready" and event["store_path"] == nix_cache.store_path
    assert event["signed_by"] == nix_cache.public_key.split(":")[0]
    assert event["artefact_bytes"] == nix_cache.nar().stat().st_size
    assert not list((tmp_path / "work").rglob("partial"))
    # Once per instance: the second call downloads nothing.
    assert bootstrap.ensure_nix(config, log) == bin_dir
    assert nix_cache.server.count(".narinfo") == 1 and len(nix_cache.server.requests) == 2


def test_the_first_substituter_that_has_the_path_serves_it(tmp_path, nix_cache):
    empty = FileServer(tmp_path / "empty-cache")
    (tmp_path / "empty-cache").mkdir()
    empty.start()
    try:
        config = nix_cache.config(tmp_path / "work", NIX_SUBSTITUTERS=f"{empty.url} {nix_cache.server.url}")
        assert bootstrap.ensure_nix(config, Log()) is not None
    finally:
        empty.stop()
    assert empty.count(".narinfo") == 1


def _tamper_unsigned(cache: NixCache) -> None:
    text = cache.narinfo.read_text()
    cache.narinfo.write_text("".join(line + "\n" for line in text.splitlines() if not line.startswith("Sig: ")))


def _tamper_signed_field(cache: NixCache) -> None:  # a signed field changed after signing
    info = narinfo.parse(cache.narinfo.read_text())
    cache.narinfo.write_text(_with_fields(cache.narinfo.read_text(), {"NarSize": str(info.nar_size + 8)}))


def _tamper_content(cache: NixCache) -> None:  # same size, one byte changed, recompressed: NarHash no longer holds
    path = cache.nar()
    data = bytearray(lzma.decompress(path.read_bytes()))
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(lzma.compress(bytes(data)))
    digest = "sha256:" + narinfo.nix32_encode(hashlib.sha256(path.read_bytes()).digest())
    cache.narinfo.write_text(_with_fields(cache.narinfo.read_text(),
                                          {"FileSize": str(path.stat().st_size), "FileHash": digest}))


def _tamper_longer(cache: NixCache) -> None:  # more than the signed NarSize
    path = cache.nar()
    path.write_bytes(lzma.compress(lzma.decompress(path.read_bytes()) + b"\0" * 4096))
    cache.narinfo.write_text(_with_fields(cache.narinfo.read_text(), {"FileSize": str(path.stat().st_size)}))


def _tamper_truncated(cache: NixCache) -> None:
    path = cache.nar()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


TAMPERING = {
    "no signature": (_tamper_unsigned, "is not signed"),
    "a signed field changed": (_tamper_signed_field, "no valid signature by a trusted key"),
    "content changed": (_tamper_content, "the signed NarHash is"),
    "longer than signed": (_tamper_longer, "larger than the .* bytes the narinfo states"),
    "truncated download": (_tamper_truncated, "refused|ends early"),
    # Signed by the trusted key, yet unpacking would leave the target.
    "entry named ..": (lambda c: c.publish_nar(archive(directory((b"..", regular(b"x"))))), "escape"),
    "absolute entry": (lambda c: c.publish_nar(archive(directory((b"/tmp/escape", regular(b"x"))))), "escape"),
    "write through a symlink": (lambda c: c.publish_nar(archive(directory(
        (b"bin", symlink(b"/tmp")), (b"bin", directory((b"escape", regular(b"x"))))))), "order"),
}


@pytest.mark.parametrize("kind", list(TAMPERING))
def test_a_tampered_cache_is_refused_with_a_clear_error_and_leaves_nothing_behind(tmp_path, nix_cache, kind):
    tamper, reason = TAMPERING[kind]
    original = {p: p.read_bytes() for p in nix_cache.root.rglob("*") if p.is_file()}
    tamper(nix_cache)
    log = Log()
    config = nix_cache.config(tmp_path / "work")

    with pytest.raises(ServerError) as raised:
        bootstrap.ensure_nix(config, log)

    assert raised.value.status == 500
    assert re.search(reason, raised.value.message), raised.value.message
    assert nix_cache.store_path in raised.value.message
    [event] = log.events("nix-bootstrap")
    assert event["severity"] == "ERROR" and event["result"] == "failed" and event["message"] == raised.value.message
    _nothing_trusted_left(tmp_path / "work")
    assert not Path("/tmp/escape").exists() and not (tmp_path / "x").exists()

    # The cache repaired, the next request bootstraps.
    for extra in set(nix_cache.root.rglob("*")) - set(original):
        if extra.is_file():
            extra.unlink()
    for path, data in original.items():
        path.write_bytes(data)
    assert bootstrap.ensure_nix(config, log) is not None
    assert log.events("nix-bootstrap")[-1]["result"] == "ready"


def test_a_key_the_function_does_not_trust_is_refused(tmp_path, nix_cache, published_nix):
    other = (published_nix["zstd"] / "cache-key.pub").read_text().strip()  # a key, but not this cache's
    other = "other-key-1:" + other.partition(":")[2]
    with pytest.raises(ServerError, match="no valid signature by a trusted key.*trusted: other-key-1"):
        bootstrap.ensure_nix(nix_cache.config(tmp_path / "work", NIX_TRUSTED_PUBLIC_KEYS=other), Log())


def test_a_store_path_missing_everywhere_names_each_cache_asked(tmp_path, nix_cache):
    missing = nix_cache.store_path.replace(narinfo.hash_part(nix_cache.store_path), "0" * 32)
    with pytest.raises(ServerError, match="HTTP 404") as raised:
        bootstrap.ensure_nix(nix_cache.config(tmp_path / "work", NIX_BOOTSTRAP_STORE_PATH=missing), Log())
    assert missing in raised.value.message and nix_cache.server.url in raised.value.message


def test_a_store_path_needs_a_cache_and_a_key(tmp_path):
    with pytest.raises(ServerError, match="NIX_SUBSTITUTERS and NIX_TRUSTED_PUBLIC_KEYS"):
        config_for(tmp_path, None, None, NIX_BOOTSTRAP_STORE_PATH="/nix/store/" + "0" * 32 + "-nix")


def test_the_url_override_wins_over_the_store_path(tmp_path, nix_cache, nix_artefact):
    log = Log()
    config = nix_cache.config(tmp_path / "work", NIX_BOOTSTRAP_URL=nix_artefact.url,
                              NIX_BOOTSTRAP_SHA256=nix_artefact.sha256)
    bootstrap.ensure_nix(config, log)
    assert log.events("nix-bootstrap")[0]["url"] == nix_artefact.url
    assert nix_cache.server.requests == []
