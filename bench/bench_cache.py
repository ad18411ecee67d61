"""Warm cache reads: Firestore (Google's emulator) against SQLite, with and without the
per-instance memory layer, in one run on one machine.

    .venv/bin/python bench/bench_cache.py [--seconds 3] [--threads 8] [--images 200]

Every backend is filled with the same image records, then read for a fixed time: one
thread (latency percentiles), then `--threads` threads sharing one cache instance (as
a registry process's request threads do) for throughput. A build-lease round (claim
and release of a fresh key) is timed too. Prints a Markdown table for bench/RESULTS.md.
The emulator is a local JVM, not the service: its figures show the shape of the costs
(one RPC per read) rather than production latency.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.cache import ImageRecord, ManifestRef  # noqa: E402
from builder.cache.memory import MemoryCache  # noqa: E402
from builder.cache.sqlite import SqliteCache  # noqa: E402
from tests.fixtures_firestore import FirestoreEmulator, find_emulator_jar, free_port  # noqa: E402

OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"


def record(i: int, now: float) -> ImageRecord:
    return ImageRecord(
        key=f"shell/git/htop/pkg{i}:latest",
        manifests=(ManifestRef("sha256:" + "a" * 64, 1234, OCI), ManifestRef("sha256:" + "b" * 64, 1300, DOCKER)),
        source="demo:0123456789abcdef",
        created=now,
        expires_at=now + 3600,
    )


def single_thread(cache, keys: list[str], seconds: float) -> dict[str, float]:
    samples: list[float] = []
    i = 0
    begun = time.perf_counter()
    end = begun + seconds
    while time.perf_counter() < end:
        key = keys[i % len(keys)]
        i += 1
        started = time.perf_counter()
        found = cache.get_image(key, time.time())
        samples.append(time.perf_counter() - started)
        if found is None:
            raise RuntimeError(f"warm read missed {key}")
    elapsed = time.perf_counter() - begun
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
        "ops_1": len(samples) / elapsed,
    }


def many_threads(cache, keys: list[str], seconds: float, threads: int) -> float:
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)
    stop = threading.Event()

    def run(t: int) -> None:
        n = 0
        barrier.wait()
        while not stop.is_set():
            cache.get_image(keys[(n * threads + t) % len(keys)], time.time())
            n += 1
        counts[t] = n

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - started)


def lease_round(cache, rounds: int) -> float:
    samples = []
    now = time.time()
    for i in range(rounds):
        key = f"lease-{os.getpid()}-{time.monotonic_ns()}-{i}"
        started = time.perf_counter()
        lease = cache.claim_build(key, "bench", now + 60, now)
        cache.finish_build(key, lease.holder, None, now)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per backend and mode")
    parser.add_argument("--threads", type=int, default=8, help="threads for the throughput run")
    parser.add_argument("--images", type=int, default=200, help="distinct image records read in turn")
    args = parser.parse_args()

    emulator = FirestoreEmulator(jar=find_emulator_jar(), port=free_port(), project="nixery-bench")
    emulator.start()
    os.environ.update(emulator.env())
    try:
        from google.cloud import firestore

        from builder.cache.firestore import FirestoreCache

        workdir = tempfile.mkdtemp(prefix="bench-cache-")
        sqlite = SqliteCache(os.path.join(workdir, "cache.sqlite"))
        fs = FirestoreCache(firestore.Client(project=emulator.project), prefix="bench-", timeout=10.0)
        backends = {
            "sqlite": sqlite,
            "memory + sqlite": MemoryCache(sqlite, max_entries=10_000),
            "firestore (emulator)": fs,
            "memory + firestore (emulator)": MemoryCache(fs, max_entries=10_000),
        }
        now = time.time()
        records = [record(i, now) for i in range(args.images)]
        keys = [r.key for r in records]
        for r in records:
            sqlite.put_image(r)
            fs.put_image(r)

        rows = []
        for name, cache in backends.items():
            for key in keys:  # warm: connections open, memory layer filled, JIT-compiled emulator paths
                cache.get_image(key, time.time())
            single_thread(cache, keys, min(1.0, args.seconds))
            one = single_thread(cache, keys, args.seconds)
            many = many_threads(cache, keys, args.seconds, args.threads)
            lease = lease_round(cache, 50) if not name.startswith("memory") else None
            rows.append((name, one, many, lease))
    finally:
        emulator.stop()

    print(f"`{' '.join(['bench/bench_cache.py', *sys.argv[1:]])}` on {platform.node()} "
          f"({os.cpu_count()} CPUs, Python {platform.python_version()}), {args.images} records, "
          f"{args.seconds:g} s per cell\n")
    print(f"| backend | get_image p50 | p99 | ops/s, 1 thread | ops/s, {args.threads} threads | claim+release p50 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, one, many, lease in rows:
        lease_cell = f"{lease / 1000:.2f} ms" if lease is not None else "(delegated)"
        print(
            f"| {name} | {_fmt(one['p50_us'])} | {_fmt(one['p99_us'])} | {one['ops_1']:,.0f} | {many:,.0f} | {lease_cell} |"
        )


def _fmt(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} µs"


if __name__ == "__main__":
    main()
