"""The `Cache` contract, proved against every backend: SQLite, Firestore (the emulator),
and the in-memory layer in front of SQLite. Ends with unit tests of the memory layer's
own logic.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from builder.cache import (BuildLease, BuildProgress, BuiltImage, BuiltLayer, Fact, FailedBuild, ImageRecord,
                           LayerRecord, ManifestRef)
from builder.cache.memory import MemoryCache

NOW = 1_700_000_000.0
OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass(frozen=True)
class BackendSpec:
    """Enough to open one more instance of a backend, in this process or another."""

    kind: str  # sqlite | firestore | memory+sqlite
    path: str = ""
    emulator_host: str = ""
    project: str = ""


def open_backend(spec: BackendSpec):
    if spec.kind in ("sqlite", "memory+sqlite"):
        from builder.cache.sqlite import SqliteCache

        cache = SqliteCache(spec.path)
        return MemoryCache(cache, max_entries=100) if spec.kind == "memory+sqlite" else cache
    if spec.kind == "firestore":
        from google.cloud import firestore

        from builder.cache.firestore import FirestoreCache

        os.environ["FIRESTORE_EMULATOR_HOST"] = spec.emulator_host
        # A generous deadline: deadlines are not under test here, and a loaded machine's
        # cold emulator answers its first calls slowly.
        return FirestoreCache(firestore.Client(project=spec.project), prefix="contract-", timeout=15.0)
    raise ValueError(spec.kind)


# The in-process backends are part of scripts/test-fast; Firestore needs its emulator.
@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.fast), "firestore",
                        pytest.param("memory+sqlite", marks=pytest.mark.fast)])
def spec(request, tmp_path: Path) -> BackendSpec:
    if request.param == "firestore":
        emulator = request.getfixturevalue("firestore_env")
        return BackendSpec("firestore", emulator_host=emulator["FIRESTORE_EMULATOR_HOST"], project=emulator["FIRESTORE_PROJECT"])
    return BackendSpec(request.param, path=str(tmp_path / "cache.sqlite"))


@pytest.fixture
def cache(spec: BackendSpec):
    return open_backend(spec)


def image(key: str, expires_at: float = NOW + 3600, source: str = "demo:abc", blobs: tuple[str, ...] = ()) -> ImageRecord:
    return ImageRecord(
        key=key,
        manifests=(
            ManifestRef("sha256:" + "a" * 64, 1234, OCI),
            ManifestRef("sha256:" + "b" * 64, 1300, DOCKER),
        ),
        source=source,
        created=NOW - 5.25,
        expires_at=expires_at,
        blobs=blobs,
    )


def layer(key: str) -> LayerRecord:
    return LayerRecord(key=key, digest="sha256:" + "c" * 64, diff_id="sha256:" + "d" * 64, size=98765, md5="e" * 32)


# -- images and layers ----------------------------------------------------------------


def test_image_reads_back_as_written(cache):
    record = image("shell/git/htop:latest", expires_at=NOW + 3600.123456789)
    cache.put_image(record)
    assert cache.get_image("shell/git/htop:latest", NOW) == record
    assert cache.get_image("shell/git:latest", NOW) is None


def test_image_long_key_with_slashes(cache):
    key = "/".join(f"package-{i}" for i in range(60)) + ":latest"
    cache.put_image(image(key))
    assert cache.get_image(key, NOW).key == key


def test_expired_image_reads_as_none(cache):
    cache.put_image(image("shell:latest", expires_at=NOW + 10))
    assert cache.get_image("shell:latest", NOW + 9.5) is not None
    assert cache.get_image("shell:latest", NOW + 10) is None
    assert cache.get_image("shell:latest", NOW + 11) is None


def test_put_image_replaces(cache):
    cache.put_image(image("shell:latest", expires_at=NOW + 10, source="old"))
    cache.put_image(image("shell:latest", expires_at=NOW + 100, source="new"))
    assert cache.get_image("shell:latest", NOW + 50).source == "new"


def test_layers(cache):
    assert cache.get_layer("/nix/store/abc-git") is None
    record = layer("/nix/store/abc-git /nix/store/def-perl")
    cache.put_layer(record)
    assert cache.get_layer("/nix/store/abc-git /nix/store/def-perl") == record
    assert cache.get_layer("/nix/store/abc-git") is None


def test_layer_records_expire_like_image_records(cache):
    live = dataclasses.replace(layer("/nix/store/abc-live"), expires_at=time.time() + 3600)
    expired = dataclasses.replace(layer("/nix/store/abc-old"), expires_at=time.time() - 1)
    cache.put_layer(live)
    cache.put_layer(expired)
    assert cache.get_layer(live.key) == live
    assert cache.get_layer(expired.key) is None  # packed (and checked) again
    # Repacked, the record is live again.
    renewed = dataclasses.replace(expired, expires_at=time.time() + 3600)
    cache.put_layer(renewed)
    assert cache.get_layer(expired.key) == renewed


BLOB_X, BLOB_Y, BLOB_Z = ("sha256:" + c * 64 for c in "123")


def test_image_reads_back_with_the_blobs_it_names(cache):
    record = image("hello:latest", blobs=(BLOB_X, BLOB_Y))
    cache.put_image(record)
    assert cache.get_image("hello:latest", NOW) == record


def test_dropped_image_reads_as_none_and_others_stay(cache):
    cache.put_image(image("hello:latest"))
    cache.put_image(image("goodbye:latest"))
    cache.drop_image("hello:latest")
    cache.drop_image("never-stored:latest")
    assert cache.get_image("hello:latest", NOW) is None
    assert cache.get_image("goodbye:latest", NOW) is not None


def test_dropping_a_blob_drops_exactly_the_images_naming_it(cache):
    cache.put_image(image("a", blobs=(BLOB_X, BLOB_Y)))
    cache.put_image(image("b", blobs=(BLOB_Y, BLOB_Z)))
    cache.put_image(image("c", blobs=(BLOB_Z,)))
    assert sorted(cache.drop_images_with_blob(BLOB_Y)) == ["a", "b"]
    assert cache.get_image("a", NOW) is None and cache.get_image("b", NOW) is None
    assert cache.get_image("c", NOW) is not None
    assert cache.drop_images_with_blob(BLOB_Y) == []


def test_a_rewritten_image_is_found_by_its_new_blobs_only(cache):
    cache.put_image(image("a", blobs=(BLOB_X,)))
    cache.put_image(image("a", blobs=(BLOB_Z,)))
    assert cache.drop_images_with_blob(BLOB_X) == []
    assert cache.get_image("a", NOW) is not None
    assert cache.drop_images_with_blob(BLOB_Z) == ["a"]


# -- build leases -------------------------------------------------------------------------


def test_first_claim_wins_second_sees_live_lease(cache):
    assert cache.get_build("git") is None
    first = cache.claim_build("git", "instance-a", NOW + 60, NOW)
    assert first == BuildLease("git", "instance-a", NOW + 60, None)
    second = cache.claim_build("git", "instance-b", NOW + 70, NOW + 1)
    assert second.holder == "instance-a"
    assert second.expires_at == NOW + 60
    assert second.error is None
    assert cache.get_build("git").holder == "instance-a"


def test_leases_are_per_key(cache):
    assert cache.claim_build("git", "a", NOW + 60, NOW).holder == "a"
    assert cache.claim_build("htop", "b", NOW + 60, NOW).holder == "b"


def test_expired_lease_is_taken_over(cache):
    cache.claim_build("git", "dead", NOW + 60, NOW)
    taken = cache.claim_build("git", "alive", NOW + 200, NOW + 61)
    assert taken == BuildLease("git", "alive", NOW + 200, None)
    assert cache.get_build("git").holder == "alive"


def test_finish_without_error_releases(cache):
    cache.claim_build("git", "a", NOW + 60, NOW)
    cache.finish_build("git", "a", None, NOW + 120)
    assert cache.get_build("git") is None
    assert cache.claim_build("git", "b", NOW + 60, NOW + 1).holder == "b"


def test_failure_is_remembered_until_remember_until(cache):
    cache.claim_build("broken", "a", NOW + 600, NOW)
    error = {"code": "MANIFEST_UNKNOWN", "message": "no package named 'nope'", "detail": {"exit": 1}}
    cache.finish_build("broken", "a", error, NOW + 60)
    remembered = cache.claim_build("broken", "b", NOW + 600, NOW + 30)
    assert remembered.holder == "a"
    assert remembered.error == error
    assert remembered.expires_at == NOW + 60
    assert cache.get_build("broken").error == error
    retried = cache.claim_build("broken", "c", NOW + 700, NOW + 61)
    assert retried == BuildLease("broken", "c", NOW + 700, None)
    assert cache.get_build("broken").error is None


def test_the_holder_renews_its_lease_and_keeps_others_out(cache):
    cache.claim_build("git", "a", NOW + 30, NOW)
    assert cache.renew_build("git", "a", NOW + 60) is True
    # Without the renewal the lease would have expired at NOW + 30.
    assert cache.claim_build("git", "b", NOW + 90, NOW + 45).holder == "a"
    assert cache.get_build("git").expires_at == NOW + 60


def test_a_holder_whose_lease_was_taken_over_cannot_renew_it(cache):
    cache.claim_build("git", "dead", NOW + 30, NOW)
    cache.claim_build("git", "alive", NOW + 90, NOW + 31)
    assert cache.renew_build("git", "dead", NOW + 120) is False
    lease = cache.get_build("git")
    assert lease.holder == "alive" and lease.expires_at == NOW + 90


def test_nothing_to_renew_after_release_or_failure(cache):
    assert cache.renew_build("never", "a", NOW + 60) is False
    cache.claim_build("git", "a", NOW + 30, NOW)
    cache.finish_build("git", "a", None, 0)
    assert cache.renew_build("git", "a", NOW + 60) is False
    cache.claim_build("broken", "a", NOW + 30, NOW)
    cache.finish_build("broken", "a", {"code": "MANIFEST_UNKNOWN", "message": "no"}, NOW + 60)
    assert cache.renew_build("broken", "a", NOW + 600) is False
    assert cache.get_build("broken").expires_at == NOW + 60


def test_finish_by_a_holder_that_lost_its_lease_changes_nothing(cache):
    cache.claim_build("git", "slow", NOW + 60, NOW)
    cache.claim_build("git", "fast", NOW + 200, NOW + 61)  # "slow" counted as dead
    cache.finish_build("git", "slow", None, NOW + 62)
    cache.finish_build("git", "slow", {"message": "late"}, NOW + 62)
    lease = cache.get_build("git")
    assert lease.holder == "fast" and lease.error is None


def _race_threads(cache, key: str, count: int, expires_at: float, now: float) -> list[BuildLease]:
    barrier = threading.Barrier(count)
    results: list[BuildLease | BaseException] = [None] * count  # type: ignore[list-item]

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = cache.claim_build(key, f"thread-{i}", expires_at, now)
        except BaseException as exc:  # reported below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def test_threads_racing_for_one_key_get_one_holder(cache):
    results = _race_threads(cache, "git", 16, NOW + 60, NOW)
    holders = {r.holder for r in results}
    assert len(holders) == 1
    assert cache.get_build("git").holder in holders


def test_threads_racing_for_one_expired_lease_get_one_holder(cache):
    cache.claim_build("git", "dead", NOW + 60, NOW)
    results = _race_threads(cache, "git", 16, NOW + 300, NOW + 100)
    holders = {r.holder for r in results}
    assert len(holders) == 1 and holders != {"dead"}
    assert cache.get_build("git").holder in holders


def _race_process(spec: BackendSpec, key: str, holder: str, barrier, results) -> None:
    cache = open_backend(spec)
    cache.get_build("warm-up")  # connect before the race, so the race is between claims
    barrier.wait()
    results.put((holder, cache.claim_build(key, holder, NOW + 60, NOW).holder))


def test_processes_racing_for_one_key_get_one_holder(spec: BackendSpec):
    count = 6
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race_process, args=(spec, "git", f"proc-{i}", barrier, results)) for i in range(count)]
    for p in procs:
        p.start()
    answers = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    winners = {seen for _, seen in answers}
    assert len(winners) == 1
    winner = winners.pop()
    assert [h for h, seen in answers if h == seen] == [winner]
    assert open_backend(spec).get_build("git").holder == winner


# -- facts ----------------------------------------------------------------------------


def test_facts_read_back_by_kind_and_key_in_one_batch(cache):
    value = {"attr": "hello", "path": "/nix/store/" + "a" * 32 + "-hello", "meta": {"license": ["MIT"], "n": 3}}
    cache.put_facts("package", {"k/1": value, "k 2": {"x": None}}, NOW + 60)
    assert cache.get_facts("package", ["k/1", "k 2", "absent"], NOW) == {
        "k/1": Fact(value, NOW + 60), "k 2": Fact({"x": None}, NOW + 60)}
    # The same key under another kind is another fact.
    assert cache.get_facts("path", ["k/1"], NOW) == {}
    assert cache.get_facts("package", [], NOW) == {}


def test_expired_facts_read_as_absent_and_put_replaces(cache):
    cache.put_facts("revision", {"channel:x": {"revision": "a" * 40}}, NOW + 10)
    assert cache.get_facts("revision", ["channel:x"], NOW + 11) == {}
    cache.put_facts("revision", {"channel:x": {"revision": "b" * 40}}, NOW + 100)
    assert cache.get_facts("revision", ["channel:x"], NOW + 11) == {"channel:x": Fact({"revision": "b" * 40}, NOW + 100)}


def test_many_facts_in_one_call(cache):
    facts = {f"/nix/store/{i:032d}-p": {"narSize": i, "references": []} for i in range(650)}
    cache.put_facts("path", facts, NOW + 60)
    found = cache.get_facts("path", list(facts) + ["missing"], NOW)
    assert {k: f.value for k, f in found.items()} == facts


# -- the memory layer's own logic (unit tests over a counting stand-in) ---------------


class CountingCache:
    """A dictionary cache that counts how often it is asked."""

    def __init__(self):
        self.images: dict[str, ImageRecord] = {}
        self.layers: dict[str, LayerRecord] = {}
        self.facts: dict[tuple[str, str], Fact] = {}
        self.calls: list[str] = []
        self.fail = False

    def _called(self, name: str) -> None:
        self.calls.append(name)
        if self.fail:
            raise ConnectionError("down")

    def get_image(self, key, now):
        self._called("get_image")
        r = self.images.get(key)
        return r if r is not None and r.expires_at > now else None

    def put_image(self, record):
        self._called("put_image")
        self.images[record.key] = record

    def drop_image(self, key):
        self._called("drop_image")
        self.images.pop(key, None)

    def drop_images_with_blob(self, digest):
        self._called("drop_images_with_blob")
        keys = [k for k, r in self.images.items() if digest in r.blobs]
        for k in keys:
            del self.images[k]
        return keys

    def get_layer(self, key):
        self._called("get_layer")
        return self.layers.get(key)

    def put_layer(self, record):
        self._called("put_layer")
        self.layers[record.key] = record

    def claim_build(self, key, holder, expires_at, now):
        self._called("claim_build")
        return BuildLease(key, holder, expires_at)

    def renew_build(self, key, holder, expires_at):
        self._called("renew_build")
        return True

    def get_build(self, key):
        self._called("get_build")
        return None

    def finish_build(self, key, holder, error, remember_until):
        self._called("finish_build")

    def get_facts(self, kind, keys, now):
        self._called("get_facts")
        return {k: f for k in keys if (f := self.facts.get((kind, k))) is not None and f.expires_at > now}

    def put_facts(self, kind, facts, expires_at):
        self._called("put_facts")
        for key, value in facts.items():
            self.facts[(kind, key)] = Fact(value, expires_at)

    def record_image(self, image):
        self._called("record_image")

    def recent_images(self, now, limit):
        self._called("recent_images")
        return []

    def built_image(self, digest, now):
        self._called("built_image")

    def record_failure(self, failure):
        self._called("record_failure")

    def recent_failures(self, now, limit):
        self._called("recent_failures")
        return []

    def report_build(self, key, holder, progress):
        self._called("report_build")

    def builds_in_progress(self, now, limit):
        self._called("builds_in_progress")
        return []


def test_memory_serves_hits_without_asking_inner():
    inner = CountingCache()
    inner.images["a"] = image("a")
    memory = MemoryCache(inner, max_entries=10)
    assert memory.get_image("a", NOW) == image("a")
    assert memory.get_image("a", NOW + 1) == image("a")
    assert inner.calls == ["get_image"]


def test_memory_does_not_remember_misses():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=10)
    assert memory.get_image("a", NOW) is None
    inner.images["a"] = image("a")  # built by another instance meanwhile
    assert memory.get_image("a", NOW) == image("a")


def test_memory_honours_expiry():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=10)
    memory.put_image(image("a", expires_at=NOW + 10))
    assert memory.get_image("a", NOW + 5) is not None
    assert memory.get_image("a", NOW + 10) is None
    assert inner.calls == ["put_image", "get_image"]


def test_memory_evicts_least_recently_used():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=2)
    for key in "abc":
        memory.put_image(image(key))
    inner.calls.clear()
    memory.get_image("c", NOW)
    memory.get_image("b", NOW)
    assert inner.calls == []
    memory.get_image("a", NOW)  # evicted first
    assert inner.calls == ["get_image"]


def test_memory_caches_layers():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=10)
    assert memory.get_layer("x") is None
    inner.layers["x"] = layer("x")
    assert memory.get_layer("x") == layer("x")
    assert memory.get_layer("x") == layer("x")
    assert inner.calls == ["get_layer", "get_layer"]


def test_memory_delegates_leases():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=10)
    memory.claim_build("k", "h", NOW + 1, NOW)
    memory.get_build("k")
    memory.finish_build("k", "h", None, NOW)
    memory.claim_build("k", "h", NOW + 1, NOW)
    memory.renew_build("k", "h", NOW + 2)
    assert inner.calls == ["claim_build", "get_build", "finish_build", "claim_build", "renew_build"]


def test_memory_keeps_what_it_built_when_inner_is_down():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=10)
    inner.fail = True
    with pytest.raises(ConnectionError):
        memory.put_image(image("a"))
    assert memory.get_image("a", NOW) == image("a")
    with pytest.raises(ConnectionError):
        memory.get_image("b", NOW)


def test_memory_keeps_facts_until_their_expiry_and_asks_only_for_the_rest():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=10)
    inner.put_facts("revision", {"a": {"revision": "1"}}, NOW + 10)
    assert memory.get_facts("revision", ["a"], NOW) == {"a": Fact({"revision": "1"}, NOW + 10)}
    inner.calls.clear()
    assert memory.get_facts("revision", ["a"], NOW + 5) == {"a": Fact({"revision": "1"}, NOW + 10)}
    assert inner.calls == []
    assert memory.get_facts("revision", ["a", "b"], NOW + 11) == {}  # expired: asked again, with the miss
    assert inner.calls == ["get_facts"]


def test_memory_forgets_images_naming_a_lost_blob_even_when_inner_is_down():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=10)
    memory.put_image(image("a", blobs=(BLOB_X,)))
    memory.put_image(image("b", blobs=(BLOB_Y,)))
    inner.fail = True
    with pytest.raises(ConnectionError):
        memory.drop_images_with_blob(BLOB_X)
    inner.fail = False
    inner.images.clear()  # so a hit can only come from the memory
    assert memory.get_image("a", NOW) is None
    assert memory.get_image("b", NOW) is not None


def test_memory_drops_what_inner_drops():
    inner = CountingCache()
    inner.images["a"] = image("a", blobs=(BLOB_X,))  # written by another instance, not in memory
    memory = MemoryCache(inner, max_entries=10)
    memory.put_image(image("b", blobs=(BLOB_X,)))
    assert memory.drop_images_with_blob(BLOB_X) == ["a", "b"]
    memory.drop_image("c")
    assert inner.calls[-1] == "drop_image"


def test_memory_delegates_front_page_records_and_listings():
    inner = CountingCache()
    memory = MemoryCache(inner, max_entries=10)
    for _ in range(2):
        memory.record_image(built(1))
        memory.recent_images(NOW, 10)
        memory.built_image(built(1).digest, NOW)
        memory.record_failure(failure("x"))
        memory.recent_failures(NOW, 10)
        memory.report_build("k", "h", progress("k"))
        memory.builds_in_progress(NOW, 10)
    assert inner.calls == ["record_image", "recent_images", "built_image", "record_failure", "recent_failures",
                           "report_build", "builds_in_progress"] * 2


# -- the front page: recent images and failures --------------------------------------


def built(i: int, finished: float = NOW, expires_at: float = NOW + 3600, name: str = "shell/hello") -> BuiltImage:
    digest = "sha256:" + f"{i:064x}"
    return BuiltImage(
        key=f'["amd64",["hello","p{i}"],"demo"]', name=name, tag="latest", architecture="amd64", source="demo:abc",
        manifests=(ManifestRef(digest, 700 + i, DOCKER), ManifestRef("sha256:" + f"{i:063x}f", 650, OCI)),
        size=123_456 + i, layer_count=3, build_seconds=1.25, finished=finished, expires_at=expires_at,
        layers=(
            BuiltLayer("sha256:" + "1" * 64, 1000, ("/nix/store/aaa-busybox-1.35.0",)),
            BuiltLayer("sha256:" + "2" * 64, 2000, ("/nix/store/bbb-hello", "/nix/store/ccc-libgreeting-1.0")),
            BuiltLayer("sha256:" + "3" * 64, 300, ()),
        ),
    )


def failure(key: str, finished: float = NOW, expires_at: float = NOW + 3600, message: str = "unknown package: nope") -> FailedBuild:
    return FailedBuild(key=key, name=key.lower(), tag="latest", architecture="amd64", code="MANIFEST_UNKNOWN",
                       message=message, finished=finished, expires_at=expires_at)


def test_built_image_reads_back_with_its_layers_by_first_manifest_digest(cache):
    image = built(1)
    cache.record_image(image)
    assert cache.built_image(image.digest, NOW) == image
    assert cache.built_image(image.manifests[1].digest, NOW) is None
    assert cache.built_image("sha256:" + "f" * 64, NOW) is None
    assert cache.built_image(image.digest, image.expires_at) is None


def test_recent_images_are_the_newest_unexpired_without_layers(cache):
    for i in range(8):
        cache.record_image(built(i, finished=NOW + i, expires_at=NOW + 100 + (i == 6) * -90))
    listed = cache.recent_images(NOW + 50, 4)
    # Newest first; number 6 expired at NOW + 10, so a listing of 4 holds at most 4 and never it.
    assert [image.finished for image in listed] in ([NOW + 7, NOW + 5, NOW + 4, NOW + 3], [NOW + 7, NOW + 5, NOW + 4])
    assert all(image.layers == () for image in listed)
    assert listed[0] == dataclasses.replace(built(7, finished=NOW + 7, expires_at=NOW + 100), layers=())
    assert cache.recent_images(NOW + 200, 4) == []


def test_recent_images_are_bounded_by_the_limit(cache):
    for i in range(30):
        cache.record_image(built(i, finished=NOW + i))
    assert [image.finished for image in cache.recent_images(NOW, 5)] == [NOW + i for i in (29, 28, 27, 26, 25)]


def test_recent_failures_keep_the_latest_per_key_newest_first_until_they_expire(cache):
    cache.record_failure(failure("a", finished=NOW, message="first"))
    cache.record_failure(failure("b", finished=NOW + 1, expires_at=NOW + 20))
    cache.record_failure(failure("a", finished=NOW + 2, message="second"))
    assert [(f.key, f.message) for f in cache.recent_failures(NOW + 3, 10)] == [("a", "second"), ("b", "unknown package: nope")]
    assert cache.recent_failures(NOW + 3, 10)[0] == failure("a", finished=NOW + 2, message="second")
    assert [f.key for f in cache.recent_failures(NOW + 3, 1)] == ["a"]
    assert [f.key for f in cache.recent_failures(NOW + 30, 10)] == ["a"]


def test_front_page_records_keep_markup_and_unicode_verbatim(cache):
    message = "error: <script>alert('x')</script> & \"quotes\" \u2014 caf\u00e9\n  at line 2"
    cache.record_failure(failure("<b>k</b>", message=message))
    assert cache.recent_failures(NOW, 10)[0].message == message
    image = built(3, name="<img src=x onerror=alert(1)>")
    cache.record_image(image)
    assert cache.recent_images(NOW, 10)[0].name == image.name


# -- the front page: builds in progress, recorded in their leases -------------------------


def progress(key: str, phase: str = "evaluating", started: float = NOW) -> BuildProgress:
    return BuildProgress(key=key, name=f"shell/{key}", tag="latest", architecture="arm64", started=started, phase=phase)


def test_holder_reports_progress_and_listing_shows_live_builds_oldest_first(cache):
    assert cache.builds_in_progress(NOW, 10) == []
    cache.claim_build("git", "a", NOW + 60, NOW)
    cache.claim_build("htop", "b", NOW + 60, NOW)
    assert cache.builds_in_progress(NOW, 10) == []  # claimed, nothing reported yet
    cache.report_build("git", "a", progress("git", "realising", started=NOW + 2))
    cache.report_build("htop", "b", progress("htop", "evaluating", started=NOW + 1))
    cache.report_build("git", "a", progress("git", "packing 3 of 12 layers", started=NOW + 2))
    assert cache.builds_in_progress(NOW + 5, 10) == [progress("htop", "evaluating", NOW + 1),
                                                    progress("git", "packing 3 of 12 layers", NOW + 2)]
    assert len(cache.builds_in_progress(NOW + 5, 1)) == 1
    assert cache.builds_in_progress(NOW + 60, 10) == []  # both leases lapsed: their holders died


def test_only_the_holder_reports_progress(cache):
    cache.claim_build("git", "a", NOW + 60, NOW)
    cache.report_build("git", "intruder", progress("git", "uploading"))
    cache.report_build("nothing-here", "a", progress("nothing-here"))
    assert cache.builds_in_progress(NOW, 10) == []
    assert cache.get_build("nothing-here") is None


def test_finished_failed_and_taken_over_builds_leave_the_listing(cache):
    for key in ("ok", "broken", "stalled"):
        cache.claim_build(key, "a", NOW + 60, NOW)
        cache.report_build(key, "a", progress(key, "realising"))
    cache.finish_build("ok", "a", None, NOW)
    cache.finish_build("broken", "a", {"message": "no"}, NOW + 600)
    cache.report_build("broken", "a", progress("broken", "uploading"))  # too late: the failure stays as it is
    assert [b.key for b in cache.builds_in_progress(NOW + 1, 10)] == ["stalled"]
    cache.claim_build("stalled", "b", NOW + 200, NOW + 61)  # "a" counted as dead
    assert cache.builds_in_progress(NOW + 62, 10) == []  # "b" has said nothing yet
    assert cache.get_build("broken").error == {"message": "no"}
