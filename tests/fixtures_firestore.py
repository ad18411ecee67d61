"""Pytest fixtures: Google's Firestore emulator, run from the machine's google-cloud-cli.

Load with `pytest_plugins = ["tests.fixtures_firestore"]`. One emulator serves the
whole session; every test using `firestore_emulator` starts from empty data, and a
test may stop and restart the emulator to prove how the registry copes without it.
The emulator is required: a missing jar or java fails the tests instead of skipping
them, so a machine without it cannot report a green run it never did.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.emulators import EmulatorProcess, free_port

EMULATOR_CLASS = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
DEFAULT_PROJECT = "nixery-test"
_JAR_GLOBS = (
    "/usr/lib/google-cloud-sdk/platform/cloud-firestore-emulator/*.jar",
    "/usr/share/google-cloud-sdk/platform/cloud-firestore-emulator/*.jar",
)


def find_emulator_jar() -> str:
    """The emulator jar: FIRESTORE_EMULATOR_JAR, else the one google-cloud-cli installed."""
    explicit = os.environ.get("FIRESTORE_EMULATOR_JAR")
    if explicit:
        if not Path(explicit).is_file():
            raise RuntimeError(f"FIRESTORE_EMULATOR_JAR={explicit} does not exist")
        return explicit
    try:
        listed = subprocess.run(
            ["dpkg", "-L", "google-cloud-cli-firestore-emulator"], capture_output=True, text=True, check=False
        ).stdout.split()
    except FileNotFoundError:
        listed = []
    candidates = [p for p in listed if p.endswith(".jar")]
    for pattern in _JAR_GLOBS:
        candidates += sorted(glob.glob(pattern))
    for jar in candidates:
        if Path(jar).is_file():
            return jar
    raise RuntimeError(
        "Firestore emulator jar not found: install google-cloud-cli-firestore-emulator "
        "or set FIRESTORE_EMULATOR_JAR"
    )



@dataclass
class FirestoreEmulator(EmulatorProcess):
    """One emulator process on a fixed port, which survives stop/start (clients reconnect)."""

    jar: str
    port: int
    project: str = DEFAULT_PROJECT
    log_path: Path | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    name = "Firestore emulator"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this emulator."""
        return {"FIRESTORE_EMULATOR_HOST": self.host, "FIRESTORE_PROJECT": self.project}

    def registry_env(self) -> dict[str, str]:
        """What a registry process needs to use this emulator as its cache."""
        return {"NIXERY_CACHE_BACKEND": "firestore", **self.env()}

    def command(self) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("java not found: the Firestore emulator needs a JRE")
        return [java, "-cp", self.jar, EMULATOR_CLASS, "start", "--host=127.0.0.1", f"--port={self.port}"]

    def reset(self) -> None:
        """Delete every document of the project's default database."""
        request = urllib.request.Request(
            f"{self.url}/emulator/v1/projects/{self.project}/databases/(default)/documents", method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"Firestore emulator reset answered {response.status}")


@pytest.fixture(scope="session")
def firestore_emulator_session():
    """The session's emulator process (started once; prefer `firestore_emulator`)."""
    emulator = FirestoreEmulator(jar=find_emulator_jar(), port=free_port())
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def firestore_emulator(firestore_emulator_session: FirestoreEmulator):
    """The running emulator with no documents; restarted if an earlier test stopped it."""
    firestore_emulator_session.start()
    firestore_emulator_session.reset()
    yield firestore_emulator_session
    # A fault test may leave it stopped: bring it back for whoever comes next.
    firestore_emulator_session.start()


@pytest.fixture
def firestore_env(firestore_emulator: FirestoreEmulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The emulator's variables, set in this process too (clients read FIRESTORE_EMULATOR_HOST)."""
    env = firestore_emulator.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def firestore_registry_env(firestore_emulator: FirestoreEmulator) -> dict[str, str]:
    """Variables to add to a registry process's environment so it caches in the emulator."""
    return firestore_emulator.registry_env()
