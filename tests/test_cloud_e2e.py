"""The registry on its cloud backends: GCS (fake-gcs-server) and Firestore (Google's emulator),
driven through the official clients by real registry processes and real registry clients."""
from __future__ import annotations

import concurrent.futures
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests

from builder.manifest import OCI_INDEX, OCI_MANIFEST
from tests.demo_variants import slow_demo
from tests.test_clients import skopeo_to_oci, unpack_and_run

OCI = {"Accept": OCI_MANIFEST}


def generations(bucket) -> dict[str, int]:
    return {blob.name: blob.generation for blob in bucket.client.list_blobs(bucket.name) if blob.name.startswith("blobs/")}


def sqlite_images(path: Path) -> list:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT key FROM images").fetchall()


# -- GCS -----------------------------------------------------------------------------------------

def test_skopeo_pull_follows_signed_redirects_to_the_bucket(start_registry, gcs_registry_env, gcs_bucket, tmp_path):
    registry = start_registry({**gcs_registry_env, "NIXERY_CACHE_BACKEND": "sqlite"})
    manifest = registry.get("/v2/shell/hello/manifests/latest", headers=OCI).json()
    layer = manifest["layers"][0]["digest"]
    redirect = registry.get(f"/v2/shell/hello/blobs/{layer}", allow_redirects=False)
    assert redirect.status_code == 307
    assert redirect.headers["Docker-Content-Digest"] == layer
    query = parse_qs(urlparse(redirect.headers["Location"]).query)
    assert query["X-Goog-Algorithm"] == ["GOOG4-RSA-SHA256"]
    assert 0 < int(query["X-Goog-Expires"][0]) <= 900
    head = registry.head(f"/v2/shell/hello/blobs/{layer}")
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == manifest["layers"][0]["size"]
    # Every blob, config and manifest lives in the bucket.
    names = set(generations(gcs_bucket))
    assert {f"blobs/sha256/{l['digest'].split(':')[1]}" for l in manifest["layers"]} <= names
    # skopeo verifies every digest it downloads through the redirects.
    skopeo_to_oci(registry, "shell/hello", tmp_path / "layout")
    assert "Hello, world!" in unpack_and_run(tmp_path / "layout", tmp_path / "bundle", "/bin/hello")


def test_manifests_by_digest_are_served_by_any_instance(start_registry, gcs_registry_env):
    env = {**gcs_registry_env, "NIXERY_CACHE_BACKEND": "sqlite"}
    first, second = start_registry(env), start_registry(env)
    digest = first.head("/v2/hello/manifests/latest", headers=OCI).headers["Docker-Content-Digest"]
    by_digest = second.get(f"/v2/other/name/manifests/{digest}", headers=OCI)
    assert by_digest.status_code == 200 and by_digest.headers["Docker-Content-Digest"] == digest
    assert second.builds() == []


def test_layers_already_in_the_bucket_are_not_uploaded_again(start_registry, gcs_registry_env, gcs_bucket):
    # Two instances with caches of their own share the bucket: the second finds the shared
    # layers through the bucket's layer index (its own cache is empty) and uploads none again.
    env = {**gcs_registry_env, "NIXERY_CACHE_BACKEND": "sqlite"}
    a = start_registry(env).get("/v2/hello/manifests/latest", headers=OCI).json()
    before = generations(gcs_bucket)
    b = start_registry(env).get("/v2/goodbye/manifests/latest", headers=OCI).json()
    after = generations(gcs_bucket)
    shared = {l["digest"] for l in a["layers"]} & {l["digest"] for l in b["layers"]}
    assert len(shared) >= 3
    for digest in shared:
        name = f"blobs/sha256/{digest.split(':')[1]}"
        assert after[name] == before[name], f"{name} was uploaded again"
    assert set(after) - set(before), "image B's own layers were uploaded"


def test_an_object_with_wrong_bytes_is_replaced(start_registry, gcs_registry_env, gcs_bucket):
    env = {**gcs_registry_env, "NIXERY_CACHE_BACKEND": "sqlite"}
    manifest = start_registry(env).get("/v2/tools/manifests/latest", headers=OCI).json()
    layer = manifest["layers"][-1]
    blob = gcs_bucket.blob(f"blobs/sha256/{layer['digest'].split(':')[1]}")
    blob.upload_from_string(b"corrupt")
    # A fresh instance (empty layer cache) finds the layer in the bucket's index, sees the object's
    # size and MD5 differ from the record, and packs and uploads the layer again.
    fresh = start_registry(env)
    assert fresh.get("/v2/tools/manifests/latest", headers=OCI).json() == manifest
    replaced = gcs_bucket.get_blob(blob.name)
    assert replaced.size == layer["size"] and replaced.generation != blob.generation


def test_concurrent_cold_pulls_from_two_processes(start_registry, gcs_registry_env, gcs_bucket):
    env = {**gcs_registry_env, "NIXERY_CACHE_BACKEND": "sqlite"}
    registries = [start_registry(env), start_registry(env)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda r: r.get("/v2/shell/tools/manifests/latest", headers=OCI), registries * 2))
    assert {r.status_code for r in responses} == {200}
    assert len({r.headers["Docker-Content-Digest"] for r in responses}) == 1
    for layer in responses[0].json()["layers"]:
        blob = gcs_bucket.get_blob(f"blobs/sha256/{layer['digest'].split(':')[1]}")
        assert blob is not None and blob.size == layer["size"]


