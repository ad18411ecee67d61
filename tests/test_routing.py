"""Routing, errors and healing in-process, in milliseconds: functions-framework's own app (so its
routing is the one under test) around a `Registry` with real filesystem storage in a temporary
folder and a stand-in builder that "builds" by storing a small image. One table of
method / URL / headers -> status / error code, then the rules no row can show.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import functions_framework
import pytest

from builder import errors, manifest
from builder.cache import ImageRecord, ManifestRef
from builder.cache.sqlite import SqliteCache
from builder.config import Config
from builder.http import Registry
from builder.storage.filesystem import FilesystemStorage

pytestmark = pytest.mark.fast  # in-process: part of scripts/test-fast

REPO = Path(__file__).resolve().parent.parent
OCI = {"Accept": manifest.OCI_MANIFEST}
LAYER = b"layer bytes " * 100
LAYER_DIGEST = manifest.digest_of(LAYER)
UNKNOWN = "sha256:" + "0" * 64


class StandInBuilder:
    """Builds an image by storing its config and manifests; counts builds; records what it forgets."""

    def __init__(self, storage: FilesystemStorage, cache: SqliteCache):
        self.storage = storage
        self.cache = cache  # what the front page reads
        self.records: dict[str, ImageRecord] = {}
        self.builds: list[str] = []
        self.forgotten_images: list[str] = []
        self.forgotten_blobs: list[str] = []
        self.fault: BaseException | None = None

    def image(self, request, tag: str) -> ImageRecord:
        if self.fault is not None:
            raise self.fault
        key = f"{request.name}:{tag}"
        if key not in self.records:
            self.builds.append(key)
            layers = [manifest.Layer(LAYER_DIGEST, len(LAYER), diff_id=LAYER_DIGEST, format="tar")]
            config = manifest.image_config(layers, "amd64", [f"IMAGE={request.name}"], None)
            config_blob = manifest.Blob(manifest.digest_of(config), len(config))
            self.storage.put_bytes(config_blob.digest, config, "application/json")
            refs = []
            for media_type in manifest.MANIFEST_TYPES:
                data = manifest.image_manifest(media_type, config_blob, layers)
                self.storage.put_bytes(manifest.digest_of(data), data, media_type)
                refs.append(ManifestRef(manifest.digest_of(data), len(data), media_type))
            self.records[key] = ImageRecord(key, tuple(refs), "test", 0, 2**40, (config_blob.digest, LAYER_DIGEST))
        return self.records[key]

    def forget_image(self, key: str, reason: str) -> None:
        self.forgotten_images.append(key)
        self.records.pop(key, None)

    def forget_blob(self, digest: str) -> list[str]:
        self.forgotten_blobs.append(digest)
        keys = [k for k, r in self.records.items() if digest in r.blobs]
        for k in keys:
            del self.records[k]
        return keys


class OneRegistry:
    def __init__(self, registry: Registry):
        self.registry = registry

    def get(self) -> Registry:
        return self.registry


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """functions-framework's app for main.py, made once (main.py reads its configuration at import)."""
    state = tmp_path_factory.mktemp("routing")
    env = {"STORAGE_PATH": str(state / "storage"), "CACHE_PATH": str(state / "cache.sqlite"),
           "WORK_DIR": str(state / "work"), "NIXERY_PKGS_PATH": str(REPO / "nix" / "demo")}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        yield functions_framework.create_app("registry", str(REPO / "main.py"))


@pytest.fixture
def stand_in(app, tmp_path):
    storage = FilesystemStorage(str(tmp_path / "storage"))
    storage.check()
    builder = StandInBuilder(storage, SqliteCache(str(tmp_path / "cache.sqlite")))
    config = Config.from_env({"STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_PKGS_PATH": str(REPO / "nix" / "demo")})
    sys.modules["main"]._registry = OneRegistry(Registry(config, storage, builder))
    with storage.upload() as upload:
        upload.write(LAYER)
        upload.commit(LAYER_DIGEST, hashlib.md5(LAYER).hexdigest(), len(LAYER), "application/octet-stream")
    return builder


