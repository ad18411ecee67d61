from __future__ import annotations

import pytest

from tests.registry_process import RegistryProcess

pytest_plugins = ["tests.fixtures_gcs", "tests.fixtures_firestore", "tests.fixtures_nixcache"]


@pytest.fixture
def start_registry(tmp_path):
    """Start registries on demand; all are stopped at the end of the test."""
    started: list[RegistryProcess] = []

    def start(env: dict[str, str] | None = None, state_dir=None) -> RegistryProcess:
        process = RegistryProcess(state_dir or tmp_path / f"registry{len(started)}", env)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def registry(start_registry) -> RegistryProcess:
    """A registry of its own (empty storage and cache) on the demo package set."""
    return start_registry()


@pytest.fixture(scope="session")
def shared_registry(tmp_path_factory) -> RegistryProcess:
    """One registry for tests that only read: images it builds are reused across tests."""
    process = RegistryProcess(tmp_path_factory.mktemp("shared-registry")).start()
    yield process
    process.stop()
