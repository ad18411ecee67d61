"""Whole pulls: `skopeo copy` of a six-package image, through this registry and through docker-registry.

    .venv/bin/python bench/bench_pull.py                        # shell/hello/goodbye, 3 cold, 5 warm rounds
    .venv/bin/python bench/bench_pull.py --image shell/hello/goodbye --cold 3 --warm 5

Every pull copies into an empty OCI layout (a client with nothing cached), so every blob is
fetched. Cold: a registry with empty storage and cache (ours builds and packs the image inside the
manifest request; the Nix store is warm, as on an instance that built before). Warm: the image is
built. docker-registry (distribution 2.8.2) holds the same image, copied from ours with its digests,
and is pulled in the same rounds, alternating with ours. Request counts come from the registries'
own logs (ours: its `request` events; docker-registry: its access log). Figures are medians.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_manifest import DEPLOYED, copy_image, median, our_registry, parse_config, reference_registry  # noqa: E402


def pull(url: str, image: str, destination: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{url[7:]}/{image}:latest",
                    f"oci:{destination}:latest"], check=True, capture_output=True, timeout=900)
    return time.perf_counter() - started


def our_requests(state: Path) -> int:
    count = 0
    for log in state.glob("registry-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"request"' in line:
                try:
                    count += json.loads(line).get("event") == "request"
                except ValueError:
                    pass
    return count


def reference_requests(state: Path) -> int:
    text = (state / "docker-registry.log").read_text(errors="replace")
    return len(re.findall(r'"(?:GET|HEAD) /v2/', text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="shell/hello/goodbye")
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--config", default=DEPLOYED, help="gunicorn settings for ours")
    args = parser.parse_args()
    for tool in ("skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run scripts/install-deps")
    times: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}

    def record(label: str, seconds: float, requests: int) -> None:
        times.setdefault(label, []).append(seconds)
        counts.setdefault(label, []).append(requests)
        print(f"  {label:<22} {seconds:6.2f} s  {requests:3d} requests", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "reference").mkdir()
        with reference_registry(tmp_path / "reference", access_log=True) as reference:
            seeded = False
            for round_ in range(args.cold):
                state = tmp_path / f"ours-{round_}"
                state.mkdir()
                with our_registry(state, parse_config(args.config)) as ours:
                    before = our_requests(state)
                    seconds = pull(ours, args.image, tmp_path / f"cold-{round_}")
                    record("ours, cold", seconds, our_requests(state) - before)
                    if not seeded:
                        copy_image(f"docker://{ours[7:]}/{args.image}:latest",
                                   f"docker://{reference[7:]}/{args.image}:latest")
                        seeded = True
                    if round_ == args.cold - 1:
                        for warm in range(args.warm):
                            before = reference_requests(tmp_path / "reference")
                            seconds = pull(reference, args.image, tmp_path / f"ref-{warm}")
                            record("docker-registry", seconds, reference_requests(tmp_path / "reference") - before)
                            before = our_requests(state)
                            seconds = pull(ours, args.image, tmp_path / f"warm-{warm}")
                            record("ours, warm", seconds, our_requests(state) - before)
    print(f"\nskopeo copy of {args.image} into an empty OCI layout; ours with {args.config}; "
          f"{os.cpu_count()} CPUs; medians\n")
    print("| pull | rounds | seconds (median) | requests per pull |")
    print("|---|---:|---:|---:|")
    for label in ("ours, cold", "ours, warm", "docker-registry"):
        print(f"| {label} | {len(times[label])} | {median(times[label]):.2f} | {median(counts[label]):.0f} |")
    ratio = median([r / o for r, o in zip(times["docker-registry"], times["ours, warm"])])
    print(f"\nwarm pull, docker-registry time / ours (median of round ratios): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
