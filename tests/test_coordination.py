"""Build coordination in-process, in milliseconds: leases, heartbeats, takeover, remembered
failures, a degraded cache, build slots and stopping. The Nix build itself is replaced by a
function the test controls; the cache is the real SQLite backend, shared like a fleet shares one.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from builder import errors, names
from builder.build import ImageBuilder
from builder.cache import ImageRecord, ManifestRef
from builder.cache.sqlite import SqliteCache
from builder.config import Config
from builder.coordination import BuildSlots, LeaseKeeper, build_slots_for
from builder.storage.filesystem import FilesystemStorage

pytestmark = pytest.mark.fast  # in-process: part of scripts/test-fast

LEASE = 0.6  # seconds: short, so takeovers happen within a test


def request(name: str = "hello") -> names.ImageRequest:
    return names.parse_image_name(name, always_include=(), max_packages=10, max_length=100)


class FakeBuilds:
    """Stands in for `ImageBuilder._build`: counts calls, takes `seconds`, may fail."""

    def __init__(self, seconds: float = 0.0, fail_with: errors.RegistryError | None = None, phase: str = ""):
        self.seconds = seconds
        self.fail_with = fail_with
        self.phase = phase  # reported as the build starts
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, builder: ImageBuilder, request, tag, source, key, progress) -> ImageRecord:
        if self.phase:
            progress(self.phase)
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            deadline = time.monotonic() + self.seconds
            while time.monotonic() < deadline:
                if builder.stopping.wait(0.01):
                    raise errors.Unavailable("stopped")
            if self.fail_with is not None:
                raise self.fail_with
            now = time.time()
            record = ImageRecord(key, (ManifestRef("sha256:" + "a" * 64, 10, "x"),), source.identity, now, now + 60)
            builder._cache_call("image write", builder.cache.put_image, record)
            return record
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def make_builder(tmp_path, monkeypatch):
    made: list[ImageBuilder] = []

    def make(builds: FakeBuilds, cache=None, **settings) -> ImageBuilder:
        (tmp_path / "pkgs").mkdir(exist_ok=True)
        config = Config(pkgs_path=str(tmp_path / "pkgs"), work_dir=str(tmp_path / f"work{len(made)}"),
                        build_lease_seconds=LEASE, nix_timeout=5, build_concurrency=4, **settings)
        builder = ImageBuilder(config, FilesystemStorage(str(tmp_path / "storage")),
                               cache or SqliteCache(str(tmp_path / "cache.sqlite")), log=lambda *a, **k: None)
        monkeypatch.setattr(builder, "_build", lambda *args: builds(builder, *args))
        made.append(builder)
        return builder

    yield make
    for builder in made:
        builder.stopping.set()


def key_of(builder: ImageBuilder, name: str = "hello") -> str:
    return names.image_key(request(name), builder.resolve_source("latest").identity)


def test_a_build_longer_than_its_lease_keeps_it_by_heartbeat(make_builder):
    builds = FakeBuilds(seconds=LEASE * 4)
    first, second = make_builder(builds), make_builder(builds)
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(first.image, request(), "latest")
        time.sleep(LEASE / 2)
        two = pool.submit(second.image, request(), "latest")
        assert one.result(10) == two.result(10)
    assert builds.calls == 1


def test_a_builds_phase_is_in_its_lease_for_every_instance_until_it_ends(make_builder):
    builds = FakeBuilds(seconds=LEASE * 3, phase="realising")
    building, watching = make_builder(builds), make_builder(builds)
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(building.image, request("shell/hello"), "latest")
        deadline = time.monotonic() + 5
        while not (seen := watching.cache.builds_in_progress(time.time(), 10)) and time.monotonic() < deadline:
            time.sleep(0.02)
        [progress] = seen
        assert (progress.name, progress.tag, progress.architecture, progress.phase) == (
            "shell/hello", "latest", "amd64", "realising")
        time.sleep(LEASE * 1.5)  # renewed by the heartbeat meanwhile: still listed
        assert [p.phase for p in watching.cache.builds_in_progress(time.time(), 10)] == ["realising"]
        done.result(10)
    assert watching.cache.builds_in_progress(time.time(), 10) == []


def test_a_dead_holders_lease_is_taken_over_within_one_lease(make_builder, tmp_path):
    builds = FakeBuilds()
    builder = make_builder(builds)
    cache = builder.cache
    cache.claim_build(key_of(builder), "dead-instance", time.time() + LEASE, time.time())  # never renewed
    started = time.monotonic()
    builder.image(request(), "latest")
    assert builds.calls == 1
    assert time.monotonic() - started < LEASE + 1.0


def test_a_failure_is_remembered_by_its_code_and_not_rebuilt(make_builder):
    builds = FakeBuilds(fail_with=errors.ManifestUnknown("unknown packages: nope", {"unknown": ["nope"]}))
    first, second = make_builder(builds), make_builder(builds)
    with pytest.raises(errors.ManifestUnknown):
        first.image(request(), "latest")
    with pytest.raises(errors.ManifestUnknown) as remembered:
        second.image(request(), "latest")
    assert builds.calls == 1
    assert remembered.value.message == "unknown packages: nope"
    assert remembered.value.detail == {"unknown": ["nope"]}


def test_a_server_fault_is_not_remembered(make_builder):
    builds = FakeBuilds(fail_with=errors.ServerError("storage full"))
    builder = make_builder(builds)
    for _ in range(2):
        with pytest.raises(errors.ServerError):
            builder.image(request(), "latest")
    assert builds.calls == 2


class BrokenCache:
    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise ConnectionError("cache unreachable")
        return fail


def test_a_broken_cache_degrades_to_building_alone(make_builder):
    builds = FakeBuilds()
    builder = make_builder(builds, cache=BrokenCache())
    assert builder.image(request(), "latest").key == key_of(builder)
    assert builds.calls == 1


def test_threads_of_one_instance_share_one_build(make_builder):
    builds = FakeBuilds(seconds=0.2)
    builder = make_builder(builds)
    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(lambda _: builder.image(request(), "latest"), range(8)))
    assert builds.calls == 1 and len(set(records)) == 1


def test_builds_beyond_the_slots_wait_their_turn_and_all_succeed(make_builder):
    builds = FakeBuilds(seconds=0.1)
    builder = make_builder(builds, build_memory_bytes=1)
    builder.slots = BuildSlots(builder.slots.directory, 2, poll=0.01)
    images = ["hello", "goodbye", "tools", "coreutils", "nano", "moreutils"]
    with ThreadPoolExecutor(len(images)) as pool:
        records = list(pool.map(lambda name: builder.image(request(name), "latest"), images))
    assert len(records) == len(images)
    assert builds.most_at_once == 2


def test_slots_are_shared_by_every_builder_on_the_instance(tmp_path):
    first, second = BuildSlots(str(tmp_path), 1, poll=0.01), BuildSlots(str(tmp_path), 1, poll=0.01)
    stopping = threading.Event()
    with first.slot(stopping, time.time() + 5):
        with pytest.raises(errors.Unavailable, match="busy"):
            with second.slot(stopping, time.time() + 0.1):
                pass
    with second.slot(stopping, time.time() + 0.1):
        pass


def test_slots_follow_memory_and_cpus():
    gib = 1 << 30
    assert build_slots_for(4 * gib, 768 << 20, cpus=2) == 4
    assert build_slots_for(512 << 20, 768 << 20, cpus=2) == 1
    # Beyond two per CPU, Nix processes on one store only wait on each other's locks.
    assert build_slots_for(24 * gib, 768 << 20, cpus=2) == 4


def test_stopping_ends_the_build_releases_the_lease_and_remembers_nothing(make_builder):
    builds = FakeBuilds(seconds=30)
    builder = make_builder(builds)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(builder.image, request(), "latest")
        while builds.running == 0:
            time.sleep(0.01)
        builder.shutdown(grace=0.1)
        with pytest.raises(errors.Unavailable):
            pending.result(5)
    assert builder.cache.get_build(key_of(builder)) is None  # another instance may start at once


def test_a_renewal_that_finds_the_lease_gone_stops_renewing_it():
    lost = []
    renewals = []

    def renew(key, holder, until):
        renewals.append(key)
        return False

    keeper = LeaseKeeper(0.03, renew, lambda key, holder: lost.append((key, holder)))
    keeper.hold("k", "h")
    deadline = time.monotonic() + 2
    while not lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lost == [("k", "h")]
    count = len(renewals)
    time.sleep(0.1)
    assert len(renewals) == count
