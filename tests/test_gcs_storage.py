"""The GCS storage backend against fake-gcs-server, through the official client.

Signed URLs are checked twice: the emulator serves the bytes at the URL (it does
not check signatures), and the signature itself is verified here with the
public half of the key, from a canonical request built from the V4 spec.
"""
from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import re
import threading
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from google.auth.transport.requests import AuthorizedSession
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2.credentials import Credentials as TokenCredentials

from builder.config import Config, open_storage
from builder.errors import ServerError
from builder.storage import BlobStat, Redirect
from builder.storage.gcs import GcsStorage, IamSigner, blob_key
from tests.fixtures_gcs import GcsEmulator, free_port, write_service_account_key

CHUNK = 256 << 10
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def blob_of(data: bytes) -> tuple[str, str]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()


def storage_for(emulator: GcsEmulator, bucket_name: str, **kwargs) -> GcsStorage:
    kwargs.setdefault("chunk_size", CHUNK)
    kwargs.setdefault("endpoint", emulator.url)
    return GcsStorage(emulator.client().bucket(bucket_name), **kwargs)


def upload(storage: GcsStorage, data: bytes, piece: int = 100_000) -> bool:
    digest, md5 = blob_of(data)
    with storage.upload() as up:
        for i in range(0, len(data), piece):
            up.write(data[i:i + piece])
        return up.commit(digest, md5, len(data), LAYER)


def object_names(bucket) -> list[str]:
    return sorted(b.name for b in bucket.client.list_blobs(bucket.name))


