"""Cold image index vs the slowest single-platform build: do platforms really build in parallel?

Every measurement is a cold build from nothing: its own registry process (functions-framework,
empty storage and cache) with its own empty Nix store (a chroot store, NIX_STORE_ROOT), so Nix
builds every derivation of the image, and no other build on the machine holds its store's locks.
Per round, in alternating order, three measurements:

- amd64:  GET /v2/<image>/manifests/latest accepting single manifests only (the amd64 image)
- arm64:  GET /v2/arm64/<image>/manifests/latest
- index:  GET /v2/<image>/manifests/latest accepting an OCI index (both platforms, in parallel)

and the round's ratio index / max(amd64, arm64) (the target: at most 1.3), and index /
(amd64 + arm64), what building the platforms one after the other would cost. Reported: the
medians of the rounds' ratios and times (the machine is shared and noisy), with min and max.

Usage: .venv/bin/python bench/bench_platforms.py [--rounds 5] [--image shell/hello]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.manifest import OCI_INDEX, OCI_MANIFEST  # noqa: E402
from tests.registry_process import RegistryProcess  # noqa: E402

def cold_request(root: Path, path: str, accept: str) -> float:
    state = root / f"registry-{uuid.uuid4().hex[:8]}"
    registry = RegistryProcess(state, {"NIX_STORE_ROOT": str(state / "nix"), "NIX_TIMEOUT": "600"}).start()
    try:
        started = time.perf_counter()
        response = registry.get(path, headers={"Accept": accept}, timeout=900)
        elapsed = time.perf_counter() - started
        if response.status_code != 200 or response.headers["Content-Type"] != accept:
            raise RuntimeError(f"{path}: {response.status_code} {response.text[:500]}")
        if accept == OCI_INDEX and len(response.json()["manifests"]) != 2:
            raise RuntimeError(f"{path}: the index lacks a platform: {response.text[:500]}")
        return elapsed
    finally:
        registry.stop()
        builds = [(b["image"], b["result"], b["duration"]) for b in registry.builds()]
        print(f"    {path} ({accept.rsplit('.', 2)[-2]}): {elapsed:.2f} s, builds {json.dumps(builds)}", flush=True)
        shutil.rmtree(state, ignore_errors=True)


def describe(values: list[float], unit: str = "s") -> str:
    return f"{statistics.median(values):.2f} {unit} (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image", default="shell/hello")
    args = parser.parse_args()
    kinds = {
        "amd64": (f"/v2/{args.image}/manifests/latest", OCI_MANIFEST),
        "arm64": (f"/v2/arm64/{args.image}/manifests/latest", OCI_MANIFEST),
        "index": (f"/v2/{args.image}/manifests/latest", OCI_INDEX),
    }
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    ratios: list[float] = []
    serial: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-platforms-") as scratch:
        root = Path(scratch)
        for i in range(args.rounds):
            order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
            measured = {kind: cold_request(root, *kinds[kind]) for kind in order}
            measured = {kind: measured[kind] for kind in kinds}
            for kind, seconds in measured.items():
                times[kind].append(seconds)
            ratios.append(measured["index"] / max(measured["amd64"], measured["arm64"]))
            serial.append(measured["index"] / (measured["amd64"] + measured["arm64"]))
            print(f"round {i + 1}: " + ", ".join(f"{k} {measured[k]:.2f} s" for k in kinds)
                  + f", index / slowest platform {ratios[-1]:.2f}", flush=True)
    print(f"\n{args.image}, {args.rounds} rounds, cold (fresh derivations, storage and cache each time):")
    for kind in kinds:
        print(f"  {kind:6} {describe(times[kind])}")
    print(f"  index / slowest single platform: {describe(ratios, 'x')}")
    print(f"  index / both platforms one after the other: {describe(serial, 'x')}")


if __name__ == "__main__":
    main()
