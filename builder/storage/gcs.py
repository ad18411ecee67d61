"""Blobs in a Google Cloud Storage bucket, served to clients through signed URLs.

Every blob is `blobs/sha256/<hex>`; the layer index is `layers/<hex>`. A blob of one chunk goes up
in one request; a bigger one streams to `uploads/<random>` and is copied to its final key once complete and checked (size,
MD5). Nothing incomplete is ever visible under a final key, and two instances racing on a blob
leave one object. Why it streams, and how URLs are signed: docs/design.md, "Google Cloud Storage".
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import threading
import time
import urllib.parse
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import google.auth
import google.auth.credentials
import google.auth.exceptions
import requests
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from ..errors import ServerError
from . import BlobStat, Redirect, check_digest_of, check_index_name, digest_hex

DEFAULT_ENDPOINT = "https://storage.googleapis.com"
IAM_CREDENTIALS_ENDPOINT = "https://iamcredentials.googleapis.com"
CHUNK_SIZE = 16 << 20  # a multiple of 256 KiB, as resumable uploads demand
BLOB_PREFIX = "blobs/sha256/"
UPLOAD_PREFIX = "uploads/"
INDEX_PREFIX = "layers/"
# What the registry does with the bucket; check() names the ones it lacks.
REQUIRED_PERMISSIONS = (
    "storage.objects.get",
    "storage.objects.list",
    "storage.objects.create",
    "storage.objects.delete",
)
_URL_CACHE_SIZE = 4096
_ALWAYS_FAILS = (
    gexc.GoogleAPIError, google.auth.exceptions.GoogleAuthError, requests.RequestException,
    InvalidResponse, DataCorruption,
)


def _b64_md5(md5_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(md5_hex)).decode()


def _hex_md5(b64: str | None) -> str | None:
    return base64.b64decode(b64).hex() if b64 else None


def blob_key(digest: str) -> str:
    return BLOB_PREFIX + digest_hex(digest)


class IamSigner(google.auth.credentials.Signing):
    """Signs as a service account through the IAM Credentials signBlob API: no key file.

    `session` is an authorized session (google.auth.transport.requests.AuthorizedSession)
    of the caller's own credentials, which need iam.serviceAccounts.signBlob on `email`
    (roles/iam.serviceAccountTokenCreator; a service account signing as itself needs it too).
    With `email` None the credentials' own account is used (resolved on first use).
    """

    def __init__(self, session: requests.Session, email: str | None = None,
                 endpoint: str = IAM_CREDENTIALS_ENDPOINT, timeout: float = 30.0, attempts: int = 3):
        self._session = session
        self._email = email
        self._endpoint = endpoint.rstrip("/")
        self._timeout = timeout
        self._attempts = attempts
        self._lock = threading.Lock()

    @property
    def signer_email(self) -> str:
        with self._lock:
            if self._email is None:
                credentials = getattr(self._session, "credentials", None)
                email = getattr(credentials, "service_account_email", None)
                if email in (None, "default") and credentials is not None:
                    # Metadata-server credentials learn their account's address on refresh.
                    from google.auth.transport.requests import Request

                    credentials.refresh(Request())
                    email = getattr(credentials, "service_account_email", None)
                if not email or email == "default":
                    raise ServerError("cannot sign URLs: set GCS_SIGNING_ACCOUNT to the service account to sign as")
                self._email = email
            return self._email

    @property
    def signer(self) -> "IamSigner":
        return self

    key_id = None

    def sign(self, message: bytes | str) -> bytes:
        return self.sign_bytes(message)

    def sign_bytes(self, message: bytes | str) -> bytes:
        if isinstance(message, str):
            message = message.encode()
        email = self.signer_email
        url = f"{self._endpoint}/v1/projects/-/serviceAccounts/{urllib.parse.quote(email, safe='@')}:signBlob"
        body = {"payload": base64.b64encode(message).decode()}
        for attempt in range(self._attempts):
            try:
                response = self._session.post(url, json=body, timeout=self._timeout)
            except requests.RequestException as e:
                if attempt + 1 < self._attempts:
                    time.sleep(0.2 * 2**attempt)
                    continue
                raise ServerError(f"signing a URL as {email}: IAM signBlob unreachable: {e}") from None
            if response.status_code == 200:
                return base64.b64decode(response.json()["signedBlob"])
            if response.status_code in (429, 500, 502, 503, 504) and attempt + 1 < self._attempts:
                time.sleep(0.2 * 2**attempt)
                continue
            hint = ""
            if response.status_code == 403:
                hint = (f"; the function's service account needs iam.serviceAccounts.signBlob on {email}"
                        " (roles/iam.serviceAccountTokenCreator)")
            raise ServerError(
                f"signing a URL as {email}: IAM signBlob answered {response.status_code}{hint}: "
                f"{response.text[:300]}"
            )
        raise AssertionError("unreachable")


class GcsUpload:
    """A blob being written: buffered up to one chunk, then streamed as a resumable upload."""

    def __init__(self, storage_: "GcsStorage"):
        self._storage = storage_
        self._head = bytearray()  # bytes not yet handed to a session (all of a small blob)
        self._writer: Any = None  # google.cloud.storage.fileio.BlobWriter, once a chunk is full
        self._temp = storage_.bucket.blob(UPLOAD_PREFIX + uuid.uuid4().hex)
        self._written = 0
        self._finalized = False  # the temporary object exists and must be deleted
        self._done = False

    def write(self, data: bytes) -> int:
        if self._done:
            raise ServerError("write to a finished upload")
        self._written += len(data)
        if self._writer is None:
            self._head += data
            if len(self._head) < self._storage.chunk_size:
                return len(data)
            self._writer = self._temp.open(
                "wb", chunk_size=self._storage.chunk_size, checksum="md5",
                content_type="application/octet-stream", retry=self._storage.retry,
                timeout=self._storage.timeout,
            )
            data, self._head = bytes(self._head), bytearray()
        try:
            with self._storage.errors("uploading a blob"):
                self._writer.write(data)
        except ServerError:
            self.abort()
            raise
        return len(data)

    def commit(self, digest: str, md5_hex: str, size: int, media_type: str) -> bool:
        if self._done:
            raise ServerError("commit of a finished upload")
        try:
            if self._written != size:
                raise ServerError(f"upload of {digest} wrote {self._written} bytes, expected {size}")
            if self._writer is None:
                return self._storage._put_small(digest, bytes(self._head), md5_hex, media_type)
            return self._commit_streamed(digest, md5_hex, size, media_type)
        finally:
            self.abort()

    def _commit_streamed(self, digest: str, md5_hex: str, size: int, media_type: str) -> bool:
        storage_ = self._storage
        current = storage_._probe(digest)
        if current is not None and current.md5_hash == _b64_md5(md5_hex):
            storage_._keep(current)
            return False  # abort() cancels the session: nothing was finalized
        # From here on a temporary object may exist (even if the answer to the last chunk is lost).
        self._finalized = True
        with storage_.errors(f"uploading {digest}"):
            self._writer.close()
        self._writer = None
        with storage_.errors(f"uploading {digest}"):
            self._temp.reload(retry=storage_.retry, timeout=storage_.timeout)
        if self._temp.size != size or self._temp.md5_hash != _b64_md5(md5_hex):
            raise ServerError(
                f"upload of {digest} stored {self._temp.size} bytes with MD5 {_hex_md5(self._temp.md5_hash)}, "
                f"expected {size} bytes with MD5 {md5_hex}"
            )
        return storage_._publish(digest, md5_hex, media_type, source=self._temp, current=current)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._head = bytearray()
        storage_ = self._storage
        if self._writer is not None:
            # Cancel the session; a failure here only leaves a session GCS drops itself.
            try:
                self._writer.terminate()
            except Exception:
                pass
            self._writer = None
        if self._finalized:
            try:
                self._temp.delete(retry=storage_.retry, timeout=storage_.timeout)
            except Exception:
                pass

    def __enter__(self) -> "GcsUpload":
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class GcsStorage:
    def __init__(
        self,
        bucket: storage.Bucket,
        *,
        signer: google.auth.credentials.Signing | None = None,
        public: bool = False,
        url_ttl: int = 600,
        endpoint: str = DEFAULT_ENDPOINT,
        chunk_size: int = CHUNK_SIZE,
        retry: Retry = DEFAULT_RETRY.with_timeout(60.0),
        timeout: float | tuple[float, float] = (10.0, 60.0),
        refresh_after: float | None = None,
    ):
        if chunk_size <= 0 or chunk_size % (256 << 10):
            raise ValueError("chunk_size must be a positive multiple of 256 KiB")
        self.bucket = bucket
        self.signer = signer
        self.public = public
        self.url_ttl = url_ttl
        self.endpoint = endpoint.rstrip("/")
        self.chunk_size = chunk_size
        self.retry = retry
        self.timeout = timeout
        # An object older than this is rewritten when it is reused, so the bucket's age rule
        # (LAYER_EXPIRY_DAYS) never deletes a blob that a newly recorded image names.
        self.refresh_after = refresh_after
        self._urls: dict[str, tuple[float, str]] = {}
        self._urls_lock = threading.Lock()

    @classmethod
    def from_config(cls, config) -> "GcsStorage":
        emulator = config.storage_emulator_host
        key_file = config.google_application_credentials
        signer: google.auth.credentials.Signing | None = None
        try:
            if emulator:
                # The emulator wants no token; a key file, when given, still signs URLs for real.
                project = config.google_cloud_project or "local"
                client = storage.Client(project=project, credentials=AnonymousCredentials(),
                                        client_options={"api_endpoint": emulator})
                if key_file:
                    signer = service_account.Credentials.from_service_account_file(key_file)
                endpoint = emulator
            else:
                credentials, project = google.auth.default(
                    scopes=["https://www.googleapis.com/auth/cloud-platform"]
                )
                client = storage.Client(project=project, credentials=credentials)
                endpoint = DEFAULT_ENDPOINT
                if isinstance(credentials, service_account.Credentials) \
                        and config.gcs_signing_account in (None, credentials.signer_email):
                    signer = credentials  # a key file: sign locally
                elif not config.gcs_public:
                    from google.auth.transport.requests import AuthorizedSession

                    signer = IamSigner(AuthorizedSession(credentials), config.gcs_signing_account)
        except (google.auth.exceptions.GoogleAuthError, ValueError, OSError) as e:
            raise ServerError(f"GCS bucket {config.gcs_bucket}: no usable credentials: {e}") from None
        return cls(
            client.bucket(config.gcs_bucket),
            signer=signer,
            public=config.gcs_public,
            url_ttl=config.gcs_signed_url_ttl,
            endpoint=endpoint,
            refresh_after=config.blob_refresh_seconds,
        )

    # -- errors -----------------------------------------------------------------

    @contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Turn client failures into one ServerError naming the bucket.

        NotFound and PreconditionFailed pass through: callers act on them.
        """
        try:
            yield
        except (gexc.NotFound, gexc.PreconditionFailed):
            raise
        except gexc.Forbidden as e:
            raise ServerError(f"GCS bucket {self.bucket.name}: permission denied {action}: {e.message}") from None
        except _ALWAYS_FAILS as e:
            raise ServerError(f"GCS bucket {self.bucket.name}: failed {action}: {e}") from None

    # -- startup --------------------------------------------------------------------

    def check(self) -> None:
        name = self.bucket.name
        if not self.public and self.signer is None:
            raise ServerError(f"GCS bucket {name}: no way to sign URLs (no key file, no signing account)")
        try:
            list(self.bucket.client.list_blobs(name, prefix=BLOB_PREFIX, max_results=1,
                                               retry=self.retry, timeout=self.timeout))
        except gexc.NotFound:
            raise ServerError(f"GCS bucket {name} does not exist (GCS_BUCKET)") from None
        except gexc.Forbidden as e:
            raise ServerError(
                f"GCS bucket {name}: the service account lacks storage.objects.list ({e.message})"
            ) from None
        except _ALWAYS_FAILS as e:
            raise ServerError(f"GCS bucket {name} is unreachable: {e}") from None
        try:
            granted = set(self.bucket.test_iam_permissions(list(REQUIRED_PERMISSIONS), retry=self.retry,
                                                          timeout=self.timeout))
        except (gexc.NotFound, gexc.MethodNotImplemented, gexc.BadRequest):
            return  # an endpoint without IAM (an emulator): listing worked, that is all it can tell
        except _ALWAYS_FAILS as e:
            raise ServerError(f"GCS bucket {name}: cannot check permissions: {e}") from None
        missing = [p for p in REQUIRED_PERMISSIONS if p not in granted]
        if missing:
            raise ServerError(f"GCS bucket {name}: the service account lacks {', '.join(missing)}")

    # -- writing --------------------------------------------------------------------

    def upload(self) -> GcsUpload:
        return GcsUpload(self)

    def put_bytes(self, digest: str, data: bytes, media_type: str) -> None:
        check_digest_of(data, digest)
        self._put_small(digest, data, hashlib.md5(data).hexdigest(), media_type)

    def _probe(self, digest: str) -> storage.Blob | None:
        with self.errors(f"reading {digest}"):
            return self.bucket.get_blob(blob_key(digest), retry=self.retry, timeout=self.timeout)

    def _put_small(self, digest: str, data: bytes, md5_hex: str, media_type: str) -> bool:
        if hashlib.md5(data).hexdigest() != md5_hex:
            raise ServerError(f"upload of {digest}: MD5 {md5_hex} does not match the bytes")
        current = self._probe(digest)
        for _ in range(3):
            if current is not None and current.md5_hash == _b64_md5(md5_hex):
                self._keep(current)
                return False
            blob = self.bucket.blob(blob_key(digest))
            blob.md5_hash = _b64_md5(md5_hex)  # GCS refuses the object if the bytes differ
            try:
                with self.errors(f"uploading {digest}"):
                    blob.upload_from_string(
                        data, content_type=media_type, checksum="md5",
                        if_generation_match=current.generation if current is not None else 0,
                        retry=self.retry, timeout=self.timeout,
                    )
                return True
            except gexc.PreconditionFailed:
                current = self._probe(digest)  # another instance wrote it meanwhile
        raise ServerError(f"GCS bucket {self.bucket.name}: {digest} keeps changing under concurrent writers")

    def _publish(self, digest: str, md5_hex: str, media_type: str, source: storage.Blob,
                 current: storage.Blob | None) -> bool:
        """Copy a finalized temporary object to the blob's key, unless an equal one got there first."""
        for _ in range(3):
            if current is not None and current.md5_hash == _b64_md5(md5_hex):
                self._keep(current)
                return False
            destination = self.bucket.blob(blob_key(digest))
            destination.content_type = media_type
            try:
                with self.errors(f"publishing {digest}"):
                    token = None
                    while True:
                        token, _, _ = destination.rewrite(
                            source, token=token, retry=self.retry, timeout=self.timeout,
                            if_generation_match=current.generation if current is not None else 0,
                        )
                        if token is None:
                            break
                return True
            except gexc.PreconditionFailed:
                current = self._probe(digest)
        raise ServerError(f"GCS bucket {self.bucket.name}: {digest} keeps changing under concurrent writers")

    def put_layer_index(self, name: str, data: bytes) -> None:
        blob = self.bucket.blob(INDEX_PREFIX + check_index_name(name))
        with self.errors(f"writing layer index {name}"):
            # One small request; two instances writing one name write the same record.
            blob.upload_from_string(data, content_type="application/json", checksum="md5",
                                    retry=self.retry, timeout=self.timeout)

    # -- reading --------------------------------------------------------------------

    def read_layer_index(self, name: str) -> bytes | None:
        try:
            with self.errors(f"reading layer index {name}"):
                return self.bucket.blob(INDEX_PREFIX + check_index_name(name)).download_as_bytes(
                    retry=self.retry, timeout=self.timeout
                )
        except gexc.NotFound:
            return None

    def read_bytes(self, digest: str) -> bytes | None:
        try:
            with self.errors(f"reading {digest}"):
                return self.bucket.blob(blob_key(digest)).download_as_bytes(
                    retry=self.retry, timeout=self.timeout
                )
        except gexc.NotFound:
            return None

    def stat(self, digest: str) -> BlobStat | None:
        blob = self._probe(digest)
        if blob is None:
            return None
        return BlobStat(size=blob.size, md5=_hex_md5(blob.md5_hash))

    def verify(self, digest: str, size: int, md5_hex: str) -> bool:
        # One metadata read: GCS computed md5Hash from the bytes it received (and checked it then).
        blob = self._probe(digest)
        if blob is None or blob.size != size or blob.md5_hash != _b64_md5(md5_hex):
            return False
        self._keep(blob)
        return True

    def _keep(self, blob: storage.Blob) -> None:
        """Reset the age of an object reused now: a rewrite onto itself is a new generation.

        GCS copies an object onto itself only with a change, so the rewrite stamps a metadata
        field. Losing a race to another writer is fine: that writer made it new too.
        """
        if self.refresh_after is None or blob.time_created is None:
            return
        if time.time() - blob.time_created.timestamp() < self.refresh_after:
            return
        destination = self.bucket.blob(blob.name)
        destination.content_type = blob.content_type
        destination.metadata = {**(blob.metadata or {}), "kept": str(int(time.time()))}
        try:
            with self.errors(f"refreshing {blob.name}"):
                token = None
                while True:
                    token, _, _ = destination.rewrite(blob, token=token, if_generation_match=blob.generation,
                                                      retry=self.retry, timeout=self.timeout)
                    if token is None:
                        break
        except gexc.PreconditionFailed:
            pass

    def locate(self, digest: str) -> Redirect | None:
        blob = self._probe(digest)
        if blob is None:
            return None
        return Redirect(url=self.url_for(digest), size=blob.size)

    def url_for(self, digest: str) -> str:
        """Where a client fetches the blob: a signed URL, or a plain one for a public bucket."""
        key = blob_key(digest)
        if self.public:
            return f"{self.endpoint}/{self.bucket.name}/{urllib.parse.quote(key)}"
        if self.signer is None:
            raise ServerError(f"GCS bucket {self.bucket.name}: no way to sign URLs (no key file, no signing account)")
        now = time.monotonic()
        with self._urls_lock:
            cached = self._urls.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self.errors(f"signing a URL for {digest}"):
            url = self.bucket.blob(key).generate_signed_url(
                version="v4",
                expiration=datetime.timedelta(seconds=self.url_ttl),
                method="GET",
                credentials=self.signer,
                api_access_endpoint=self.endpoint,
            )
        with self._urls_lock:
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls = {k: v for k, v in self._urls.items() if v[0] > now}
                if len(self._urls) >= _URL_CACHE_SIZE:
                    self._urls.clear()
            # Reused for half its lifetime: a client always gets at least ttl/2 to start fetching.
            self._urls[key] = (now + self.url_ttl / 2, url)
        return url