def verify_signed_url(url: str, public_key, email: str, ttl: int) -> dict[str, str]:
    """Check a V4 signed URL's parameters and signature; return its query parameters."""
    parts = urllib.parse.urlsplit(url)
    params = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    assert params["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert params["X-Goog-Expires"] == str(ttl)
    assert params["X-Goog-SignedHeaders"] == "host"
    credential_email, _, scope = params["X-Goog-Credential"].partition("/")
    assert credential_email == email
    date = params["X-Goog-Date"]
    assert re.fullmatch(r"\d{8}T\d{6}Z", date)
    assert scope == f"{date[:8]}/auto/storage/goog4_request"
    issued = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - issued) < timedelta(minutes=10)

    def enc(s: str) -> str:
        return urllib.parse.quote(s, safe="-_.~")

    canonical_query = "&".join(
        sorted(f"{enc(k)}={enc(v)}" for k, v in params.items() if k != "X-Goog-Signature")
    )
    canonical_request = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"]
    )
    string_to_sign = "\n".join(
        ["GOOG4-RSA-SHA256", date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    # Raises InvalidSignature when the URL was not signed by this key over this request.
    public_key.verify(
        bytes.fromhex(params["X-Goog-Signature"]), string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    return params


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


# -- round trips ------------------------------------------------------------------


def test_round_trip_streamed_and_small(gcs_emulator, gcs_bucket, gcs_service_account_key):
    storage = storage_for(gcs_emulator, gcs_bucket.name, signer=gcs_service_account_key.credentials())
    storage.check()
    layer = os.urandom(3 * CHUNK + 12345)  # several chunks: a resumable session
    digest, md5 = blob_of(layer)
    assert upload(storage, layer) is True
    assert storage.read_bytes(digest) == layer
    assert storage.stat(digest) == BlobStat(size=len(layer), md5=md5)
    stored = gcs_bucket.get_blob(blob_key(digest))
    assert stored.content_type == LAYER
    assert base64.b64decode(stored.md5_hash).hex() == md5

    config = b'{"architecture":"amd64"}'
    config_digest, config_md5 = blob_of(config)
    storage.put_bytes(config_digest, config, "application/vnd.oci.image.config.v1+json")
    assert storage.read_bytes(config_digest) == config
    assert storage.stat(config_digest) == BlobStat(size=len(config), md5=config_md5)
    assert gcs_bucket.get_blob(blob_key(config_digest)).content_type == "application/vnd.oci.image.config.v1+json"

    location = storage.locate(digest)
    assert isinstance(location, Redirect) and location.size == len(layer)
    verify_signed_url(location.url, gcs_service_account_key.public_key, gcs_service_account_key.email, 600)
    assert fetch(location.url) == layer
    assert storage.locate(digest).url == location.url  # reused, not re-signed

    # Only final keys remain: every temporary object was removed.
    assert object_names(gcs_bucket) == sorted([blob_key(digest), blob_key(config_digest)])


def test_missing_blob(gcs_emulator, gcs_bucket):
    storage = storage_for(gcs_emulator, gcs_bucket.name, public=True)
    digest = "sha256:" + "0" * 64
    assert storage.read_bytes(digest) is None
    assert storage.stat(digest) is None
    assert storage.locate(digest) is None


def test_put_bytes_refuses_wrong_digest(gcs_emulator, gcs_bucket):
    storage = storage_for(gcs_emulator, gcs_bucket.name, public=True)
    with pytest.raises(ServerError):
        storage.put_bytes("sha256:" + "1" * 64, b"not that", "application/json")
    assert object_names(gcs_bucket) == []


def test_public_mode_gives_plain_urls(gcs_emulator, gcs_bucket):
    storage = storage_for(gcs_emulator, gcs_bucket.name, public=True)
    data = os.urandom(5000)
    digest, _ = blob_of(data)
    storage.put_bytes(digest, data, LAYER)
    url = storage.locate(digest).url
    assert url == f"{gcs_emulator.url}/{gcs_bucket.name}/{blob_key(digest)}"
    assert fetch(url) == data


# -- the MD5 check ----------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 2 * CHUNK + 7], ids=["one-request", "streamed"])
def test_second_upload_of_same_blob_writes_nothing(gcs_emulator, gcs_bucket, size):
    storage = storage_for(gcs_emulator, gcs_bucket.name, public=True)
    data = os.urandom(size)
    digest, _ = blob_of(data)
    assert upload(storage, data) is True
    first = gcs_bucket.get_blob(blob_key(digest))
    assert upload(storage, data) is False
    again = gcs_bucket.get_blob(blob_key(digest))
    assert (again.generation, again.metageneration) == (first.generation, first.metageneration)
    assert object_names(gcs_bucket) == [blob_key(digest)]


@pytest.mark.parametrize("size", [1000, 2 * CHUNK + 7], ids=["one-request", "streamed"])
def test_object_with_wrong_bytes_is_replaced(gcs_emulator, gcs_bucket, size):
    storage = storage_for(gcs_emulator, gcs_bucket.name, public=True)
    data = os.urandom(size)
    digest, md5 = blob_of(data)
    gcs_bucket.blob(blob_key(digest)).upload_from_string(b"corrupt" * 10)
    assert storage.stat(digest).md5 != md5
    assert upload(storage, data) is True
    assert storage.read_bytes(digest) == data
    assert storage.stat(digest).md5 == md5
    assert object_names(gcs_bucket) == [blob_key(digest)]


@pytest.mark.parametrize("size", [1000, 2 * CHUNK + 7], ids=["one-request", "streamed"])
def test_commit_with_wrong_md5_publishes_nothing(gcs_emulator, gcs_bucket, size):
    storage = storage_for(gcs_emulator, gcs_bucket.name, public=True)
    data = os.urandom(size)
    digest, _ = blob_of(data)
    with pytest.raises(ServerError, match="MD5"):
        with storage.upload() as up:
            up.write(data)
            up.commit(digest, hashlib.md5(b"other bytes").hexdigest(), len(data), LAYER)
    assert object_names(gcs_bucket) == []


def test_commit_with_wrong_size_publishes_nothing(gcs_emulator, gcs_bucket):
    storage = storage_for(gcs_emulator, gcs_bucket.name, public=True)
    data = os.urandom(2 * CHUNK)
    digest, md5 = blob_of(data)
    with pytest.raises(ServerError, match="bytes"):
        with storage.upload() as up:
            up.write(data)
            up.commit(digest, md5, len(data) + 1, LAYER)
    assert object_names(gcs_bucket) == []


def test_abort_leaves_nothing(gcs_emulator, gcs_bucket):
    storage = storage_for(gcs_emulator, gcs_bucket.name, public=True)
    with storage.upload() as up:
        up.write(os.urandom(3 * CHUNK))
    assert object_names(gcs_bucket) == []


# -- concurrent writers -----------------------------------------------------------


def _commit_in_process(url: str, bucket_name: str, data: bytes, barrier, results) -> None:
    emulator = GcsEmulator(binary="", port=int(url.rsplit(":", 1)[1]))
    storage = storage_for(emulator, bucket_name, public=True)
    digest, md5 = blob_of(data)
    try:
        with storage.upload() as up:
            up.write(data)
            barrier.wait(timeout=60)  # both commit at once
            results.put(("ok", up.commit(digest, md5, len(data), LAYER)))
    except BaseException as e:  # reported to the parent, which fails the test
        results.put(("error", repr(e)))


@pytest.mark.parametrize("size", [1000, 3 * CHUNK + 5], ids=["one-request", "streamed"])
def test_concurrent_commits_of_one_blob(gcs_emulator, gcs_bucket, size):
    data = os.urandom(size)
    digest, md5 = blob_of(data)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=_commit_in_process, args=(gcs_emulator.url, gcs_bucket.name, data, barrier, results))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=60)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    written = [value for _, value in outcomes]
    assert True in written
    if size < CHUNK:
        # One-request uploads carry ifGenerationMatch=0, which the emulator enforces: one winner.
        assert sorted(written) == [False, True]
    assert object_names(gcs_bucket) == [blob_key(digest)]
    stored = gcs_bucket.get_blob(blob_key(digest))
    assert base64.b64decode(stored.md5_hash).hex() == md5
    assert stored.download_as_bytes() == data


# -- faults -----------------------------------------------------------------------


def test_upload_failing_midway_leaves_nothing_and_retry_succeeds(gcs_restartable_emulator):
    emulator = gcs_restartable_emulator
    bucket = emulator.client().create_bucket("faults")
    storage = storage_for(emulator, "faults", public=True, retry=DEFAULT_RETRY.with_timeout(2.0),
                          timeout=(2.0, 5.0))
    data = os.urandom(6 * CHUNK + 99)
    digest, md5 = blob_of(data)
    with pytest.raises(ServerError, match="faults"):
        with storage.upload() as up:
            up.write(data[: 3 * CHUNK])  # two chunks are in the session
            emulator.stop()
            up.write(data[3 * CHUNK:])
            up.commit(digest, md5, len(data), LAYER)
    emulator.start()
    assert object_names(bucket) == []
    assert storage.stat(digest) is None
    assert upload(storage, data) is True
    assert storage.read_bytes(digest) == data
    assert object_names(bucket) == [blob_key(digest)]


def test_check_names_missing_bucket(gcs_emulator):
    storage = storage_for(gcs_emulator, "no-such-bucket-here", public=True)
    with pytest.raises(ServerError, match="no-such-bucket-here.*does not exist"):
        storage.check()


def test_check_names_unreachable_bucket(gcs_emulator):
    nowhere = GcsEmulator(binary="", port=free_port())
    storage = storage_for(nowhere, "far-away", public=True, retry=DEFAULT_RETRY.with_timeout(1.0),
                          timeout=(1.0, 1.0))
    with pytest.raises(ServerError, match="far-away is unreachable"):
        storage.check()
    with pytest.raises(ServerError, match="far-away"):
        storage.stat("sha256:" + "2" * 64)


def test_check_without_signing_means_fails(gcs_emulator, gcs_bucket):
    storage = storage_for(gcs_emulator, gcs_bucket.name)
    with pytest.raises(ServerError, match="sign"):
        storage.check()


# -- signing through IAM signBlob -------------------------------------------------


class _SignBlobStandIn(BaseHTTPRequestHandler):
    """POST /v1/projects/-/serviceAccounts/{email}:signBlob, signing with a real RSA key."""

    keys: dict = {}
    calls: list = []

    def do_POST(self):
        match = re.fullmatch(r"/v1/projects/-/serviceAccounts/([^/:]+):signBlob", self.path)
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        email = urllib.parse.unquote(match.group(1)) if match else None
        self.calls.append({"email": email, "authorization": self.headers.get("Authorization")})
        if email not in self.keys or self.headers.get("Authorization") != "Bearer test-token":
            self._answer(403, {"error": {"code": 403, "message": "Permission 'iam.serviceAccounts.signBlob' denied"}})
            return
        signature = self.keys[email].sign(base64.b64decode(body["payload"]), padding.PKCS1v15(), hashes.SHA256())
        self._answer(200, {"keyId": "stand-in-key", "signedBlob": base64.b64encode(signature).decode()})

    def _answer(self, status: int, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def sign_blob_endpoint(tmp_path):
    key = write_service_account_key(tmp_path / "iam-key.json", "function@nixery-test.iam.gserviceaccount.com")
    handler = type("Handler", (_SignBlobStandIn,), {"keys": {key.email: key.private_key}, "calls": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", key, handler.calls
    server.shutdown()
    server.server_close()


def test_signed_url_through_sign_blob(gcs_emulator, gcs_bucket, sign_blob_endpoint):
    endpoint, key, calls = sign_blob_endpoint
    session = AuthorizedSession(TokenCredentials(token="test-token"))
    signer = IamSigner(session, key.email, endpoint=endpoint)
    storage = storage_for(gcs_emulator, gcs_bucket.name, signer=signer, url_ttl=900)
    storage.check()
    data = os.urandom(CHUNK + 1)
    digest, _ = blob_of(data)
    assert upload(storage, data) is True
    url = storage.locate(digest).url
    verify_signed_url(url, key.public_key, key.email, 900)
    assert calls == [{"email": key.email, "authorization": "Bearer test-token"}]
    assert fetch(url) == data


def test_sign_blob_denied_is_one_clear_error(gcs_emulator, gcs_bucket, sign_blob_endpoint):
    endpoint, _, _ = sign_blob_endpoint
    session = AuthorizedSession(TokenCredentials(token="test-token"))
    signer = IamSigner(session, "stranger@nixery-test.iam.gserviceaccount.com", endpoint=endpoint)
    storage = storage_for(gcs_emulator, gcs_bucket.name, signer=signer)
    data = b"layer bytes"
    digest, _ = blob_of(data)
    storage.put_bytes(digest, data, LAYER)
    with pytest.raises(ServerError, match="stranger@.*403.*serviceAccountTokenCreator"):
        storage.locate(digest)


# -- configuration ----------------------------------------------------------------


def test_from_config_with_registry_env(gcs_registry_env, gcs_bucket, gcs_service_account_key):
    config = Config.from_env({**gcs_registry_env, "GCS_SIGNED_URL_TTL": "300"})
    storage = open_storage(config)
    assert isinstance(storage, GcsStorage)
    storage.check()
    data = os.urandom(2000)
    digest, _ = blob_of(data)
    storage.put_bytes(digest, data, LAYER)
    assert gcs_bucket.get_blob(blob_key(digest)) is not None
    url = storage.locate(digest).url
    assert url.startswith(gcs_registry_env["STORAGE_EMULATOR_HOST"] + "/" + gcs_bucket.name + "/")
    verify_signed_url(url, gcs_service_account_key.public_key, gcs_service_account_key.email, 300)
    assert fetch(url) == data


@pytest.mark.parametrize("size", [1000, 2 * CHUNK + 7], ids=["one-request", "streamed"])
def test_a_reused_object_past_half_its_life_is_made_new_for_the_age_rule(gcs_emulator, gcs_bucket, size):
    data = os.urandom(size)
    digest, md5 = blob_of(data)
    young = storage_for(gcs_emulator, gcs_bucket.name, public=True, refresh_after=3600)
    assert upload(young, data) is True
    first = gcs_bucket.get_blob(blob_key(digest))
    assert young.verify(digest, size, md5) and upload(young, data) is False
    assert gcs_bucket.get_blob(blob_key(digest)).generation == first.generation  # young: left alone
    # Past the refresh age, a reuse (the check before reuse, or an upload of the same bytes) makes
    # the object new, so the bucket's age rule counts from now.
    old = storage_for(gcs_emulator, gcs_bucket.name, public=True, refresh_after=0)
    assert old.verify(digest, size, md5)
    kept = gcs_bucket.get_blob(blob_key(digest))
    assert kept.generation > first.generation and kept.time_created >= first.time_created
    assert (kept.md5_hash, kept.size) == (first.md5_hash, first.size)
    assert upload(old, data) is False
    assert gcs_bucket.get_blob(blob_key(digest)).generation > kept.generation
    assert fetch(old.url_for(digest)) == data
