"""Faults storage and the cache produce, healed without an operator: real registry processes,
real Nix builds of the demo set, real skopeo, a real tmpfs for a full disk, fake-gcs-server for
the bucket. Each test breaks something the way a deployment breaks it, then pulls again.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from builder.cache import LayerRecord
from builder.cache.sqlite import SqliteCache
from builder.errors import StorageFull
from builder.manifest import DOCKER_MANIFEST, OCI_MANIFEST
from builder.storage.filesystem import FilesystemStorage
from tests.test_clients import skopeo_to_oci

OCI = {"Accept": OCI_MANIFEST}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_file(registry, digest: str) -> Path:
    return registry.state_dir / "storage" / "blobs" / "sha256" / digest.split(":")[1]


def damage(path: Path) -> None:
    """Flip one byte in the middle: same size, same name, other bytes."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_every_blob_intact(registry, name: str, manifest: dict) -> None:
    for descriptor in [manifest["config"], *manifest["layers"]]:
        response = registry.get(f"/v2/{name}/blobs/{descriptor['digest']}")
        assert response.status_code == 200, response.text
        assert sha256(response.content) == descriptor["digest"] and len(response.content) == descriptor["size"]


# -- filesystem storage ---------------------------------------------------------------------------

def test_damaged_layers_are_packed_again_never_served_and_heal_at_the_next_pull(registry):
    hello = registry.get("/v2/hello/manifests/latest", headers=OCI).json()
    for layer in hello["layers"]:
        damage(blob_file(registry, layer["digest"]))
    # goodbye shares several of hello's layers: each shared one fails its check and is packed again.
    goodbye = registry.get("/v2/goodbye/manifests/latest", headers=OCI).json()
    shared = {l["digest"] for l in hello["layers"]} & {l["digest"] for l in goodbye["layers"]}
    assert len(shared) >= 3
    assert {e["digest"] for e in registry.events("layer-repacked")} == shared
    assert_every_blob_intact(registry, "goodbye", goodbye)
    # hello's own layers are still damaged: a pull fails once (never with the wrong bytes) ...
    own = [l for l in hello["layers"] if l["digest"] not in shared]
    for layer in own:
        response = registry.get(f"/v2/hello/blobs/{layer['digest']}")
        assert response.status_code == 404 and response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert {e["digest"] for e in registry.events("blob-damaged")} >= {l["digest"] for l in own}
    # ... and the next pull rebuilds the image, with the same digests.
    assert registry.get("/v2/hello/manifests/latest", headers=OCI).json() == hello
    assert_every_blob_intact(registry, "hello", hello)
    assert [b["image"] for b in registry.builds()] == ["hello", "goodbye", "hello"]


def test_a_deleted_layer_fails_one_skopeo_pull_and_the_next_succeeds(registry, tmp_path):
    # skopeo asks for an image index: the lost layer must drop the index's record as well as the image's.
    skopeo_to_oci(registry, "hello", tmp_path / "first")
    built = len(registry.builds())
    manifest = registry.get("/v2/hello/manifests/latest", headers=OCI).json()  # the host's platform
    blob_file(registry, manifest["layers"][-1]["digest"]).unlink()
    with pytest.raises(AssertionError, match="404"):  # skopeo fails: the blob is gone
        skopeo_to_oci(registry, "hello", tmp_path / "second")
    skopeo_to_oci(registry, "hello", tmp_path / "third")
    assert len(registry.builds()) == built + 1
    assert registry.builds()[-1]["layers_packed"] == 1, "only the lost layer is packed again"


def test_a_deleted_platform_manifest_behind_an_index_heals_at_the_next_pull(registry, tmp_path):
    skopeo_to_oci(registry, "goodbye", tmp_path / "first")
    digest = registry.head("/v2/goodbye/manifests/latest", headers=OCI).headers["Docker-Content-Digest"]
    registry.stop()  # a fresh instance: no manifest copies in memory
    blob_file(registry, digest).unlink()
    registry.start()
    assert registry.get(f"/v2/goodbye/manifests/{digest}", headers=OCI).status_code == 404
    skopeo_to_oci(registry, "goodbye", tmp_path / "second")
    assert blob_file(registry, digest).exists()


