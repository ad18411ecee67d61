"""Warm manifest GET throughput: this registry against Debian's docker-registry (distribution 2.8.2).

    .venv/bin/python bench/bench_manifest.py                       # shell/hello, 10 s per run
    .venv/bin/python bench/bench_manifest.py --image hello --duration 5
    .venv/bin/python bench/bench_manifest.py --configs 'default' 'WORKERS=2 THREADS=1'
    .venv/bin/python bench/bench_manifest.py --reference-only      # docker-registry half only
    .venv/bin/python bench/bench_manifest.py --ceiling             # + a constant-returning function
    .venv/bin/python bench/bench_manifest.py --alternate 5 --duration 5   # medians of alternating rounds

Both registries serve the same image in one run: ours builds it on the first pull, skopeo copies
it into docker-registry with --preserve-digests, and both must then answer with byte-identical
manifests. Each measurement is `wrk -c2 -t2` on GET /v2/<name>/manifests/<ref> with an Accept
header listing the OCI and Docker manifest types, by tag and by digest, after warm-up requests.
Our registry runs as Cloud Functions runs it (functions-framework, entry point `registry`), once per
gunicorn configuration given with --configs (WORKERS / THREADS). Any non-2xx answer during a
measurement fails the run. docker-registry is measured first and last; ratios are against the
mean of the two. Target: ours >= 3x docker-registry (by tag, in the configuration terraform deploys:
WORKERS=2 THREADS=8, one worker per vCPU).
wrk and the servers share the machine, so figures are for comparison within one run.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # the environment this bench runs in

ACCEPT = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
TARGET_RATIO = 3.0
# What terraform/function.tf gives functions-framework with its defaults (2 vCPUs, concurrency 16):
# one worker process per vCPU, each with a thread per request the instance may be sent.
DEPLOYED = "WORKERS=2 THREADS=16"
WARMUP_REQUESTS = 50


@dataclass
class Measurement:
    registry: str
    config: str
    ref: str
    requests_per_second: float
    requests: int
    latency_avg: str
    latency_max: str
    rounds: list[int]  # req/s of every round; the figures above are the best round's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/v2/", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    # Each server runs in its own session: signal the group so gunicorn workers go too.
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@contextlib.contextmanager
def reference_registry(state: Path, access_log: bool = False) -> Iterator[str]:
    """Debian's docker-registry on a free loopback port, storing into `state` (logging into
    `state`/docker-registry.log, with a line per request when `access_log`)."""
    port = free_port()
    config = state / "docker-registry.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": not access_log}},
        "storage": {"filesystem": {"rootdirectory": str(state / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    log = state / "docker-registry.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield url
    finally:
        stop(process)


CEILING_SOURCE = """
import json
BODY = json.loads({body!r}).encode()
HEADERS = {{"Content-Type": {content_type!r}, "Docker-Content-Digest": {digest!r}}}

def registry(request):
    return (BODY, 200, HEADERS)
"""


@contextlib.contextmanager
def our_registry(state: Path, extra_env: dict[str, str], source: Path | None = None) -> Iterator[str]:
    """This registry under functions-framework; `state` persists across configurations.

    With `source`, that file's `registry` function is served instead (the framework's ceiling).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NIXERY_", "GCS_", "FIRESTORE_", "STORAGE_", "CACHE_", "WORKERS", "THREADS"))}
    env.update({
        "NIXERY_PKGS_PATH": str(ROOT / "nix" / "demo"),
        "STORAGE_PATH": str(state / "storage"),
        "CACHE_PATH": str(state / "cache.sqlite"),
        "WORK_DIR": str(state / "work"),
    })
    env.update(extra_env)
    log = state / f"registry-{port}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(VENV_BIN / "functions-framework"), "--target=registry", f"--source={source or 'main.py'}",
             "--host=127.0.0.1", f"--port={port}"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield url
    finally:
        stop(process)


def run(*cmd: str, timeout: float = 900) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def copy_image(src: str, dst: str) -> None:
    """skopeo copy between registries/layouts, keeping the manifest bytes (and so the digest)."""
    # --all: an image index comes with every platform's image, so both registries serve the same index.
    run("skopeo", "copy", "--quiet", "--all", "--preserve-digests", "--src-tls-verify=false",
        "--dest-tls-verify=false", src, dst)


def make_small_layout(directory: Path) -> str:
    """A one-file OCI image made with umoci, for measuring docker-registry on its own."""
    layout = directory / "layout"
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:latest")
    content = directory / "content"
    content.mkdir()
    (content / "hello").write_text("hello\n")
    run("umoci", "insert", "--rootless", "--image", f"{layout}:latest", str(content / "hello"), "/hello")
    return f"oci:{layout}:latest"


def get_manifest(url: str, name: str, ref: str) -> tuple[bytes, str]:
    request = urllib.request.Request(f"{url}/v2/{name}/manifests/{ref}", headers={"Accept": ACCEPT})
    with urllib.request.urlopen(request, timeout=600) as response:
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return response.read(), content_type


