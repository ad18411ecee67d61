"""NIX_GC_ABOVE_BYTES decides by what the Nix store holds, not by its filesystem (statvfs).

Under gVisor (Cloud Run's first-generation sandbox) statvfs of the in-memory /tmp reports
about 2^63 bytes, and everywhere it also counts what else lives on that filesystem.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from builder import names, nix
from builder.build import ImageBuilder
from builder.cache.sqlite import SqliteCache
from builder.config import Config
from builder.storage.filesystem import FilesystemStorage
from tests.fixtures_nixcache import DEMO

pytestmark = pytest.mark.timeout(600)


def nar_sizes(store: Path) -> int:
    """What Nix itself says the store's valid paths hold (their NAR sizes)."""
    result = subprocess.run(["nix", "path-info", "--all", "--json", "--store", str(store),
                             "--option", "experimental-features", "nix-command"],
                            capture_output=True, text=True, check=True)
    info = json.loads(result.stdout)
    entries = info if isinstance(info, list) else info.values()
    return sum(entry["narSize"] for entry in entries)


def files_under(root: Path) -> int:
    """find's sum of the sizes of the files and links under `root`."""
    listed = subprocess.run(["find", str(root), "(", "-type", "f", "-o", "-type", "l", ")", "-printf", "%s\\n"],
                            capture_output=True, text=True, check=True).stdout.split()
    return sum(map(int, listed))


def make_builder(root: Path, gc_above: int) -> tuple[ImageBuilder, list[dict]]:
    """A builder on the chroot store `root/store`, with a cache of its own (so each one builds)."""
    events: list[dict] = []
    config = Config(pkgs_path=str(DEMO), work_dir=str(root / "work"), nix_store=str(root / "store"),
                    nix_gc_above_bytes=gc_above, nix_timeout=300)
    root.mkdir(parents=True, exist_ok=True)
    cache = root / f"cache-{gc_above}.sqlite"
    storage = FilesystemStorage(str(root / "storage"))
    storage.check()
    builder = ImageBuilder(config, storage, SqliteCache(str(cache)),
                           log=lambda event, message, **fields: events.append({"event": event, **fields}))
    return builder, events


def build(builder: ImageBuilder, name: str) -> None:
    builder.image(names.parse_image_name(name, always_include=(), max_packages=10, max_length=100), "latest")


def test_the_store_size_is_the_bytes_its_paths_hold_and_ignores_the_rest_of_the_filesystem(tmp_path):
    store = tmp_path / "store"
    settings = nix.NixSettings(timeout=300, store=str(store))
    nix.realise(["hello"], nix_source(), "x86_64-linux", settings, str(tmp_path / "gc-roots"))
    held = nix.store_bytes_used(settings)
    # The files and links of the store and its database (find's count), at least what Nix says
    # its paths hold (NAR sizes, which add a little framing) and no more than that and the
    # database with the space Nix reserves for collecting garbage (gc-reserved-space, 8 MiB).
    assert held == files_under(store)
    assert 0.9 * nar_sizes(store) < held < nar_sizes(store) + (9 << 20)

    # 32 MiB written beside the store, on the same filesystem: statvfs would count it, the store does not.
    (tmp_path / "beside").write_bytes(os.urandom(32 << 20))
    assert nix.store_bytes_used(settings) == held

    # Finished paths are remembered, new ones counted, collected ones forgotten.
    (tmp_path / "added").write_bytes(os.urandom(1 << 20))
    subprocess.run(["nix-store", "--store", str(store), "--add", str(tmp_path / "added")], check=True,
                   capture_output=True)
    assert nix.store_bytes_used(settings) == files_under(store) >= held + (1 << 20)
    subprocess.run(["nix-store", "--store", str(store), "--gc"], check=True, capture_output=True)
    assert nix.store_bytes_used(settings) == files_under(store) < held


def test_garbage_collection_starts_above_the_limit_of_what_the_store_holds(tmp_path):
    first, _ = make_builder(tmp_path / "a", 0)
    build(first, "hello")
    held = nix.store_bytes_used(first.nix_settings())
    (tmp_path / "a" / "beside").write_bytes(os.urandom(32 << 20))  # the filesystem holds far more

    # Under the limit by what the store holds: no collection, whatever else fills the filesystem.
    roomy, events = make_builder(tmp_path / "a", held + (1 << 20))
    build(roomy, "hello")
    assert [e for e in events if e["event"] == "nix-gc"] == []

    # Over it: collected, and the log reports the store's bytes.
    tight, events = make_builder(tmp_path / "a", held // 2)
    build(tight, "hello")
    [collected] = [e for e in events if e["event"] == "nix-gc"]
    assert abs(collected["bytes_before"] - held) < held // 10
    assert collected["bytes_after"] < collected["bytes_before"]


def nix_source():
    from builder import sources

    return sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(DEMO))