def test_a_deleted_manifest_and_config_are_rebuilt_not_a_404_for_the_ttl(start_registry, tmp_path):
    state = tmp_path / "state"
    first = start_registry(state_dir=state)
    oci = first.get("/v2/goodbye/manifests/latest", headers=OCI)
    docker = first.get("/v2/goodbye/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    config = oci.json()["config"]["digest"]
    first.stop()
    for digest in (oci.headers["Docker-Content-Digest"], docker.headers["Docker-Content-Digest"], config):
        blob_file(first, digest).unlink()
    # A fresh instance: the cache still names the image, storage no longer holds it. Rebuilt at once.
    fresh = start_registry(state_dir=state)
    again = fresh.get("/v2/goodbye/manifests/latest", headers=OCI)
    assert again.status_code == 200 and again.content == oci.content
    assert len(fresh.builds()) == 1 and fresh.events("image-invalidated")
    assert_every_blob_intact(fresh, "goodbye", again.json())
    # This instance now holds the manifest in memory: a config lost behind it fails one blob request.
    blob_file(fresh, config).unlink()
    assert fresh.get("/v2/goodbye/manifests/latest", headers=OCI).status_code == 200
    assert fresh.get(f"/v2/goodbye/blobs/{config}").status_code == 404
    assert fresh.get("/v2/goodbye/manifests/latest", headers=OCI).content == oci.content
    assert fresh.get(f"/v2/goodbye/blobs/{config}").status_code == 200
    assert len(fresh.builds()) == 2


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for the test (the tests run as root); a failing mount fails the test."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_a_5xx_saying_so_leaves_nothing_and_heals_when_space_returns(start_registry, small_disk):
    registry = start_registry({"STORAGE_PATH": str(small_disk / "storage")})
    filler = fill(small_disk)
    response = registry.get("/v2/hello/manifests/latest", headers=OCI)
    assert response.status_code == 507, response.text
    message = response.json()["errors"][0]["message"]
    assert "storage is full" in message and str(small_disk) not in message
    assert list((small_disk / "storage" / "tmp").iterdir()) == [], "no partial upload is left behind"
    [logged] = [e for e in registry.events("request") if e["status"] == 507]
    assert "storage is full" in logged["error"] and "No space left" in logged["cause"]
    filler.unlink()
    healed = registry.get("/v2/hello/manifests/latest", headers=OCI)
    assert healed.status_code == 200
    assert_every_blob_intact(registry, "hello", healed.json())


def test_temporary_files_of_a_dead_upload_are_deleted_at_start(start_registry, tmp_path):
    state = tmp_path / "state"
    start_registry(state_dir=state).stop()
    leftover = state / "storage" / "tmp" / "upload-left-by-a-killed-process"
    leftover.write_bytes(b"partial layer" * 1000)
    registry = start_registry(state_dir=state)
    assert not leftover.exists()
    assert registry.events("storage-cleared")[0]["removed"] == 1


class FullDiskFile:
    """A temporary file on a disk that filled up: flushing and closing fail as they do then."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self.real.close()
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.fast
@pytest.mark.parametrize("ending", ["commit", "abort"])
def test_an_upload_whose_close_fails_still_deletes_its_temporary_file(tmp_path, ending):
    storage = FilesystemStorage(str(tmp_path))
    storage.check()
    data = b"half a layer"
    upload = storage.upload()
    upload.write(data)
    upload._file = FullDiskFile(upload._file)
    if ending == "commit":
        with pytest.raises(StorageFull, match="storage is full"):
            upload.commit(sha256(data), hashlib.md5(data).hexdigest(), len(data), "application/octet-stream")
    else:
        upload.abort()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert storage.stat(sha256(data)) is None


@pytest.mark.parametrize("breakage", ["not a database", "damaged pages"])
def test_a_broken_cache_file_is_set_aside_and_the_registry_starts_and_serves(start_registry, tmp_path, breakage):
    state = tmp_path / "state"
    cache = state / "cache.sqlite"
    if breakage == "not a database":
        state.mkdir()
        cache.write_bytes(b"this is no SQLite file\n" * 500)
    else:
        first = start_registry(state_dir=state)
        assert first.get("/v2/hello/manifests/latest", headers=OCI).status_code == 200
        first.stop()
        data = bytearray(cache.read_bytes())
        data[4096:] = os.urandom(len(data) - 4096)  # every page but the header's
        cache.write_bytes(bytes(data))
        for suffix in ("-wal", "-shm"):
            Path(f"{cache}{suffix}").unlink(missing_ok=True)
    registry = start_registry(state_dir=state)
    assert registry.get("/v2/hello/manifests/latest", headers=OCI).status_code == 200
    [reset] = registry.events("cache-reset")
    assert reset["severity"] == "WARNING"
    assert Path(reset["moved_to"]).exists() and Path(reset["moved_to"]).name.startswith("cache.sqlite.broken-")
    assert registry.get("/v2/hello/manifests/latest", headers=OCI).status_code == 200
    assert len(registry.builds()) == 1, "the new cache file records what was built"


@pytest.mark.fast
def test_a_cache_file_broken_while_in_use_is_replaced_at_the_next_call(tmp_path, capsys):
    path = tmp_path / "cache.sqlite"
    cache = SqliteCache(str(path))
    for i in range(300):
        cache.put_layer(LayerRecord(f"layer-{i}", "sha256:" + "a" * 64, "sha256:" + "b" * 64, i, "c" * 32))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)
    path.write_bytes(bytes(data))
    with pytest.raises(sqlite3.DatabaseError):
        cache.get_layer("layer-150")  # this call fails (the builder treats it as a miss) ...
    assert cache.get_layer("layer-150") is None  # ... the next one reads a new, empty file
    cache.put_layer(LayerRecord("again", "sha256:" + "a" * 64, "sha256:" + "b" * 64, 1, "c" * 32))
    assert cache.get_layer("again") is not None
    assert '"event":"cache-reset"' in capsys.readouterr().out
    assert len(list(tmp_path.glob("cache.sqlite.broken-*"))) == 1


def test_clients_see_no_host_path_when_nix_is_missing_and_the_log_keeps_it(start_registry, tmp_path):
    missing = tmp_path / "no-nix-here"
    registry = start_registry({"NIX_BIN_DIR": str(missing)})
    response = registry.get("/v2/hello/manifests/latest")
    assert response.status_code == 500
    assert "cannot run <path>" in response.json()["errors"][0]["message"]
    assert str(tmp_path) not in response.text
    [logged] = [e for e in registry.events("request") if e["status"] == 500]
    assert str(missing) in logged["cause"], "the operator's log keeps the whole message"


# -- GCS (fake-gcs-server) ------------------------------------------------------------------------

def object_name(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":")[1]


def test_gcs_layers_failing_the_md5_check_are_packed_again_and_a_lost_blob_heals(
        start_registry, gcs_registry_env, gcs_bucket):
    registry = start_registry({**gcs_registry_env, "NIXERY_CACHE_BACKEND": "sqlite"})
    hello = registry.get("/v2/hello/manifests/latest", headers=OCI).json()
    for i, layer in enumerate(hello["layers"]):
        blob = gcs_bucket.blob(object_name(layer["digest"]))
        if i % 2:
            blob.upload_from_string(b"wrong bytes")  # an object overwritten by hand
        else:
            blob.delete()  # a lifecycle rule, an operator emptying the bucket
    goodbye = registry.get("/v2/goodbye/manifests/latest", headers=OCI).json()
    shared = {l["digest"] for l in hello["layers"]} & {l["digest"] for l in goodbye["layers"]}
    assert len(shared) >= 3
    assert {e["digest"] for e in registry.events("layer-repacked")} == shared
    for layer in goodbye["layers"]:
        stored = gcs_bucket.get_blob(object_name(layer["digest"]))
        assert stored.size == layer["size"]
        assert sha256(stored.download_as_bytes()) == layer["digest"]
    # One of hello's own layers was deleted: its blob request fails once and the next pull rebuilds.
    lost = next(l for i, l in enumerate(hello["layers"]) if i % 2 == 0 and l["digest"] not in shared)
    assert registry.get(f"/v2/hello/blobs/{lost['digest']}", allow_redirects=False).status_code == 404
    assert registry.get("/v2/hello/manifests/latest", headers=OCI).json() == hello
    for layer in hello["layers"]:
        stored = gcs_bucket.get_blob(object_name(layer["digest"]))
        md5 = base64.b64encode(hashlib.md5(stored.download_as_bytes()).digest()).decode()
        assert stored.size == layer["size"] and stored.md5_hash == md5
        assert sha256(stored.download_as_bytes()) == layer["digest"]
    assert registry.get(f"/v2/hello/blobs/{lost['digest']}", allow_redirects=False).status_code == 307
    assert [b["image"] for b in registry.builds()] == ["hello", "goodbye", "hello"]