@pytest.fixture
def client(app, stand_in):
    return app.test_client()


ROWS = [
    # method, url, headers, status, error code (None: a success)
    ("GET", "/v2/", {}, 200, None),
    ("GET", "/v2", {}, 200, None),
    ("GET", "/v2/hello/manifests/latest", OCI, 200, None),
    ("HEAD", "/v2/hello/manifests/latest", OCI, 200, None),
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {}, 200, None),
    ("HEAD", f"/v2/hello/blobs/{LAYER_DIGEST}", {}, 200, None),
    ("GET", "/v2/hello/tags/list", {}, 200, None),
    ("GET", "/v2/hello/tags/list?n=0", {}, 200, None),
    ("GET", "/v2/hello/tags/list?n=10000", {}, 200, None),
    ("GET", "/v2/Hello/manifests/latest", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/hello%0A/manifests/latest", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/hel%0Dlo/manifests/latest", {}, 400, "NAME_INVALID"),
    ("GET", f"/v2/hello%0A/blobs/{LAYER_DIGEST}", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/hello%0A/tags/list", {}, 400, "NAME_INVALID"),
    ("GET", "/v2/hello/manifests/lat%0Aest", {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/%0A", {}, 404, "NAME_UNKNOWN"),
    ("GET", "/v2/%0D%0A/x", {}, 404, "NAME_UNKNOWN"),
    ("GET", "/v2/hello/nonsense", {}, 404, "NAME_UNKNOWN"),
    ("GET", "/elsewhere", {}, 404, "NAME_UNKNOWN"),
    ("GET", "/robots.txt", {}, 404, "NAME_UNKNOWN"),
    ("GET", "/v2/hello/manifests/-bad", {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/hello/manifests/sha256:1234", {}, 400, "DIGEST_INVALID"),
    ("GET", f"/v2/hello/manifests/{UNKNOWN}", {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", f"/v2/hello/manifests/{LAYER_DIGEST}", {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/v2/hello/blobs/sha256:xyz", {}, 400, "DIGEST_INVALID"),
    ("GET", "/v2/hello/blobs/latest", {}, 400, "DIGEST_INVALID"),
    ("GET", f"/v2/hello/blobs/{UNKNOWN}", {}, 404, "BLOB_UNKNOWN"),
    ("HEAD", f"/v2/hello/blobs/{UNKNOWN}", {}, 404, None),
    ("GET", "/v2/hello/tags/list?n=%C2%B2", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/hello/tags/list?n=%D9%A3", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/hello/tags/list?n=-1", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/hello/tags/list?n=1e3", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/hello/tags/list?n=10001", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/hello/tags/list?n=" + "9" * 40, {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/v2/hello/tags/list?n=", {}, 400, "PAGINATION_NUMBER_INVALID"),
    ("GET", "/", {}, 200, None),
    ("HEAD", "/", {}, 200, None),
    ("GET", "/status.json", {}, 200, None),
    ("GET", f"/images/{UNKNOWN}", {}, 404, "MANIFEST_UNKNOWN"),
    ("GET", "/images/sha256:1234", {}, 400, "DIGEST_INVALID"),
    ("GET", "/images/%0A", {}, 400, "DIGEST_INVALID"),
    ("POST", "/", {}, 405, "UNSUPPORTED"),
    ("DELETE", "/status.json", {}, 405, "UNSUPPORTED"),
    ("POST", "/v2/", {}, 405, "UNSUPPORTED"),
    ("PUT", "/v2/hello/manifests/latest", {}, 405, "UNSUPPORTED"),
    ("DELETE", f"/v2/hello/blobs/{LAYER_DIGEST}", {}, 405, "UNSUPPORTED"),
    ("PATCH", "/v2/hello/blobs/uploads/x", {}, 405, "UNSUPPORTED"),
    # Range: one valid bytes= range is honoured; anything else is ignored (RFC 9110), not a 416.
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {"Range": "bytes=0-2"}, 206, None),
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {"Range": "bytes=-3"}, 206, None),
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {"Range": "bytes=0-1,4-5"}, 200, None),
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {"Range": "bytes=5-2"}, 200, None),
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {"Range": "items=0-3"}, 200, None),
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {"Range": "bytes=abc"}, 200, None),
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {"Range": "bytes=٣-"}, 200, None),
    ("GET", f"/v2/hello/blobs/{LAYER_DIGEST}", {"Range": "bytes=99999-"}, 416, "RANGE_INVALID"),
]