def check_and_warm(url: str, name: str, ref: str, expected: bytes) -> None:
    """Fails unless the registry answers with the expected manifest; then warms its caches."""
    for _ in range(WARMUP_REQUESTS):
        body, content_type = get_manifest(url, name, ref)
        if body != expected:
            raise RuntimeError(f"{url} served a different manifest for {name}:{ref}")
        if content_type not in MANIFEST_TYPES:
            raise RuntimeError(f"{url} served {name}:{ref} as {content_type!r}")


def wrk(url: str, duration: int, connections: int, threads: int) -> dict[str, str | float | int]:
    out = run("wrk", f"-c{connections}", f"-t{threads}", f"-d{duration}s", "--latency",
              "-H", f"Accept: {ACCEPT}", url, timeout=duration + 60)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if non_2xx or errors:
        raise RuntimeError(f"wrk against {url} saw failures:\n{out}")
    latency = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    return {
        "requests_per_second": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "latency_avg": latency.group(1) if latency else "?",
        "latency_max": latency.group(3) if latency else "?",
    }


def measure(label: str, config: str, url: str, name: str, tag: str, digest: str, manifest: bytes,
            args: argparse.Namespace) -> list[Measurement]:
    """The best of `args.rounds` wrk runs per reference, each run on new connections.

    With two workers, the kernel hands each of wrk's keep-alive connections to whichever gunicorn
    worker accepts first, and often both go to one worker, which then serves alone on one vCPU.
    Each round reconnects, so the best round shows what the configuration can do.
    """
    results = []
    for ref in (tag, digest):
        check_and_warm(url, name, ref, manifest)
        rounds = [wrk(f"{url}/v2/{name}/manifests/{ref}", args.duration, args.connections, args.threads)
                  for _ in range(args.rounds)]
        best = max(rounds, key=lambda figures: figures["requests_per_second"])
        results.append(Measurement(label, config, "tag" if ref == tag else "digest", **best,
                                   rounds=[round(r["requests_per_second"]) for r in rounds]))
        print(f"  {label:16} {config:24} by {results[-1].ref:6} "
              f"{results[-1].requests_per_second:8.0f} req/s  avg {results[-1].latency_avg}  "
              f"rounds {results[-1].rounds}", file=sys.stderr, flush=True)
    return results


