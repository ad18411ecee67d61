"""Cold image index vs the slowest single-platform build: do platforms really build in parallel?

Every measurement is a cold build from nothing: its own registry process (functions-framework,
empty storage and cache) on its own copy of the demo package set with a unique salt in every
builder, so Nix has built none of its derivations before (nothing shared with earlier
measurements but the busybox source). Per round, in alternating order, three measurements:

- amd64:  GET /v2/<image>/manifests/latest accepting single manifests only (the amd64 image)
- arm64:  GET /v2/arm64/<image>/manifests/latest
- index:  GET /v2/<image>/manifests/latest accepting an OCI index (both platforms, in parallel)

and the round's ratio index / max(amd64, arm64). Reported: the median of the rounds' ratios
and of each time (the machine is shared and noisy), with min and max.

Usage: .venv/bin/python bench/bench_platforms.py [--rounds 5] [--image shell/hello]
"""
from __future__ import annotations

import argparse
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

DEMO = Path(__file__).resolve().parent.parent / "nix" / "demo"
ANCHOR = 'export PATH="$TMPDIR/.bin"'


def salted_demo(root: Path) -> Path:
    """A copy of the demo set whose every derivation is new to the Nix store."""
    copy = root / f"demo-{uuid.uuid4().hex[:8]}"
    shutil.copytree(DEMO, copy)
    default = copy / "default.nix"
    text = default.read_text()
    assert ANCHOR in text, "the demo set's builder preamble changed"
    default.write_text(text.replace(ANCHOR, f"{ANCHOR}; BENCH_SALT_{uuid.uuid4().hex}=1", 1))
    return copy


def cold_request(root: Path, path: str, accept: str) -> float:
    state = root / f"registry-{uuid.uuid4().hex[:8]}"
    registry = RegistryProcess(state, {"NIXERY_PKGS_PATH": str(salted_demo(root)), "NIX_TIMEOUT": "600"}).start()
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
    with tempfile.TemporaryDirectory(prefix="bench-platforms-") as scratch:
        root = Path(scratch)
        for i in range(args.rounds):
            order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
            measured = {kind: cold_request(root, *kinds[kind]) for kind in order}
            for kind, seconds in measured.items():
                times[kind].append(seconds)
            ratios.append(measured["index"] / max(measured["amd64"], measured["arm64"]))
            print(f"round {i + 1}: " + ", ".join(f"{k} {measured[k]:.2f} s" for k in kinds)
                  + f", index / slowest platform {ratios[-1]:.2f}", flush=True)
    print(f"\n{args.image}, {args.rounds} rounds, cold (fresh derivations, storage and cache each time):")
    for kind in kinds:
        print(f"  {kind:6} {describe(times[kind])}")
    print(f"  index / slowest single platform: {describe(ratios, 'x')}")


if __name__ == "__main__":
    main()