@pytest.mark.parametrize("method, url, headers, status, code", ROWS,
                         ids=[f"{m} {u[:60]} {h.get('Range', '')}" for m, u, h, _, _ in ROWS])
def test_route_table(client, method, url, headers, status, code):
    response = client.open(url, method=method, headers=headers)
    assert response.status_code == status, response.get_data(as_text=True)
    if code is not None:
        assert response.headers["Content-Type"] == "application/json"
        error = response.get_json()["errors"][0]
        assert error["code"] == code and error["message"]
    if status == 200 and "Range" in headers:
        assert response.get_data() == LAYER
    if status == 206:
        assert len(response.get_data()) == 3


def log_events(capsys, name: str) -> list[dict]:
    lines = capsys.readouterr().out.splitlines()
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e["event"] == name]


def test_a_fault_of_our_own_is_a_plain_500_and_logged_once_with_message_cause_and_traceback(client, stand_in, capsys):
    try:
        raise OSError("disk controller on fire at /var/secret/thing")
    except OSError as cause:
        try:
            raise RuntimeError("packing went wrong") from cause
        except RuntimeError as fault:
            stand_in.fault = fault
    capsys.readouterr()
    response = client.get("/v2/hello/manifests/latest")
    assert response.status_code == 500
    assert response.get_json()["errors"][0]["code"] == "UNKNOWN"
    assert "packing" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)
    [logged] = log_events(capsys, "request")
    assert logged["severity"] == "ERROR" and logged["status"] == 500
    assert logged["error"] == "RuntimeError: packing went wrong"
    assert "disk controller on fire" in logged["cause"]
    assert "Traceback" in logged["traceback"] and "packing went wrong" in logged["traceback"]


def test_a_registry_5xx_is_logged_with_its_message_and_cause(client, stand_in, capsys):
    try:
        raise ConnectionError("bucket unreachable")
    except ConnectionError as cause:
        try:
            raise errors.Unavailable("storage is not answering") from cause
        except errors.Unavailable as fault:
            stand_in.fault = fault
    capsys.readouterr()
    assert client.get("/v2/hello/manifests/latest").status_code == 503
    [logged] = log_events(capsys, "request")
    assert logged["error"] == "storage is not answering" and "bucket unreachable" in logged["cause"]


def test_clients_see_no_host_path_and_no_credential(client, stand_in):
    demo = str(REPO / "nix" / "demo")
    stand_in.fault = errors.ServerError(
        f"cannot run /usr/bin/nix-instantiate: error at {demo}/default.nix:12:3 while building"
        " /nix/store/abc-hello-1.0/bin/hello, fetching https://user:s3cret@example.com/repo.git"
        " and https://storage.example/b/o?X-Goog-Signature=abcdef&other=1 from file:///tmp/channel.tar.gz",
        {"nix": f"see {demo}/lib.nix and /root/.config/x"},
    )
    body = client.get("/v2/hello/manifests/latest").get_json()["errors"][0]
    message, detail = body["message"], body["detail"]["nix"]
    assert "cannot run <path>:" in message
    assert "at ./default.nix:12:3 while" in message, "package-set paths are shown relative to it"
    assert "/nix/store/abc-hello-1.0/bin/hello" in message, "store paths are public"
    assert "s3cret" not in message and "https://<redacted>@example.com/repo.git" in message
    assert "abcdef" not in message and "other=1" in message
    assert "/tmp/" not in message and "file://<path>" in message
    assert detail == "see ./lib.nix and <path>"
    for leaked in (demo, "/usr/bin", "/root"):
        assert leaked not in message + detail


