"""What only the Firestore backend has: its documents, its configuration, the takeover
race on an expired lease, and its behaviour with Firestore stopped.

Runs against Google's emulator with the official client (see fixtures_firestore.py).
"""
from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone

import pytest
from google.cloud import firestore

from builder.cache import BuildLease, ImageRecord, LayerRecord, ManifestRef
from builder.cache.firestore import FirestoreCache, FirestoreUnavailable
from builder.config import Config, open_cache

NOW = 1_700_000_000.0


def image(key: str, expires_at: float = NOW + 3600) -> ImageRecord:
    return ImageRecord(
        key=key,
        manifests=(ManifestRef("sha256:" + "a" * 64, 1234, "application/vnd.oci.image.manifest.v1+json"),),
        source="demo:abc",
        created=NOW,
        expires_at=expires_at,
    )


@pytest.fixture
def client(firestore_env):
    return firestore.Client(project=firestore_env["FIRESTORE_PROJECT"])


# Generous deadlines where deadlines are not the subject: a loaded machine and a cold
# emulator JVM answer the first calls slowly.
PATIENT = 15.0


@pytest.fixture
def cache(client):
    return FirestoreCache(client, prefix="t-", timeout=PATIENT)


def test_documents_are_keyed_by_hash_with_a_timestamp_for_ttl(cache, client):
    key = "shell/git/htop:latest"
    cache.put_image(image(key, expires_at=NOW + 60.5))
    cache.put_layer(LayerRecord("/nix/store/abc-git", "sha256:" + "c" * 64, "sha256:" + "d" * 64, 10, "e" * 32))
    cache.claim_build(key, "a", NOW + 30, NOW)
    doc = hashlib.sha256(key.encode()).hexdigest()

    manifest = client.collection("t-manifests").document(doc).get().to_dict()
    assert manifest["key"] == key
    assert isinstance(manifest["expires_at"], datetime)  # what a TTL policy acts on
    assert manifest["expires_at"] == datetime.fromtimestamp(NOW + 60.5, timezone.utc)
    assert manifest["manifests"][0]["size"] == 1234

    lease = client.collection("t-builds").document(doc).get().to_dict()
    assert lease["holder"] == "a" and isinstance(lease["expires_at"], datetime)

    layer_doc = hashlib.sha256(b"/nix/store/abc-git").hexdigest()
    assert client.collection("t-layers").document(layer_doc).get().to_dict()["md5"] == "e" * 32


def test_expired_documents_still_present_read_as_absent(cache, client):
    # TTL deletion lags by days (and the emulator never applies it): reads must check.
    cache.put_image(image("old:latest", expires_at=NOW - 1))
    doc = hashlib.sha256(b"old:latest").hexdigest()
    assert client.collection("t-manifests").document(doc).get().exists
    assert cache.get_image("old:latest", NOW) is None


def test_document_of_another_key_is_not_returned(cache, client):
    doc = hashlib.sha256(b"git:latest").hexdigest()
    client.collection("t-manifests").document(doc).set({"key": "something-else"})
    assert cache.get_image("git:latest", NOW) is None


def test_unreadable_document_raises_unavailable(cache, client):
    doc = hashlib.sha256(b"git:latest").hexdigest()
    client.collection("t-manifests").document(doc).set({"key": "git:latest", "expires_at_unix": NOW + 10})
    with pytest.raises(FirestoreUnavailable):
        cache.get_image("git:latest", NOW)


def test_prefixes_separate_deployments(client):
    a = FirestoreCache(client, prefix="a-", timeout=PATIENT)
    b = FirestoreCache(client, prefix="b-", timeout=PATIENT)
    a.put_image(image("git:latest"))
    assert b.get_image("git:latest", NOW) is None
    assert b.claim_build("git", "b", NOW + 60, NOW).holder == "b"
    assert a.claim_build("git", "a", NOW + 60, NOW).holder == "a"


def test_open_cache_from_configuration(firestore_env, client):
    config = Config.from_env(
        {
            "NIXERY_CACHE_BACKEND": "firestore",
            "FIRESTORE_PROJECT": firestore_env["FIRESTORE_PROJECT"],
            "FIRESTORE_COLLECTION_PREFIX": "cfg-",
        }
    )
    cache = open_cache(config)
    assert isinstance(cache.inner, FirestoreCache)  # behind this instance's memory
    cache.put_image(image("git:latest"))
    doc = hashlib.sha256(b"git:latest").hexdigest()
    assert client.collection("cfg-manifests").document(doc).get().exists


def test_gcs_storage_defaults_to_firestore_cache(firestore_env):
    config = Config.from_env(
        {"NIXERY_STORAGE_BACKEND": "gcs", "GCS_BUCKET": "b", "FIRESTORE_PROJECT": firestore_env["FIRESTORE_PROJECT"]}
    )
    assert isinstance(open_cache(config).inner, FirestoreCache)


class PausingCache(FirestoreCache):
    """Runs `pause` once, right after its next lease read: a window for a rival to act in."""

    pause = None

    def _snapshot(self, ref):
        snapshot = super()._snapshot(ref)
        pause, self.pause = self.pause, None
        if pause is not None:
            pause()
        return snapshot


