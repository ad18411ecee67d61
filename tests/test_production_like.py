"""The function run as Cloud Functions runs it, on this machine (see tests/fixtures_nixcache.py).

functions-framework with entry point `registry` and the environment
terraform/function.tf sets, its cloud services swapped for local stand-ins:
fake-gcs-server, the Firestore emulator, and the Nix artefact and a signed binary
cache on loopback HTTP servers. It runs as `nobody` from a read-only copy of the
source, and each instance gets a private, empty /tmp, where terraform's
NIX_STORE_ROOT=/tmp/nix and WORK_DIR=/tmp/nixery are used verbatim.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fixtures_nixcache import (
    NOBODY, UNCACHED_PACKAGE, CloudFunction, function_root, make_function_source, require_tools,
    terraform_environment,
)


@pytest.fixture(scope="module")
def function_source():
    """The deployed source, read-only, outside /tmp; yields the folder holding it."""
    require_tools("skopeo", "umoci", "chroot")
    root = function_root()
    try:
        make_function_source(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def function_env(function_source, tmp_path, binary_cache, gcs_emulator, gcs_bucket,
                 gcs_service_account_key, firestore_emulator) -> dict[str, str]:
    """Terraform's environment, each cloud service swapped for its local stand-in."""
    key = function_source / "secrets" / f"key-{gcs_bucket.name}.json"
    shutil.copyfile(gcs_service_account_key.path, key)
    key.chmod(0o444)  # nobody reads it: the runtime's credentials
    env = terraform_environment()
    env.update({
        "GCS_BUCKET": gcs_bucket.name,
        "GCS_SIGNING_ACCOUNT": gcs_service_account_key.email,
        "GOOGLE_APPLICATION_CREDENTIALS": str(key),
        **gcs_emulator.env(),
        **firestore_emulator.env(),
        "FIRESTORE_DATABASE": "(default)",
        # A Nix from the signed binary cache by store path, as terraform pins one from cache.nixos.org.
        "NIX_BOOTSTRAP_STORE_PATH": binary_cache.nix_store_path,
        "NIX_SUBSTITUTERS": binary_cache.url,
        "NIX_TRUSTED_PUBLIC_KEYS": binary_cache.public_key,
        # nixpkgs in production; the demo set here (read-only, in the deployed source).
        "NIXERY_PKGS_PATH": str(function_source / "source" / "nix" / "demo"),
    })
    assert env["NIX_STORE_ROOT"].startswith("/tmp/") and env["WORK_DIR"].startswith("/tmp/")
    assert env["NIX_MAX_JOBS"] == "0"
    assert not env.get("NIX_BOOTSTRAP_URL"), "terraform's default is the store path, not a URL"
    return env


@pytest.fixture
def start_function(function_source, tmp_path):
    started: list[CloudFunction] = []

    def start(env: dict[str, str]) -> CloudFunction:
        process = CloudFunction(tmp_path / f"instance{len(started)}", function_source, env)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


def skopeo_copy(function: CloudFunction, image: str, layout: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{function.host}/{image}", f"oci:{layout}:latest"],
        capture_output=True, text=True, timeout=600,
    )


def error_of(response) -> dict:
    return response.json()["errors"][0]


def test_cold_instance_bootstraps_nix_builds_and_a_fresh_instance_serves_without_nix(
    start_function, function_env, tmp_path, binary_cache
):
    first = start_function(function_env)
    assert first.events("nix-bootstrap") == []  # nothing at start-up: Nix comes with the first build

    layout = tmp_path / "oci"
    pulled = skopeo_copy(first, "hello", layout)
    assert pulled.returncode == 0, pulled.stderr + first.log_path.read_text()[-3000:]

    bundle = tmp_path / "bundle"
    unpacked = subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)],
                              capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    ran = subprocess.run(["chroot", str(bundle / "rootfs"), "/bin/hello"], capture_output=True, text=True)
    assert (ran.returncode, ran.stdout) == (0, "Hello, world!\n"), ran.stderr

    [booted] = first.events("nix-bootstrap")
    assert booted["result"] == "ready" and booted["store_path"] == binary_cache.nix_store_path
    assert booted["cache"] == binary_cache.url
    # skopeo takes the amd64 image from the index; arm64 is not in this binary cache.
    [built] = [e for e in first.events("nix-build") if e["result"] == "built"]
    assert built["image"] == "hello"
    # The store and the work files live in the instance's /tmp, owned by nobody.
    tmp = first.tmp()
    hello_on_disk = tmp / "nix" / binary_cache.store_paths["hello"].lstrip("/") / "bin" / "hello"
    assert hello_on_disk.is_file()
    assert (tmp / "nixery" / "nix-bootstrap").stat().st_uid == NOBODY
    assert binary_cache.server.count(".nar.xz") + binary_cache.server.count(".nar") > 0
    print("cold instance:", json.dumps({
        "bootstrap": booted["duration"], "build": built["duration"], "nix": built.get("nix_seconds"),
        "tmp_used_bytes": first.tmp_used_bytes(),
    }))

    # A fresh instance (its own empty /tmp) serves the cached image from Firestore and GCS alone.
    second = start_function(function_env)
    again = skopeo_copy(second, "hello", tmp_path / "oci2")
    assert again.returncode == 0, again.stderr
    assert second.events("nix-bootstrap") == [] and second.events("nix-build") == []
    assert not (second.tmp() / "nixery" / "nix-bootstrap").exists()
    assert not (second.tmp() / "nix").exists()
    first_index = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    second_index = json.loads((tmp_path / "oci2" / "index.json").read_text())["manifests"][0]["digest"]
    assert first_index == second_index