def test_a_request_path_is_logged_once_and_truncated(client, capsys):
    capsys.readouterr()
    path = "/v2/the-marker/" + "a/" * 3000 + "manifests/latest"
    assert client.get(path).status_code == 400
    output = capsys.readouterr().out
    [logged] = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert logged["event"] == "request"
    assert len(logged["path"]) <= 260 and logged["path_length"] == len(path)
    assert output.count("the-marker") == 1, "the path appears once, in its field"


def forget_served_manifests() -> None:
    """As on a fresh instance: no manifest copies in memory."""
    sys.modules["main"]._registry.get().manifests.drop_where(lambda item: True)


def test_a_tagged_image_whose_manifest_is_gone_is_rebuilt_at_once(client, stand_in):
    first = client.get("/v2/goodbye/manifests/latest", headers=OCI)
    digest = first.headers["Docker-Content-Digest"]
    stand_in.storage.blob_path(digest).unlink()
    forget_served_manifests()
    again = client.get("/v2/goodbye/manifests/latest", headers=OCI)
    assert again.status_code == 200 and again.get_data() == first.get_data()
    assert stand_in.forgotten_images == ["goodbye:latest"]
    assert stand_in.builds == ["goodbye:latest", "goodbye:latest"]
    assert stand_in.storage.blob_path(digest).exists()


def test_a_tagged_image_whose_config_is_gone_is_rebuilt_at_once(client, stand_in):
    config = json.loads(client.get("/v2/goodbye/manifests/latest", headers=OCI).get_data())["config"]["digest"]
    stand_in.storage.blob_path(config).unlink()
    forget_served_manifests()
    assert client.get("/v2/goodbye/manifests/latest", headers=OCI).status_code == 200
    assert stand_in.forgotten_images == ["goodbye:latest"]
    assert client.get(f"/v2/goodbye/blobs/{config}").status_code == 200


def test_a_request_for_a_lost_blob_fails_once_and_makes_its_images_rebuild(client, stand_in):
    config = json.loads(client.get("/v2/goodbye/manifests/latest", headers=OCI).get_data())["config"]["digest"]
    stand_in.storage.blob_path(config).unlink()
    # This instance still holds the manifest in memory: the blob request is where the loss shows.
    assert client.get(f"/v2/goodbye/blobs/{config}").status_code == 404
    assert stand_in.forgotten_blobs == [config]
    assert client.get("/v2/goodbye/manifests/latest", headers=OCI).status_code == 200
    assert client.get(f"/v2/goodbye/blobs/{config}").status_code == 200
    assert stand_in.builds == ["goodbye:latest", "goodbye:latest"]


def test_a_damaged_blob_is_never_served(client, stand_in):
    path = stand_in.storage.blob_path(LAYER_DIGEST)
    assert client.get(f"/v2/hello/blobs/{LAYER_DIGEST}").get_data() == LAYER  # verified, remembered
    path.write_bytes(b"X" + LAYER[1:])
    response = client.get(f"/v2/hello/blobs/{LAYER_DIGEST}")
    assert response.status_code == 404 and response.get_json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert stand_in.forgotten_blobs == [LAYER_DIGEST]
    assert not path.exists(), "the damaged file is removed, so the next build packs it again"


def test_an_image_names_its_source_repository_without_its_credentials():
    from builder import contents, names
    from builder.sources import PackageSource

    source = PackageSource("git", "https://builder:glpat-s3cret@git.example.com/pkgs.git", "a" * 40,
                           "git:x", True, "main")
    request = names.parse_image_name("hello", always_include=(), max_packages=8, max_length=100)
    labels = contents.provenance(request, source, {}, None)
    assert labels["org.opencontainers.image.source"] == "https://<redacted>@git.example.com/pkgs.git"
