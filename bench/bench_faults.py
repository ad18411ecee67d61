"""Self-healing, measured with real server processes and real Nix on the demo set.

- takeover: an instance is SIGKILLed while it builds `hello` (held up by a gate file, so it
  dies mid-build); a fresh instance on the same storage and cache is asked for the image at
  once. Time from the kill to the fresh instance's 200, per BUILD_LEASE_SECONDS.
- warm latency: p50/p99 of warm manifest GETs (one keep-alive connection) while the deployed
  concurrency of cold builds (15, plus the measuring request: 16) is in flight or waiting for a
  build slot, against the same with nothing in flight; alternating rounds, medians reported.
- memory: the peak memory of the whole instance (a cgroup v1 memory group, root only) while it
  builds 1 cold image, against 16 different cold images at once (the deployed shape: 4 slots).
- slots: 16 different cold images at once with 4 build slots against 16 (unbounded): how many
  succeed within NIX_TIMEOUT (120 s) and the wall time.

Usage: .venv/bin/python bench/bench_faults.py [--rounds 5] [--takeover-rounds 3] [--parts takeover,latency,slots,memory]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.demo_variants import gated_demo  # noqa: E402
from tests.registry_process import RegistryProcess  # noqa: E402
from tests.test_build_faults import COLD_IMAGES, OCI, MemoryGroup, shared_state, wait_for  # noqa: E402


def takeover(lease: int, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            demo = gated_demo(tmp_path)
            env = shared_state(tmp_path, demo.path, BUILD_LEASE_SECONDS=str(lease))
            holder = RegistryProcess(tmp_path / "holder", env).start()
            fresh = RegistryProcess(tmp_path / "fresh", env).start()
            try:
                ThreadPoolExecutor(1).submit(_quiet_get, holder, "/v2/hello/manifests/latest")
                wait_for(demo.builders_running)
                holder.kill()
                demo.gate.unlink()
                killed = time.monotonic()
                response = fresh.get("/v2/hello/manifests/latest", headers=OCI, timeout=600)
                assert response.status_code == 200, response.text
                times.append(time.monotonic() - killed)
            finally:
                holder.stop()
                fresh.stop()
    return times


def _quiet_get(registry: RegistryProcess, path: str) -> None:
    try:
        registry.get(path, headers=OCI, timeout=600)
    except requests.RequestException:
        pass


def latencies(registry: RegistryProcess, samples: int) -> list[float]:
    session = requests.Session()
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        response = session.get(registry.url + "/v2/goodbye/manifests/latest", headers=OCI, timeout=60)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200
    return times


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def warm_latency(rounds: int, samples: int) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {"idle": [], "builds in flight": []}
    for _ in range(rounds):
        for mode in results:  # alternating rounds
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp)
                demo = gated_demo(tmp_path)
                demo.gate.unlink()
                registry = RegistryProcess(tmp_path / "registry", shared_state(
                    tmp_path, demo.path, WORKERS="1", THREADS="16", BUILD_CONCURRENCY="2")).start()
                try:
                    assert registry.get("/v2/goodbye/manifests/latest", headers=OCI).status_code == 200
                    if mode == "idle":
                        times = latencies(registry, samples)
                    else:
                        demo.gate.touch()
                        with ThreadPoolExecutor(15) as pool:
                            for name in COLD_IMAGES[:15]:
                                pool.submit(_quiet_get, registry, f"/v2/{name}/manifests/latest")
                            wait_for(demo.builders_running)
                            time.sleep(1)
                            times = latencies(registry, samples)
                            demo.gate.unlink()
                    results[mode].append((p(times, 0.5), p(times, 0.99)))
                finally:
                    registry.stop()
    return results


def memory(rounds: int) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {"1 cold build": [], "16 cold builds at once": []}
    served: dict[str, list[int]] = {mode: [] for mode in results}
    for _ in range(rounds):
        for mode in results:
            group = MemoryGroup("bench-faults")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    tmp_path = Path(tmp)
                    demo = gated_demo(tmp_path)
                    demo.gate.unlink()
                    with group.entered():
                        registry = RegistryProcess(tmp_path / "registry", shared_state(
                            tmp_path, demo.path, WORKERS="1", THREADS="16", BUILD_CONCURRENCY="4")).start()
                    try:
                        group.reset_peak()
                        images = COLD_IMAGES[:1] if mode.startswith("1 ") else COLD_IMAGES[:16]
                        with ThreadPoolExecutor(len(images)) as pool:
                            statuses = list(pool.map(lambda name: registry.get(
                                f"/v2/{name}/manifests/latest", headers=OCI, timeout=600).status_code, images))
                        served[mode].append(statuses.count(200))
                        results[mode].append(group.peak_bytes())
                    finally:
                        registry.stop()
            finally:
                group.remove()
    for mode, counts in served.items():
        print(f"  {mode}: images served per round: {counts}")
    return results


def slots(rounds: int) -> dict[int, list[tuple[int, float]]]:
    results: dict[int, list[tuple[int, float]]] = {4: [], 16: []}
    for _ in range(rounds):
        for count in results:
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp)
                demo = gated_demo(tmp_path)
                demo.gate.unlink()
                registry = RegistryProcess(tmp_path / "registry", shared_state(
                    tmp_path, demo.path, WORKERS="1", THREADS="16", NIX_TIMEOUT="120",
                    BUILD_CONCURRENCY=str(count))).start()
                try:
                    started = time.monotonic()
                    with ThreadPoolExecutor(16) as pool:
                        statuses = list(pool.map(lambda name: registry.get(
                            f"/v2/{name}/manifests/latest", headers=OCI, timeout=600).status_code, COLD_IMAGES[:16]))
                    results[count].append((statuses.count(200), time.monotonic() - started))
                finally:
                    registry.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--takeover-rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--parts", default="takeover,latency,slots,memory")
    args = parser.parse_args()
    parts = args.parts.split(",")

    for lease in (30, 10) if "takeover" in parts else ():
        times = takeover(lease, args.takeover_rounds)
        print(f"takeover, BUILD_LEASE_SECONDS={lease}: median {statistics.median(times):.1f} s "
              f"(rounds: {', '.join(f'{t:.1f}' for t in times)})")
    for mode, rounds in (warm_latency(args.rounds, args.samples) if "latency" in parts else {}).items():
        print(f"warm manifest GET, {mode}: p50 {statistics.median(r[0] for r in rounds) * 1000:.1f} ms, "
              f"p99 {statistics.median(r[1] for r in rounds) * 1000:.1f} ms (medians of {len(rounds)} rounds)")
    for count, rounds in (slots(max(1, args.rounds // 2)) if "slots" in parts else {}).items():
        print(f"16 cold images at once, {count} build slots: {statistics.median(r[0] for r in rounds):.0f} of 16 "
              f"served, in {statistics.median(r[1] for r in rounds):.1f} s (medians of {len(rounds)} rounds)")
    peaks = memory(max(1, args.rounds // 2)) if "memory" in parts else {}
    for mode, values in peaks.items():
        print(f"instance peak memory, {mode}: {statistics.median(values) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