def test_storage_failure_leaves_no_cache_entry_and_the_next_request_succeeds(
        start_registry, gcs_restartable_emulator, gcs_service_account_key, tmp_path):
    client = gcs_restartable_emulator.client()
    bucket = client.create_bucket("layers")
    registry = start_registry({
        "NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": bucket.name, "NIXERY_CACHE_BACKEND": "sqlite",
        "GOOGLE_APPLICATION_CREDENTIALS": str(gcs_service_account_key.path), **gcs_restartable_emulator.env(),
    })
    gcs_restartable_emulator.stop()
    failed = registry.get("/v2/bigpackage/manifests/latest", headers=OCI)
    assert failed.status_code >= 500 and failed.json()["errors"][0]["message"]
    assert sqlite_images(registry.state_dir / "cache.sqlite") == []
    gcs_restartable_emulator.start()
    retried = registry.get("/v2/bigpackage/manifests/latest", headers=OCI)
    assert retried.status_code == 200
    for layer in retried.json()["layers"]:
        assert bucket.get_blob(f"blobs/sha256/{layer['digest'].split(':')[1]}").size == layer["size"]


# -- Firestore -----------------------------------------------------------------------------------

@pytest.fixture
def cloud_env(gcs_registry_env, firestore_registry_env) -> dict[str, str]:
    """The deployed configuration: GCS for blobs, Firestore for the cache."""
    return {**gcs_registry_env, **firestore_registry_env}


def test_expired_manifest_is_rebuilt(start_registry, cloud_env):
    registry = start_registry({**cloud_env, "MANIFEST_TTL": "2"})
    first = registry.get("/v2/hello/manifests/latest", headers=OCI)
    registry.get("/v2/hello/manifests/latest", headers=OCI)
    assert len(registry.builds()) == 1
    time.sleep(2.5)
    assert registry.get("/v2/hello/manifests/latest", headers=OCI).content == first.content
    assert len(registry.builds()) == 2


def test_a_fresh_instance_serves_a_cached_image_without_nix(start_registry, cloud_env):
    start_registry(cloud_env).get("/v2/goodbye/manifests/latest", headers=OCI)
    fresh = start_registry(cloud_env)
    assert fresh.get("/v2/goodbye/manifests/latest", headers=OCI).status_code == 200
    assert fresh.builds() == []


def test_twenty_concurrent_cold_requests_over_two_instances_run_one_build(start_registry, cloud_env):
    registries = [start_registry(cloud_env), start_registry(cloud_env)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(
            lambda i: registries[i % 2].get("/v2/shell/goodbye/tools/manifests/latest", headers=OCI), range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.headers["Docker-Content-Digest"] for r in responses}) == 1
    assert sum(len(r.builds()) for r in registries) == 1


def test_a_dead_build_holder_is_taken_over(start_registry, cloud_env, tmp_path):
    env = {**cloud_env, "NIXERY_PKGS_PATH": str(slow_demo(tmp_path, 6)), "BUILD_LEASE_SECONDS": "5"}
    holder, other = start_registry(env), start_registry(env)
    threading.Thread(target=lambda: _ignore_errors(holder.get, "/v2/hello/manifests/latest"), daemon=True).start()
    deadline = time.monotonic() + 60
    while not _nix_running_for(holder) and time.monotonic() < deadline:
        time.sleep(0.1)
    holder.kill()  # dies holding the lease
    response = other.get("/v2/hello/manifests/latest", headers=OCI, timeout=120)
    assert response.status_code == 200, response.text
    assert len(other.builds()) == 1
    assert holder.builds() == []


def _ignore_errors(call, *args):
    try:
        call(*args)
    except requests.RequestException:
        pass


def _nix_running_for(registry) -> bool:
    """Whether the registry has started Nix (its work dir holds a build folder)."""
    work = Path(registry.env["WORK_DIR"])
    return work.exists() and any(work.iterdir())


def test_pulls_succeed_with_firestore_down(start_registry, cloud_env, firestore_emulator):
    registry = start_registry(cloud_env)
    assert registry.get("/v2/hello/manifests/latest", headers=OCI).status_code == 200
    firestore_emulator.stop()
    try:
        assert registry.get("/v2/hello/manifests/latest", headers=OCI).status_code == 200
        assert registry.get("/v2/goodbye/manifests/latest", headers=OCI).status_code == 200
        assert registry.events("cache-degraded"), "the degraded cache is logged"
    finally:
        firestore_emulator.start()
    # And a cold instance with the emulator gone altogether still builds and serves.


def test_an_index_in_the_bucket_and_firestore_is_served_by_a_fresh_instance_without_nix(start_registry, cloud_env):
    index_accept = {"Accept": OCI_INDEX}
    first = start_registry(cloud_env).get("/v2/goodbye/tools/manifests/latest", headers=index_accept)
    assert first.status_code == 200, first.text
    assert [m["platform"]["architecture"] for m in first.json()["manifests"]] == ["amd64", "arm64"]
    fresh = start_registry(cloud_env)
    again = fresh.get("/v2/goodbye/tools/manifests/latest", headers=index_accept)
    assert again.content == first.content and fresh.builds() == []
    for entry in again.json()["manifests"]:
        manifest = fresh.get(f"/v2/goodbye/tools/manifests/{entry['digest']}", headers=OCI)
        assert manifest.status_code == 200 and manifest.headers["Docker-Content-Digest"] == entry["digest"]
        for blob in [manifest.json()["config"], *manifest.json()["layers"]]:
            assert fresh.head(f"/v2/goodbye/tools/blobs/{blob['digest']}").status_code == 200