def test_a_package_missing_from_the_binary_cache_is_a_clear_4xx(start_function, function_env):
    function = start_function(function_env)
    response = function.get(f"/v2/{UNCACHED_PACKAGE}/manifests/latest")
    assert 400 <= response.status_code < 500, response.text
    error = error_of(response)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert UNCACHED_PACKAGE in error["message"] and "binary cache" in error["message"]


def test_a_nix_signed_by_an_untrusted_key_is_refused_and_the_client_is_told(start_function, function_env):
    other = base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    function = start_function({**function_env, "NIX_TRUSTED_PUBLIC_KEYS": f"other-1:{other}"})
    for attempt in range(2):  # each request tries again; nothing half-made is reused
        response = function.get("/v2/hello/manifests/latest")
        assert response.status_code == 500, response.text
        assert "no valid signature by a trusted key" in error_of(response)["message"]
        assert function_env["NIX_BOOTSTRAP_STORE_PATH"] in error_of(response)["message"]
    refused = function.events("nix-bootstrap")
    assert [e["result"] for e in refused] == ["failed", "failed"] and refused[0]["severity"] == "ERROR"
    assert not list((function.tmp() / "nixery" / "nix-bootstrap").rglob("bin"))
    assert not (function.tmp() / "nix").exists()


def test_a_wrong_artefact_checksum_is_refused_before_anything_runs(start_function, function_env, nix_artefact):
    wrong = "0" * 64
    function = start_function({**function_env, "NIX_BOOTSTRAP_URL": nix_artefact.url, "NIX_BOOTSTRAP_SHA256": wrong})
    response = function.get("/v2/hello/manifests/latest")
    assert response.status_code == 500, response.text
    [refused] = function.events("nix-bootstrap")
    assert refused["severity"] == "ERROR" and refused["result"] == "failed"
    assert nix_artefact.sha256 in refused["message"] and wrong in refused["message"]
    # Nothing was unpacked and Nix never ran: no store, no build.
    bootstrap_dir = function.tmp() / "nixery" / "nix-bootstrap"
    assert not list(bootstrap_dir.rglob("bin")) and not list(bootstrap_dir.rglob("unpacked"))
    assert not (function.tmp() / "nix").exists()
    assert [e for e in function.events("nix-build") if e.get("result") == "built"] == []


def test_the_store_in_tmp_is_emptied_above_its_limit_and_builds_go_on(start_function, function_env, binary_cache):
    function = start_function({**function_env, "NIX_GC_ABOVE_BYTES": "1"})
    assert function.get("/v2/hello/manifests/latest").status_code == 200
    [collected] = function.events("nix-gc")
    assert collected["bytes_after"] < collected["bytes_before"]
    store = function.tmp() / "nix" / "nix" / "store"
    assert not (store / binary_cache.store_paths["hello"].split("/")[-1]).exists()

    # The built image lost nothing; a new image needing the collected paths gets them again.
    assert function.get("/v2/hello/manifests/latest").status_code == 200
    layout = function.state_dir / "oci"
    pulled = skopeo_copy(function, "coreutils/hello", layout)
    assert pulled.returncode == 0, pulled.stderr
    assert [b["image"] for b in function.events("nix-build") if b["result"] == "built"] == ["hello", "coreutils/hello"]
    assert len(function.events("nix-gc")) == 2


def test_a_fresh_instance_builds_a_new_combination_of_known_packages_without_nix(start_function, function_env,
                                                                                 tmp_path):
    oci = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    first = start_function(function_env)
    for image in ("hello", "coreutils"):
        assert first.get(f"/v2/{image}/manifests/latest", headers=oci).status_code == 200

    # Its own empty /tmp, no Nix: what earlier builds recorded in Firestore is enough.
    second = start_function(function_env)
    response = second.get("/v2/coreutils/hello/manifests/latest", headers=oci)
    assert response.status_code == 200, response.text
    [built] = [e for e in second.events("nix-build") if e["result"] == "built"]
    assert (built["image"], built["evaluated"], built["recorded"]) == ("coreutils/hello", 0, 4)
    assert second.events("nix-bootstrap") == []
    assert not (second.tmp() / "nix").exists()

    # The image is whole: it runs.
    digest = response.headers["Docker-Content-Digest"]
    layout = tmp_path / "oci"
    pulled = skopeo_copy(second, f"coreutils/hello@{digest}", layout)
    assert pulled.returncode == 0, pulled.stderr
    bundle = tmp_path / "bundle"
    unpacked = subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)],
                              capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    for program, expected in (("/bin/hello", "Hello, world!\n"), ("/bin/echo", "ok\n")):
        ran = subprocess.run(["chroot", str(bundle / "rootfs"), program, *(["ok"] if "echo" in program else [])],
                             capture_output=True, text=True)
        assert (ran.returncode, ran.stdout) == (0, expected), ran.stderr