def parse_config(text: str) -> dict[str, str]:
    if text == "default":
        return {}
    return dict(item.split("=", 1) for item in text.split())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="shell/hello", help="image name to build and serve")
    parser.add_argument("--tag", default="latest")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per measurement; the best counts")
    parser.add_argument("--configs", nargs="+",
                        default=[DEPLOYED, "default", "WORKERS=2 THREADS=2"],
                        help="gunicorn settings for our registry, e.g. 'WORKERS=2 THREADS=1'")
    parser.add_argument("--reference-only", action="store_true",
                        help="measure docker-registry alone, on a small image made with umoci")
    parser.add_argument("--ceiling", action="store_true",
                        help="also measure a function returning the manifest as a constant")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--alternate", type=int, metavar="ROUNDS",
                        help="instead: ROUNDS alternating rounds of docker-registry then ours (the deployed "
                             "configuration) at 2 and 8 connections, by tag and by digest; medians reported")
    args = parser.parse_args()
    if args.alternate:
        return alternate(args)
    for tool in ("wrk", "skopeo", "docker-registry", "umoci"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: run scripts/install-deps")

    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "ours").mkdir()
        (tmp_path / "reference").mkdir()
        name, tag = args.image, args.tag
        with reference_registry(tmp_path / "reference") as reference:
            if args.reference_only:
                name = "bench/small"
                copy_image(make_small_layout(tmp_path), f"docker://{reference[7:]}/{name}:{tag}")
            else:
                # The first pull builds the image with Nix; the copy then seeds docker-registry.
                with our_registry(tmp_path / "ours", {}) as ours:
                    started = time.monotonic()
                    copy_image(f"docker://{ours[7:]}/{name}:{tag}",
                               f"docker://{reference[7:]}/{name}:{tag}")
                    print(f"built {name}:{tag} and copied it in {time.monotonic() - started:.1f}s",
                          file=sys.stderr)
            manifest, _ = get_manifest(reference, name, tag)
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            # docker-registry is measured before and after ours and the baseline is the mean, so a
            # change in background load during the run shows up instead of skewing the ratio.
            results += measure("docker-registry", "2.8.2 before", reference, name, tag, digest, manifest, args)
            if not args.reference_only:
                ceiling = None
                if args.ceiling:
                    # The same bytes from a function that does nothing else: what functions-framework
                    # and gunicorn cost on their own, the upper bound for any handler.
                    _, content_type = get_manifest(reference, name, tag)
                    ceiling = tmp_path / "ceiling.py"
                    ceiling.write_text(CEILING_SOURCE.format(body=json.dumps(manifest.decode()),
                                                             content_type=content_type, digest=digest))
                for config in args.configs:
                    with our_registry(tmp_path / "ours", parse_config(config)) as ours:
                        results += measure("ours", config, ours, name, tag, digest, manifest, args)
                    if ceiling is not None:
                        with our_registry(tmp_path / "ours", parse_config(config), ceiling) as constant:
                            results += measure("constant function", config, constant, name, tag, digest,
                                               manifest, args)
                results += measure("docker-registry", "2.8.2 after", reference, name, tag, digest, manifest, args)

    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def alternate(args: argparse.Namespace) -> int:
    """Both registries up at once; each round measures docker-registry, then ours, on new connections.

    The ratio of a round is ours / docker-registry in that round; the figure is the median ratio
    over the rounds (and the median rates), never the best round.
    """
    configs = {"ours": parse_config(args.configs[0])}  # the deployed configuration unless --configs says
    rates: dict[tuple[str, int, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-manifest-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "ours").mkdir()
        (tmp_path / "reference").mkdir()
        name, tag = args.image, args.tag
        with reference_registry(tmp_path / "reference") as reference, \
                our_registry(tmp_path / "ours", configs["ours"]) as ours:
            copy_image(f"docker://{ours[7:]}/{name}:{tag}", f"docker://{reference[7:]}/{name}:{tag}")
            manifest, _ = get_manifest(reference, name, tag)
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            for url in (reference, ours):
                for ref in (tag, digest):
                    check_and_warm(url, name, ref, manifest)
            for round_ in range(args.alternate):
                for connections in (2, 8):
                    for ref in (tag, digest):
                        label = "tag" if ref == tag else "digest"
                        for who, url in (("docker-registry", reference), ("ours", ours)):
                            figures = wrk(f"{url}/v2/{name}/manifests/{ref}", args.duration, connections,
                                          args.threads)
                            rates.setdefault((who, connections, label), []).append(figures["requests_per_second"])
                        r = rates[("ours", connections, label)][-1] / rates[("docker-registry", connections, label)][-1]
                        print(f"  round {round_ + 1} -c{connections} by {label:6}: ours "
                              f"{rates[('ours', connections, label)][-1]:7.0f}  docker-registry "
                              f"{rates[('docker-registry', connections, label)][-1]:7.0f} req/s = {r:.2f}x",
                              file=sys.stderr, flush=True)
    config_text = " ".join(f"{k}={v}" for k, v in configs["ours"].items())
    print(f"\n{args.alternate} alternating rounds of wrk -t{args.threads} -d{args.duration}s, ours with {config_text}, "
          f"{os.cpu_count()} CPUs, image {args.image}\n")
    print("| connections | ref | ours req/s (median) | docker-registry req/s (median) | median of round ratios | "
          "round ratios |")
    print("|---:|---|---:|---:|---:|---|")
    for connections in (2, 8):
        for label in ("tag", "digest"):
            ours_r, ref_r = rates[("ours", connections, label)], rates[("docker-registry", connections, label)]
            ratios = [o / r for o, r in zip(ours_r, ref_r)]
            print(f"| {connections} | {label} | {median(ours_r):.0f} | {median(ref_r):.0f} | {median(ratios):.2f}x | "
                  f"{' / '.join(f'{x:.2f}' for x in ratios)} |")
    return 0


def print_table(results: list[Measurement], args: argparse.Namespace) -> None:
    reference: dict[str, list[float]] = {}
    for r in results:
        if r.registry == "docker-registry":
            reference.setdefault(r.ref, []).append(r.requests_per_second)
    baseline = {ref: sum(values) / len(values) for ref, values in reference.items()}
    print(f"\nwrk -c{args.connections} -t{args.threads} -d{args.duration}s, best of {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs, image {args.image if not args.reference_only else 'bench/small'}\n")
    print("| registry | configuration | ref | req/s | vs docker-registry (mean) | avg latency | max latency | rounds |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in results:
        ratio = r.requests_per_second / baseline[r.ref] if baseline.get(r.ref) else 0.0
        print(f"| {r.registry} | {r.config} | {r.ref} | {r.requests_per_second:.0f} | {ratio:.2f}x "
              f"| {r.latency_avg} | {r.latency_max} | {' / '.join(map(str, r.rounds))} |")
    for config, label in ((DEPLOYED, "deployed configuration"), ("default", "functions-framework default")):
        ours = [r for r in results if r.registry == "ours" and r.config == config and r.ref == "tag"]
        if ours and baseline.get("tag"):
            ratio = ours[0].requests_per_second / baseline["tag"]
            verdict = "meets" if ratio >= TARGET_RATIO else "misses"
            print(f"\n{label} ({config}) by tag: {ratio:.2f}x docker-registry ({verdict} the "
                  f"{TARGET_RATIO:.0f}x target)")


if __name__ == "__main__":
    sys.exit(main())
