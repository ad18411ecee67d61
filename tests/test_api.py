"""The registry API as clients see it over HTTP, against a real functions-framework process and real Nix."""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import http.client
import json
import re
import subprocess
import time

import pytest
import requests

from builder.manifest import DOCKER_MANIFEST, OCI_MANIFEST

OCI = {"Accept": OCI_MANIFEST}
DOCKER = {"Accept": DOCKER_MANIFEST}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_error(response: requests.Response, status: int, code: str, *message_parts: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    error = response.json()["errors"][0]
    assert error["code"] == code
    assert error["message"]
    for part in message_parts:
        assert part in error["message"], error["message"]
    return error


def test_base_endpoint(shared_registry):
    response = shared_registry.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert shared_registry.get("/v2").status_code == 200


def test_manifest_in_both_media_types_over_the_same_blobs(shared_registry):
    docker = shared_registry.get("/v2/hello/manifests/latest", headers=DOCKER)
    oci = shared_registry.get("/v2/hello/manifests/latest", headers=OCI)
    for response, media_type in ((docker, DOCKER_MANIFEST), (oci, OCI_MANIFEST)):
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"] == media_type
        assert response.json()["mediaType"] == media_type
        assert response.headers["Docker-Content-Digest"] == sha256(response.content)
        assert int(response.headers["Content-Length"]) == len(response.content)
    d, o = docker.json(), oci.json()
    assert d["config"]["digest"] == o["config"]["digest"]
    assert [l["digest"] for l in d["layers"]] == [l["digest"] for l in o["layers"]]
    assert d["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert o["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert {l["mediaType"] for l in d["layers"]} == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}
    assert {l["mediaType"] for l in o["layers"]} == {"application/vnd.oci.image.layer.v1.tar+gzip"}


def test_accept_sent_as_separate_header_lines_is_read_whole(shared_registry):
    # What Go clients send: one Accept line per type, OCI among them but not first.
    connection = http.client.HTTPConnection(shared_registry.host, timeout=120)
    connection.putrequest("GET", "/v2/hello/manifests/latest")
    for media_type in ("application/vnd.docker.distribution.manifest.v1+prettyjws", OCI_MANIFEST, DOCKER_MANIFEST):
        connection.putheader("Accept", media_type)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == OCI_MANIFEST
    connection.close()


def test_image_config_and_layers_are_fetchable_and_match_their_digests(shared_registry):
    manifest = shared_registry.get("/v2/shell/hello/manifests/latest", headers=OCI).json()
    config_response = shared_registry.get(f"/v2/shell/hello/blobs/{manifest['config']['digest']}")
    assert config_response.status_code == 200
    assert sha256(config_response.content) == manifest["config"]["digest"]
    config = json.loads(config_response.content)
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["created"] == "1970-01-01T00:00:01Z"
    assert config["config"]["Cmd"] == ["bash"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt" in config["config"]["Env"]
    assert any(e.startswith("PATH=") for e in config["config"]["Env"])
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    for layer in manifest["layers"]:
        blob = shared_registry.get(f"/v2/shell/hello/blobs/{layer['digest']}")
        assert blob.status_code == 200
        assert blob.headers["Docker-Content-Digest"] == layer["digest"]
        assert sha256(blob.content) == layer["digest"] and len(blob.content) == layer["size"]


def test_head_answers_like_get_without_a_body_and_without_a_second_build(registry):
    head = registry.head("/v2/goodbye/manifests/latest", headers=DOCKER)
    assert head.status_code == 200
    assert head.content == b""
    get = registry.get(f"/v2/goodbye/manifests/{head.headers['Docker-Content-Digest']}", headers=DOCKER)
    assert head.headers["Docker-Content-Digest"] == sha256(get.content)
    assert int(head.headers["Content-Length"]) == len(get.content)
    assert head.headers["Content-Type"] == get.headers["Content-Type"] == DOCKER_MANIFEST
    registry.get("/v2/goodbye/manifests/latest", headers=DOCKER)
    registry.head("/v2/goodbye/manifests/latest", headers=OCI)
    assert len(registry.builds()) == 1

    layer = get.json()["layers"][0]
    blob_head = registry.head(f"/v2/goodbye/blobs/{layer['digest']}")
    assert blob_head.status_code == 200 and blob_head.content == b""
    assert int(blob_head.headers["Content-Length"]) == layer["size"]
    assert blob_head.headers["Docker-Content-Digest"] == layer["digest"]


def test_manifest_by_digest_under_any_repository_name(shared_registry):
    tagged = shared_registry.get("/v2/hello/manifests/latest", headers=OCI)
    digest = tagged.headers["Docker-Content-Digest"]
    for name in ("hello", "some/other/name"):
        by_digest = shared_registry.get(f"/v2/{name}/manifests/{digest}", headers=OCI)
        assert by_digest.status_code == 200
        assert by_digest.content == tagged.content
        assert by_digest.headers["Content-Type"] == OCI_MANIFEST
        assert by_digest.headers["Docker-Content-Digest"] == digest
    # A layer's digest is not a manifest.
    layer = tagged.json()["layers"][0]["digest"]
    assert_error(shared_registry.get(f"/v2/hello/manifests/{layer}"), 404, "MANIFEST_UNKNOWN")


def test_blob_range_requests(shared_registry):
    manifest = shared_registry.get("/v2/hello/manifests/latest", headers=OCI).json()
    layer = max(manifest["layers"], key=lambda l: l["size"])
    whole = shared_registry.get(f"/v2/hello/blobs/{layer['digest']}").content
    part = shared_registry.get(f"/v2/hello/blobs/{layer['digest']}", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == whole[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{len(whole)}"
    tail = shared_registry.get(f"/v2/hello/blobs/{layer['digest']}", headers={"Range": "bytes=-5"})
    assert tail.content == whole[-5:]
    beyond = shared_registry.get(f"/v2/hello/blobs/{layer['digest']}", headers={"Range": f"bytes={len(whole) + 10}-"})
    assert_error(beyond, 416, "RANGE_INVALID")


def test_tags_list(shared_registry):
    response = shared_registry.get("/v2/shell/hello/tags/list")
    assert response.status_code == 200
    assert response.json() == {"name": "shell/hello", "tags": ["latest"]}
    assert shared_registry.get("/v2/hello/tags/list?n=0").json()["tags"] == []


def test_name_resolution_like_nixery(shared_registry):
    # camelCase attribute by its lower-case name, a digit-led name via "_", a nested attribute path.
    for name in ("helloworld", "7zip", "demopackages.nested"):
        response = shared_registry.get(f"/v2/{name}/manifests/latest")
        assert response.status_code == 200, (name, response.text)


def test_same_packages_in_any_order_are_one_image(shared_registry):
    a = shared_registry.get("/v2/hello/goodbye/manifests/latest", headers=OCI)
    b = shared_registry.get("/v2/goodbye/hello/goodbye/manifests/latest", headers=OCI)
    assert a.headers["Docker-Content-Digest"] == b.headers["Docker-Content-Digest"]


def test_images_sharing_packages_share_layers(shared_registry):
    hello = shared_registry.get("/v2/hello/manifests/latest", headers=OCI).json()
    goodbye = shared_registry.get("/v2/goodbye/manifests/latest", headers=OCI).json()
    shared = {l["digest"] for l in hello["layers"]} & {l["digest"] for l in goodbye["layers"]}
    # Both hold libgreeting, busybox and the always-included cacert and iana-etc.
    assert len(shared) >= 3


def test_unknown_packages_are_all_named(shared_registry):
    response = shared_registry.get("/v2/hello/nosuchthing/neitherthis/manifests/latest")
    error = assert_error(response, 404, "MANIFEST_UNKNOWN", "nosuchthing", "neitherthis")
    assert "hello" not in error["message"].split(":", 1)[1]


def test_package_failing_to_evaluate_shows_nix_error(shared_registry):
    response = shared_registry.get("/v2/failstoevaluate/manifests/latest")
    error = assert_error(response, 404, "MANIFEST_UNKNOWN", "failsToEvaluate")
    assert "\x00" not in error["message"] and "\x1b" not in error["message"]


def test_package_failing_to_build_shows_build_log_and_is_remembered(registry):
    first = registry.get("/v2/hello/failstobuild/manifests/latest")
    error = assert_error(first, 404, "MANIFEST_UNKNOWN", "failsToBuild")
    second = registry.get("/v2/hello/failstobuild/manifests/latest")
    assert second.json()["errors"][0]["message"] == error["message"]
    assert len(registry.builds()) == 1, "a remembered failure is not rebuilt by every retry"
    page = registry.get("/")
    assert page.status_code == 200 and "failstobuild" in page.text


def test_build_that_never_finishes_times_out_with_a_client_error(start_registry):
    registry = start_registry({"NIX_TIMEOUT": "5"})
    response = registry.get("/v2/neverfinishes/manifests/latest", timeout=60)
    assert_error(response, 404, "MANIFEST_UNKNOWN", "timed out")
    # The next request after a fault succeeds.
    assert registry.get("/v2/hello/manifests/latest").status_code == 200


def test_unknown_tag(shared_registry):
    assert_error(shared_registry.get("/v2/hello/manifests/nosuchtag"), 404, "MANIFEST_UNKNOWN", "nosuchtag")


@pytest.mark.parametrize("path, status, code", [
    ("/v2/Hello/manifests/latest", 400, "NAME_INVALID"),
    ("/v2/hello/manifests/-bad", 404, "MANIFEST_UNKNOWN"),
    ("/v2/hello/manifests/.INVALID_MANIFEST_NAME", 404, "MANIFEST_UNKNOWN"),
    ("/v2/hello/manifests/sha256:1234", 400, "DIGEST_INVALID"),
    ("/v2/hello/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
    ("/v2/hello/blobs/latest", 400, "DIGEST_INVALID"),
    ("/v2/hello/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
    ("/v2/hello/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
    ("/v2/hello/nonsense", 404, "NAME_UNKNOWN"),
    ("/v2/" + "/".join(f"p{i}" for i in range(100)) + "/manifests/latest", 400, "NAME_INVALID"),
])
def test_malformed_requests_get_spec_errors_without_running_nix(registry, path, status, code):
    assert_error(registry.get(path), status, code)
    assert registry.builds() == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_push_and_delete_are_unsupported(shared_registry, method):
    for path in ("/v2/hello/manifests/latest", "/v2/hello/blobs/uploads/", "/v2/"):
        response = requests.request(method, shared_registry.url + path, timeout=10)
        assert_error(response, 405, "UNSUPPORTED")


def test_second_pull_runs_no_nix_and_expired_entries_rebuild(start_registry):
    registry = start_registry({"MANIFEST_TTL": "2"})
    first = registry.get("/v2/tools/manifests/latest", headers=OCI)
    second = registry.get("/v2/tools/manifests/latest", headers=OCI)
    assert first.content == second.content
    assert len(registry.builds()) == 1
    time.sleep(2.5)
    third = registry.get("/v2/tools/manifests/latest", headers=OCI)
    assert third.content == first.content
    builds = registry.builds()
    assert len(builds) == 2
    assert builds[1]["layers_packed"] == 0, "layers already stored are not packed again"


def test_an_emptied_cache_repacks_no_layer_that_storage_holds(start_registry, tmp_path):
    state = tmp_path / "state"
    first = start_registry(state_dir=state)
    built = first.get("/v2/shell/hello/manifests/latest", headers=OCI)
    first.stop()
    for cache_file in state.glob("cache.sqlite*"):
        cache_file.unlink()
    second = start_registry(state_dir=state)
    again = second.get("/v2/shell/hello/manifests/latest", headers=OCI)
    assert again.headers["Docker-Content-Digest"] == built.headers["Docker-Content-Digest"]
    rebuilt = second.builds()[0]
    assert rebuilt["layers"] == first.builds()[0]["layers_packed"] > 1
    assert rebuilt["layers_packed"] == 0, "every layer was found through storage's layer index"


def test_a_layer_whose_blob_is_gone_is_packed_again_despite_its_index_record(start_registry, tmp_path):
    state = tmp_path / "state"
    first = start_registry(state_dir=state)
    manifest = first.get("/v2/goodbye/manifests/latest", headers=OCI).json()
    first.stop()
    for cache_file in state.glob("cache.sqlite*"):
        cache_file.unlink()
    gone = manifest["layers"][0]["digest"]
    (state / "storage" / "blobs" / "sha256" / gone.split(":")[1]).unlink()
    second = start_registry(state_dir=state)
    again = second.get("/v2/goodbye/manifests/latest", headers=OCI).json()
    assert again == manifest
    assert second.builds()[0]["layers_packed"] == 1
    assert second.get(f"/v2/goodbye/blobs/{gone}").status_code == 200


def test_a_manifest_is_served_only_with_the_bytes_its_digest_names(start_registry, tmp_path):
    state = tmp_path / "state"
    digest = start_registry(state_dir=state).get("/v2/goodbye/manifests/latest", headers=OCI).headers["Docker-Content-Digest"]
    stored = next((state / "storage").rglob(digest.split(":")[1]))
    stored.write_bytes(stored.read_bytes() + b"\n")  # still a valid manifest, no longer the digest's
    assert_error(start_registry(state_dir=state).get(f"/v2/goodbye/manifests/{digest}", headers=OCI),
                 404, "MANIFEST_UNKNOWN", digest)


def test_two_cold_builds_give_the_same_digests_at_any_packing_parallelism(start_registry):
    a = start_registry({"PACK_WORKERS": "1"}).get("/v2/shell/hello/manifests/latest", headers=OCI)
    b = start_registry({"PACK_WORKERS": "5"}).get("/v2/shell/hello/manifests/latest", headers=OCI)
    assert a.status_code == b.status_code == 200
    assert a.headers["Docker-Content-Digest"] == b.headers["Docker-Content-Digest"]


def test_concurrent_cold_requests_run_one_build(registry):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: registry.get("/v2/hello/tools/manifests/latest", headers=OCI), range(8)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.headers["Docker-Content-Digest"] for r in responses}) == 1
    assert len(registry.builds()) == 1


def test_logs_are_structured(registry):
    registry.get("/v2/hello/manifests/latest")
    build = registry.builds()[0]
    assert build["severity"] == "INFO" and build["result"] == "built"
    assert build["image"] == "hello" and build["duration"] > 0
    requests_logged = registry.events("request")
    assert any(e["status"] == 200 and e["path"] == "/v2/hello/manifests/latest" for e in requests_logged)


def test_index_page(shared_registry):
    page = shared_registry.get("/")
    assert page.status_code == 200
    assert "text/html" in page.headers["Content-Type"]
    assert f"docker pull {shared_registry.host}/shell/hello" in page.text


def connection_holders(port: int) -> list[int]:
    """Server-side processes holding the established connections on `port` (from `ss`)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], check=True,
                         capture_output=True, text=True).stdout
    return [int(pid) for pid in re.findall(r"pid=(\d+)", out)]


def wait_for_both_workers(registry) -> None:
    """The registry answers once its first worker is up; the second boots a moment later."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        clients = [http.client.HTTPConnection(registry.host, timeout=30) for _ in range(2)]
        for client in clients:
            client.request("GET", "/v2/")
            client.getresponse().read()
        holders = set(connection_holders(registry.port))
        for client in clients:
            client.close()
        time.sleep(0.3)
        if len(holders) == 2:
            return
    raise AssertionError("the second worker never took a connection")


@pytest.mark.parametrize("connections", [2, 8])
def test_keep_alive_connections_are_spread_evenly_over_the_workers(start_registry, connections):
    registry = start_registry({"WORKERS": "2", "THREADS": "8"})
    wait_for_both_workers(registry)
    for _ in range(3):  # each round on new connections
        clients = [http.client.HTTPConnection(registry.host, timeout=30) for _ in range(connections)]
        for _ in range(2):  # a connection a worker gives up after its first answer is made again
            for client in clients:
                client.request("GET", "/v2/")
                assert client.getresponse().read() is not None
        holders = connection_holders(registry.port)
        assert len(holders) == connections
        assert sorted(collections.Counter(holders).values()) == [connections // 2] * 2
        for client in clients:
            client.close()
        time.sleep(0.3)  # the workers see the connections close
