"""One image name for every platform: the image index, over HTTP against a real registry and real Nix."""
from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from builder.config import Config
from builder.errors import ServerError
from builder.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from tests.demo_variants import slow_demo

REPO = Path(__file__).resolve().parent.parent
# What Docker sends when it HEADs a tag (containerd and the containers/image clients send the same set).
DOCKER_ACCEPT = [DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST]
DOCKER_ONLY = {"Accept": f"{DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}"}
OCI_ONLY = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
OMITTED = "Nixery-Omitted-Platforms"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def index_of(registry, name: str, headers=OCI_ONLY) -> dict:
    response = registry.get(f"/v2/{name}/manifests/latest", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def by_platform(index: dict) -> dict[str, dict]:
    return {f"{m['platform']['os']}/{m['platform']['architecture']}": m for m in index["manifests"]}


def demo_out_path(attribute: str, system: str) -> str:
    """Where Nix puts the demo set's `attribute` for `system`: what that platform's image must hold."""
    expression = f'(import {REPO / "nix" / "demo"} {{ system = "{system}"; }}).{attribute}.outPath'
    return json.loads(subprocess.run(["nix-instantiate", "--eval", "--json", "-E", expression],
                                     capture_output=True, text=True, check=True).stdout)


def image_files(registry, name: str, digest: str) -> dict[str, bytes | None]:
    """Every path in the image's layers -> its bytes (None for directories and links)."""
    manifest = registry.get(f"/v2/{name}/manifests/{digest}", headers={"Accept": OCI_MANIFEST}).json()
    files: dict[str, bytes | None] = {}
    for layer in manifest["layers"]:
        blob = registry.get(f"/v2/{name}/blobs/{layer['digest']}").content
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
            for member in tar:
                files[member.name.lstrip("./").lstrip("/")] = tar.extractfile(member).read() if member.isfile() else None
    return files


def config_of(registry, name: str, digest: str) -> dict:
    manifest = registry.get(f"/v2/{name}/manifests/{digest}", headers={"Accept": OCI_MANIFEST}).json()
    return registry.get(f"/v2/{name}/blobs/{manifest['config']['digest']}").json()


def test_a_client_accepting_an_oci_index_gets_one_image_per_default_platform(shared_registry):
    response = shared_registry.get("/v2/hello/manifests/latest", headers=OCI_ONLY)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == OCI_INDEX
    assert response.headers["Docker-Content-Digest"] == sha256(response.content)
    assert OMITTED not in response.headers
    index = response.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    assert list(by_platform(index)) == ["linux/amd64", "linux/arm64"]
    assert {m["mediaType"] for m in index["manifests"]} == {OCI_MANIFEST}


def test_a_docker_only_client_gets_a_manifest_list_of_docker_manifests(shared_registry):
    response = shared_registry.get("/v2/hello/manifests/latest", headers=DOCKER_ONLY)
    assert response.headers["Content-Type"] == DOCKER_MANIFEST_LIST
    listing = response.json()
    assert listing["mediaType"] == DOCKER_MANIFEST_LIST
    assert list(by_platform(listing)) == ["linux/amd64", "linux/arm64"]
    for platform, entry in by_platform(listing).items():
        assert entry["mediaType"] == DOCKER_MANIFEST
        served = shared_registry.get(f"/v2/hello/manifests/{entry['digest']}")
        assert served.headers["Content-Type"] == DOCKER_MANIFEST
        assert sha256(served.content) == entry["digest"] and len(served.content) == entry["size"]


def test_docker_accept_set_gets_the_oci_index(shared_registry):
    response = shared_registry.head("/v2/hello/manifests/latest", headers={"Accept": ", ".join(DOCKER_ACCEPT)})
    assert response.headers["Content-Type"] == OCI_INDEX


def test_single_manifest_clients_get_the_amd64_image(shared_registry):
    for accept in (OCI_MANIFEST, DOCKER_MANIFEST):
        response = shared_registry.get("/v2/hello/manifests/latest", headers={"Accept": accept})
        assert response.headers["Content-Type"] == accept
        assert config_of(shared_registry, "hello", response.headers["Docker-Content-Digest"])["architecture"] == "amd64"
    assert shared_registry.get("/v2/hello/manifests/latest").headers["Content-Type"] == DOCKER_MANIFEST


def test_each_entry_is_the_manifest_its_platforms_name_returns(shared_registry):
    entries = by_platform(index_of(shared_registry, "shell/hello"))
    amd64 = shared_registry.head("/v2/shell/hello/manifests/latest", headers={"Accept": OCI_MANIFEST})
    arm64 = shared_registry.head("/v2/arm64/shell/hello/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert entries["linux/amd64"]["digest"] == amd64.headers["Docker-Content-Digest"]
    assert entries["linux/arm64"]["digest"] == arm64.headers["Docker-Content-Digest"]
    assert entries["linux/amd64"]["digest"] != entries["linux/arm64"]["digest"]
    # A name that chooses its platform means that one image, also for index-accepting clients.
    alone = shared_registry.get("/v2/arm64/shell/hello/manifests/latest", headers=OCI_ONLY)
    assert alone.headers["Content-Type"] == OCI_MANIFEST
    assert alone.headers["Docker-Content-Digest"] == entries["linux/arm64"]["digest"]


def test_each_platforms_image_holds_that_platforms_build(shared_registry):
    entries = by_platform(index_of(shared_registry, "hello"))
    for platform, system in (("linux/amd64", "x86_64-linux"), ("linux/arm64", "aarch64-linux")):
        digest = entries[platform]["digest"]
        assert config_of(shared_registry, "hello", digest)["architecture"] == platform.split("/")[1]
        files = image_files(shared_registry, "hello", digest)
        hello, busybox = demo_out_path("hello", system), demo_out_path("busybox", system)
        assert hello.lstrip("/") + "/bin/hello" in files
        assert files[busybox.lstrip("/") + "/share/busybox/system"] == f"{system}\n".encode()
        other = demo_out_path("hello", "aarch64-linux" if system == "x86_64-linux" else "x86_64-linux")
        assert not any(path.startswith(other.lstrip("/")) for path in files)
        # The script's content names its own platform's busybox.
        assert busybox.encode() in files[hello.lstrip("/") + "/bin/hello"]


def test_the_index_is_served_by_digest_with_head_and_get(shared_registry):
    head = shared_registry.head("/v2/hello/manifests/latest", headers=OCI_ONLY)
    digest = head.headers["Docker-Content-Digest"]
    by_tag = shared_registry.get("/v2/hello/manifests/latest", headers=OCI_ONLY)
    by_digest = shared_registry.get(f"/v2/hello/manifests/{digest}")
    assert by_digest.status_code == 200 and by_digest.content == by_tag.content
    assert by_digest.headers["Content-Type"] == OCI_INDEX
    assert int(head.headers["Content-Length"]) == len(by_tag.content)
    head_by_digest = shared_registry.head(f"/v2/hello/manifests/{digest}")
    assert head_by_digest.status_code == 200 and head_by_digest.headers["Docker-Content-Digest"] == digest


def test_a_package_missing_on_one_platform_leaves_that_platform_out_and_says_why(shared_registry):
    response = shared_registry.get("/v2/shell/cpuid/manifests/latest", headers=OCI_ONLY)
    assert response.status_code == 200, response.text
    assert list(by_platform(response.json())) == ["linux/amd64"]
    omitted = json.loads(response.headers[OMITTED])
    assert list(omitted) == ["linux/arm64"]
    assert "cpuid" in omitted["linux/arm64"] and "aarch64-linux" in omitted["linux/arm64"]
    # Docker fetches the index again by digest: the note travels with it.
    again = shared_registry.get(f"/v2/shell/cpuid/manifests/{response.headers['Docker-Content-Digest']}")
    assert json.loads(again.headers[OMITTED]) == omitted
    # The platform's own name fails with Nix's reason.
    alone = shared_registry.get("/v2/arm64/shell/cpuid/manifests/latest", headers=OCI_ONLY)
    assert alone.status_code == 404 and "not available" in alone.json()["errors"][0]["message"]


def test_a_request_fails_only_when_every_platform_fails_naming_each_platforms_error(shared_registry):
    response = shared_registry.get("/v2/nosuchpkg/manifests/latest", headers=OCI_ONLY)
    assert response.status_code == 404
    error = response.json()["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["message"] == "linux/amd64, linux/arm64: unknown packages: nosuchpkg"
    # Different errors per platform: each named with its own.
    response = shared_registry.get("/v2/cpuid/failstobuild/manifests/latest", headers=OCI_ONLY)
    assert response.status_code == 404
    error = response.json()["errors"][0]
    lines = error["message"].splitlines()
    assert lines[0].startswith("linux/amd64: ") and "failsToBuild: this package is broken" in error["message"]
    assert any(line.startswith("linux/arm64: cpuid: ") for line in lines)
    assert set(error["detail"]["platforms"]) == {"linux/amd64", "linux/arm64"}


def test_per_platform_images_are_built_once_and_shared_by_names_and_indexes(registry):
    assert registry.get("/v2/arm64/goodbye/manifests/latest", headers={"Accept": OCI_MANIFEST}).status_code == 200
    assert [b["image"] for b in registry.builds()] == ["arm64/goodbye"]
    index_of(registry, "goodbye")  # reuses the arm64 image, builds only amd64
    assert sorted(b["image"] for b in registry.builds()) == ["arm64/goodbye", "goodbye"]
    index_of(registry, "tools", DOCKER_ONLY)  # builds both platforms...
    assert registry.get("/v2/arm64/tools/manifests/latest").status_code == 200  # ...which the names reuse
    assert registry.get("/v2/tools/manifests/latest").status_code == 200
    index_of(registry, "tools")
    assert sorted(b["image"] for b in registry.builds()) == ["arm64/goodbye", "arm64/tools", "goodbye", "tools"]


def test_concurrent_cold_index_requests_on_two_instances_build_each_platform_once(start_registry, tmp_path):
    # Two instances sharing their storage and cache, as Cloud Run instances share GCS and Firestore.
    env = {"STORAGE_PATH": str(tmp_path / "storage"), "CACHE_PATH": str(tmp_path / "cache.sqlite")}
    registries = [start_registry(env), start_registry(env)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: registries[i % 2].get("/v2/shell/goodbye/manifests/latest",
                                                                   headers=OCI_ONLY), range(8)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.headers["Docker-Content-Digest"] for a in answers}) == 1
    built = sorted(b["image"] for r in registries for b in r.builds() if b["result"] == "built")
    assert built == ["arm64/shell/goodbye", "shell/goodbye"]
    # Every blob of every platform is in storage.
    registry = registries[0]
    for entry in answers[0].json()["manifests"]:
        manifest = registry.get(f"/v2/shell/goodbye/manifests/{entry['digest']}").json()
        for blob in [manifest["config"], *manifest["layers"]]:
            assert registry.head(f"/v2/shell/goodbye/blobs/{blob['digest']}").status_code == 200


def test_platforms_setting_chooses_what_the_index_lists(start_registry):
    registry = start_registry({"PLATFORMS": "linux/arm64"})
    assert list(by_platform(index_of(registry, "hello"))) == ["linux/arm64"]
    none = start_registry({"PLATFORMS": ""})
    response = none.get("/v2/hello/manifests/latest", headers=OCI_ONLY)
    assert response.headers["Content-Type"] == OCI_MANIFEST


def test_platforms_setting_rejects_unknown_platforms():
    for value in ("linux/s390x", "arm64", "linux/amd64 linux/amd64"):
        with pytest.raises(ServerError, match="PLATFORMS"):
            Config.from_env({"PLATFORMS": value})


def test_the_index_expires_with_its_images_and_is_then_rebuilt(start_registry):
    registry = start_registry({"MANIFEST_TTL": "2"})
    first = registry.get("/v2/hello/manifests/latest", headers=OCI_ONLY)
    assert registry.get("/v2/hello/manifests/latest", headers=OCI_ONLY).content == first.content
    assert len(registry.builds()) == 2  # cached: no build for the second request
    time.sleep(2.5)
    again = registry.get("/v2/hello/manifests/latest", headers=OCI_ONLY)
    assert again.status_code == 200 and len(registry.builds()) == 4
    assert again.content == first.content  # the same packages give the same digests


def test_names_differing_only_in_meta_packages_get_their_own_indexes(shared_registry):
    plain = by_platform(index_of(shared_registry, "shell/hello"))
    nonroot = by_platform(index_of(shared_registry, "nonroot/shell/hello"))
    single = shared_registry.head("/v2/nonroot/shell/hello/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert nonroot["linux/amd64"]["digest"] == single.headers["Docker-Content-Digest"]
    assert nonroot["linux/amd64"]["digest"] != plain["linux/amd64"]["digest"]
    assert nonroot["linux/arm64"]["digest"] != plain["linux/arm64"]["digest"]


def test_a_host_that_cannot_build_a_platform_leaves_it_out_with_a_4xx_reason(start_registry, tmp_path):
    # Without extra-platforms, and nothing in a binary cache, aarch64-linux cannot be had here.
    registry = start_registry({"NIX_EXTRA_PLATFORMS": "", "NIXERY_PKGS_PATH": str(slow_demo(tmp_path, 0))})
    response = registry.get("/v2/hello/manifests/latest", headers=OCI_ONLY)
    assert response.status_code == 200, response.text
    assert list(by_platform(response.json())) == ["linux/amd64"]
    reason = json.loads(response.headers[OMITTED])["linux/arm64"]
    assert "hello" in reason and "cannot build for aarch64-linux" in reason
    alone = registry.get("/v2/arm64/hello/manifests/latest")
    assert alone.status_code == 404 and alone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
