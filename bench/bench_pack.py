"""Packing throughput and memory, against `tar -c | sha256sum` of the same paths.

    .venv/bin/python bench/bench_pack.py                      # generated ~1 GB store tree
    .venv/bin/python bench/bench_pack.py --size-mb 256
    .venv/bin/python bench/bench_pack.py --demo benchGiant       # builds nix/demo's ~1 GiB closure
    .venv/bin/python bench/bench_pack.py --store-root / --paths $(nix-store -qR RESULT)

Every measurement runs in a child process on a warm page cache; the child
reports its own peak RSS (VmHWM). Targets: gzip >= 0.5x and uncompressed
>= 0.8x the tar|sha256sum floor, peak RSS < 150 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from builder import archive

class Discard:
    # An upload that throws the bytes away: the benchmark measures packing, not storage.
    def write(self, data):
        return len(data)

args = json.loads(sys.argv[1])
started = time.perf_counter()
blob = archive.pack_store_paths(args["paths"], Discard(), args["compression"], args["store_root"])
seconds = time.perf_counter() - started
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "size": blob.size, "vmhwm_kb": hwm, "digest": blob.digest}}))
"""


def generate_store(root: str, total_mb: int, seed: int = 1) -> list[str]:
    """A fake closure: ~40 store paths of mixed small and big files, half random, half text-like."""
    rng = random.Random(seed)
    paths = []
    budget = total_mb << 20
    text = b"".join(b"%d: the quick brown fox jumps over the lazy dog %x\n" % (i, i * 7919) for i in range(2000))
    index = 0
    while budget > 0:
        name = f"/nix/store/{rng.getrandbits(128):032x}-bench-{index}"
        disk = os.path.join(root, name.lstrip("/"))
        os.makedirs(os.path.join(disk, "lib"))
        os.makedirs(os.path.join(disk, "share", "doc"))
        for j in range(rng.randint(20, 200)):  # small files
            size = rng.randint(100, 64 << 10)
            with open(os.path.join(disk, "share", "doc", f"f{j}.txt"), "wb") as f:
                f.write((text * (size // len(text) + 1))[:size])
        big = min(budget, rng.choice([1, 5, 20, 60]) << 20)
        with open(os.path.join(disk, "lib", "libbig.so"), "wb") as f:
            left = big
            while left > 0:
                chunk = min(left, 1 << 20)
                # Half random, half text: gzip has work to do but cannot skip it.
                f.write(os.urandom(chunk // 2) + (text * 20)[: chunk - chunk // 2])
                left -= chunk
        os.symlink("libbig.so", os.path.join(disk, "lib", "libbig.so.1"))
        for dirpath, dirnames, filenames in os.walk(disk):
            for fn in filenames:
                os.chmod(os.path.join(dirpath, fn), 0o444)
        budget -= big + 2_000_000
        paths.append(name)
        index += 1
    return paths


NIX_CONFIG = "build-users-group =\nsubstituters =\nsandbox = false\nbuild-poll-interval = 1"


def build_demo(attr: str, store: str) -> list[str]:
    """Build a demo package into a chroot store (kept for the next run); its runtime closure."""
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG}
    link = os.path.join(os.path.dirname(store.rstrip("/")), f"result-{attr}")
    subprocess.run(["nix-build", os.path.join(ROOT, "nix", "demo"), "-A", attr, "--store", store,
                    "--out-link", link], check=True, env=env, stdout=subprocess.DEVNULL)
    out = os.readlink(link)
    closure = subprocess.run(["nix-store", "--store", store, "-qR", out], check=True, env=env,
                             capture_output=True, text=True).stdout.split()
    return sorted(closure)


def tree_bytes(store_root: str, paths: list[str]) -> int:
    total = 0
    for path in paths:
        for dirpath, _, filenames in os.walk(os.path.join(store_root, path.lstrip("/"))):
            for fn in filenames:
                full = os.path.join(dirpath, fn)
                if not os.path.islink(full):
                    total += os.path.getsize(full)
    return total


def baseline(store_root: str, paths: list[str]) -> float:
    members = " ".join(p.lstrip("/") for p in paths)
    started = time.perf_counter()
    subprocess.run(f"tar -c -C {store_root} {members} | sha256sum > /dev/null", shell=True, check=True)
    return time.perf_counter() - started


def pack(store_root: str, paths: list[str], compression: str) -> dict:
    arg = json.dumps({"paths": paths, "compression": compression, "store_root": store_root})
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), arg], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--store-root", default=None)
    parser.add_argument("--paths", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--demo", metavar="ATTR", help="pack the closure of a nix/demo attribute")
    parser.add_argument("--nix-store", default="/tmp/bench-pack-nix/store",
                        help="chroot store for --demo (files under STORE/nix/store)")
    args = parser.parse_args()

    tmp = None
    if args.demo:
        store_root, paths = args.nix_store, build_demo(args.demo, args.nix_store)
    elif args.paths:
        store_root, paths = args.store_root or "/", sorted(args.paths)
    else:
        tmp = tempfile.mkdtemp(prefix="bench-pack-")
        store_root = tmp
        paths = generate_store(tmp, args.size_mb)
    try:
        size = tree_bytes(store_root, paths)
        print(f"{len(paths)} store paths, {size / 1e6:.0f} MB of file data")
        baseline(store_root, paths)  # warm the page cache
        results: dict[str, list[float]] = {"tar|sha256sum": [], "none": [], "gzip": []}
        hwm = {"none": 0, "gzip": 0}
        ratio = {}
        for _ in range(args.rounds):
            results["tar|sha256sum"].append(size / baseline(store_root, paths) / 1e6)
            for compression in ("none", "gzip"):
                r = pack(store_root, paths, compression)
                results[compression].append(size / r["seconds"] / 1e6)
                hwm[compression] = max(hwm[compression], r["vmhwm_kb"])
                if compression == "gzip":
                    ratio["gzip"] = r["size"] / size
        best = {k: max(v) for k, v in results.items()}
        floor = best["tar|sha256sum"]
        print(f"tar -c | sha256sum : {floor:7.0f} MB/s (best of {args.rounds})")
        for compression, target in (("none", 0.8), ("gzip", 0.5)):
            rel = best[compression] / floor
            print(f"pack {compression:<13}: {best[compression]:7.0f} MB/s = {rel:.2f}x floor "
                  f"(target >= {target}x: {'ok' if rel >= target else 'MISSED'}), "
                  f"peak RSS {hwm[compression] / 1024:.0f} MB (target < 150: "
                  f"{'ok' if hwm[compression] < 150 * 1024 else 'MISSED'})")
        print(f"gzip output is {ratio['gzip']:.2f} of the input size")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
