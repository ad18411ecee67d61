"""The front page with a full cache: time to render `/`, its size, and the cache round trips it costs.

    .venv/bin/python bench/bench_page.py [--images 1000] [--rounds 40]

Each backend (SQLite; Firestore in Google's emulator) is filled with `--images` recent
images (ten layers of store paths each), 200 failures and 5 builds in progress. Then,
in alternating rounds, it times

- baseline: one warm `get_image` read of the same backend (one round trip);
- cold `/`: the page's three listing queries and the rendering, as an instance does
  once per STATUS_SECONDS;
- warm `/`: the rendering alone, as every other request within STATUS_SECONDS;

and reports medians. For Firestore it counts the RPCs one cold `/` sends, by kind.
Prints a Markdown table for bench/RESULTS.md. The emulator is a local JVM, not the
service: its figures show the shape of the costs rather than production latency.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flask  # noqa: E402

from builder import page  # noqa: E402
from builder.cache import (BuildProgress, BuiltImage, BuiltLayer, FailedBuild, ImageRecord,  # noqa: E402
                           ManifestRef)
from builder.cache.memory import MemoryCache  # noqa: E402
from builder.cache.sqlite import SqliteCache  # noqa: E402
from builder.config import Config  # noqa: E402
from tests.fixtures_firestore import FirestoreEmulator, find_emulator_jar, free_port  # noqa: E402

DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
OCI = "application/vnd.oci.image.manifest.v1+json"


def built(i: int, now: float) -> BuiltImage:
    layers = tuple(
        BuiltLayer("sha256:" + f"{i * 16 + n:064x}", 50_000 + n, tuple(f"/nix/store/{i:08d}{n:024d}-pkg-{n}-1.0"
                                                                       for _ in range(1 + n % 3)))
        for n in range(10))
    return BuiltImage(
        key=f'["amd64",["pkg{i}"],"channel:abc"]', name=f"shell/pkg{i}", tag="latest", architecture="amd64",
        source="channel:" + "a" * 40,
        manifests=(ManifestRef("sha256:" + f"{i:064x}", 2000, DOCKER),
                   ManifestRef("sha256:" + f"{i:063x}f", 1900, OCI)),
        size=sum(l.size for l in layers), layer_count=len(layers), build_seconds=3.5, finished=now - i,
        expires_at=now + 3600, layers=layers,
    )


def fill(cache, images: int, now: float) -> None:
    for i in range(images):
        cache.record_image(built(i, now))
    for i in range(200):
        cache.record_failure(FailedBuild(f"f{i}", f"broken{i}", "latest", "amd64", "MANIFEST_UNKNOWN",
                                         f"error: builder for '/nix/store/x-broken{i}.drv' failed with exit code 1",
                                         now - i, now + 3600))
    for i in range(5):
        cache.claim_build(f"b{i}", "bench", now + 600, now)
        cache.report_build(f"b{i}", "bench", BuildProgress(f"b{i}", f"shell/slow{i}", "latest", "amd64", now - 30,
                                                           f"packing {i} of 12 layers"))
    cache.put_image(ImageRecord("baseline", (ManifestRef("sha256:" + "b" * 64, 1, DOCKER),), "s", now, now + 3600))


def measure(name: str, cache, rounds: int) -> dict:
    app = flask.Flask("bench")
    front = page.FrontPage(Config(), MemoryCache(cache, 0), lambda: None)

    def render() -> bytes:
        with app.test_request_context("/", base_url="http://registry.example"):
            response = front.handle(flask.request, "/")
            assert response.status_code == 200
            return response.get_data()

    baseline, cold, warm = [], [], []
    queries = {"builds": lambda: cache.builds_in_progress(time.time(), page.BUILDS_SHOWN),
               "images": lambda: cache.recent_images(time.time(), page.IMAGES_SHOWN),
               "failures": lambda: cache.recent_failures(time.time(), page.FAILURES_SHOWN)}
    each: dict[str, list[float]] = {q: [] for q in queries}
    body = render()
    for _ in range(rounds):
        for query, call in queries.items():
            started = time.perf_counter()
            call()
            each[query].append(time.perf_counter() - started)
        started = time.perf_counter()
        assert cache.get_image("baseline", time.time()) is not None
        baseline.append(time.perf_counter() - started)
        front.status = page.StatusReader(front.cache)  # forget the last reading: the queries run
        started = time.perf_counter()
        body = render()
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        render()
        warm.append(time.perf_counter() - started)
    return {"backend": name, "baseline": statistics.median(baseline), "cold": statistics.median(cold),
            "warm": statistics.median(warm), "bytes": len(body), "images_shown": body.count(b'href="/images/'),
            "each": {q: statistics.median(t) for q, t in each.items()}}


def count_rpcs(cache, client) -> Counter:
    """The RPCs one cold `/` sends, by method, counted on the client's API object."""
    api, counts = client._firestore_api, Counter()
    for method in ("run_query", "batch_get_documents", "get_document", "commit", "list_documents"):
        original = getattr(api, method)

        def counted(*args, _method=method, _original=original, **kwargs):
            counts[_method] += 1
            return _original(*args, **kwargs)

        setattr(api, method, counted)
    page.StatusReader(cache).read()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    now = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SqliteCache(os.path.join(tmp, "cache.sqlite"))
        fill(sqlite, args.images, now)
        results.append(measure("SQLite", sqlite, args.rounds))

        emulator = FirestoreEmulator(jar=find_emulator_jar(), port=free_port())
        emulator.start()
        try:
            os.environ.update(emulator.env())
            from google.cloud import firestore

            from builder.cache.firestore import FirestoreCache

            client = firestore.Client(project=emulator.project)
            store = FirestoreCache(client, prefix="bench-", timeout=30.0)
            started = time.perf_counter()
            fill(store, args.images, now)
            filled = time.perf_counter() - started
            results.append(measure("Firestore emulator", store, args.rounds))
            rpcs = count_rpcs(store, client)
        finally:
            emulator.stop()

    print(f"{platform.node()}: {os.cpu_count()} CPUs, {args.images} recent images, 200 failures, 5 builds; "
          f"median of {args.rounds} alternating rounds (Firestore filled in {filled:.1f} s)\n")
    print("| backend | baseline: one get_image | cold `/` (3 queries + render) | warm `/` (render) | page bytes "
          "| images shown |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['baseline'] * 1e3:.2f} ms | {r['cold'] * 1e3:.2f} ms | {r['warm'] * 1e3:.2f} ms "
              f"| {r['bytes']} | {r['images_shown']} |")
    print("\nEach listing alone (median): " + "; ".join(
        r["backend"] + ": " + ", ".join(f"{q} {t * 1e3:.2f} ms" for q, t in r["each"].items()) for r in results))
    print(f"\nFirestore RPCs for one cold `/`: {dict(sorted(rpcs.items()))}")


if __name__ == "__main__":
    main()