def test_two_takers_of_one_expired_lease_one_wins(client):
    first = FirestoreCache(client, prefix="t-", timeout=PATIENT)
    first.claim_build("git", "dead", NOW + 60, NOW)
    slow = PausingCache(client, prefix="t-", timeout=PATIENT)
    fast = FirestoreCache(client, prefix="t-", timeout=PATIENT)
    fast_result: list[BuildLease] = []
    # `slow` reads the expired lease; before it writes, `fast` takes the lease over.
    slow.pause = lambda: fast_result.append(fast.claim_build("git", "fast", NOW + 300, NOW + 100))
    slow_result = slow.claim_build("git", "slow", NOW + 300, NOW + 100)
    assert fast_result[0].holder == "fast"
    assert slow_result.holder == "fast"  # its stale update was refused; it re-read
    assert first.get_build("git").holder == "fast"


def test_release_does_not_delete_a_successors_lease(client):
    cache = PausingCache(client, prefix="t-", timeout=PATIENT)
    rival = FirestoreCache(client, prefix="t-", timeout=PATIENT)
    cache.claim_build("git", "slow", NOW + 60, NOW)

    def taken_over():  # "slow" read its own lease, then lost it before deleting it
        rival._builds.document(hashlib.sha256(b"git").hexdigest()).update({"holder": "fast"})

    cache.pause = taken_over
    cache.finish_build("git", "slow", None, NOW)
    assert rival.get_build("git").holder == "fast"


# -- Firestore unreachable ----------------------------------------------------------------

TIMEOUT = 1.0
# A hang guard, not a speed claim: a call may retry within TIMEOUT and its last attempt may
# run TIMEOUT more; anything near a minute would mean a pull stuck behind a dead cache.
HANG_BOUND = 15 * TIMEOUT


def _every_call(cache: FirestoreCache):
    return [
        ("get_image", lambda: cache.get_image("git:latest", NOW)),
        ("put_image", lambda: cache.put_image(image("git:latest"))),
        ("get_layer", lambda: cache.get_layer("/nix/store/abc-git")),
        ("put_layer", lambda: cache.put_layer(LayerRecord("/nix/store/abc-git", "d", "i", 1, "m"))),
        ("claim_build", lambda: cache.claim_build("git", "a", NOW + 60, NOW)),
        ("get_build", lambda: cache.get_build("git")),
        ("finish_build", lambda: cache.finish_build("git", "a", {"message": "x"}, NOW + 60)),
    ]


def test_stopped_emulator_fails_fast_then_recovers(firestore_emulator, client):
    # No cool-down: every call must meet the stopped server on its own and give up in time.
    patient = FirestoreCache(client, prefix="t-", timeout=PATIENT, cooldown=0)
    fast = FirestoreCache(client, prefix="t-", timeout=TIMEOUT, cooldown=0)  # same client, same gRPC channel
    patient.put_image(image("git:latest"))
    assert patient.get_image("git:latest", NOW) is not None

    firestore_emulator.stop()
    for name, call in _every_call(fast):
        started = time.monotonic()
        with pytest.raises(FirestoreUnavailable):
            call()
        assert time.monotonic() - started < HANG_BOUND, name

    firestore_emulator.start()  # an empty emulator: the cache lost its data, not its use
    # The client reconnects on its own; its first calls may still meet gRPC's reconnect backoff.
    for _ in range(20):
        try:
            assert patient.get_image("git:latest", NOW) is None
            break
        except FirestoreUnavailable:
            time.sleep(0.5)
    else:
        pytest.fail("the cache did not recover after Firestore came back")
    for name, call in _every_call(patient):
        call()
    assert patient.get_image("git:latest", NOW) is not None
    assert patient.get_build("git").error == {"message": "x"}


def test_never_reachable_firestore_fails_fast(monkeypatch):
    from tests.fixtures_firestore import free_port

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens
    cache = FirestoreCache(firestore.Client(project="nobody"), timeout=TIMEOUT, cooldown=0)
    for name, call in _every_call(cache):
        started = time.monotonic()
        with pytest.raises(FirestoreUnavailable):
            call()
        assert time.monotonic() - started < HANG_BOUND, name


def test_after_a_failure_calls_are_skipped_for_the_cooldown(monkeypatch):
    from tests.fixtures_firestore import free_port

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens
    cache = FirestoreCache(firestore.Client(project="nobody"), timeout=TIMEOUT, cooldown=3600)
    with pytest.raises(FirestoreUnavailable) as tried:
        cache.get_image("git:latest", NOW)
    assert tried.value.__cause__ is not None  # an RPC was made and failed
    for name, call in _every_call(cache):
        with pytest.raises(FirestoreUnavailable) as skipped:
            call()
        assert skipped.value.__cause__ is None, name  # no RPC: the build is not held up

    brief = FirestoreCache(firestore.Client(project="nobody"), timeout=TIMEOUT, cooldown=0.1)
    with pytest.raises(FirestoreUnavailable):
        brief.get_layer("x")
    time.sleep(0.2)
    with pytest.raises(FirestoreUnavailable) as retried:
        brief.get_layer("x")
    assert retried.value.__cause__ is not None  # the cool-down ended: Firestore is asked again
