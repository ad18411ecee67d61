"""Packing throughput and memory, against `tar -c | sha256sum` of the same paths.

    .venv/bin/python bench/bench_pack.py                      # generated ~1 GB store tree
    .venv/bin/python bench/bench_pack.py --size-mb 256
    .venv/bin/python bench/bench_pack.py --demo benchGiant       # builds nix/demo's ~1 GiB closure
    .venv/bin/python bench/bench_pack.py --store-root / --paths $(nix-store -qR RESULT)

Every measurement runs in a child process on a warm page cache; the child
reports its own peak RSS (VmHWM). Rounds alternate between the modes and the
figures are medians. Modes:

- `tar|sha256sum`: the floor a user compares with;
- `one layer` (gzip, zstd, none): the whole closure as one layer, compressed on
  one thread per CPU (archive.pack_store_paths with threads=CPUs);
- `layers, serial`: one layer per store path, packed one after another on one
  compression thread each (PACK_WORKERS=1 on a one-CPU machine);
- `layers, before` (with `--before REV`): the same layers packed one after another
  by builder/archive.py as it was at git revision REV (compression inline, in
  the reading thread: how the registry packed before parallel packing);
- `layers, parallel`: the same layers through the build's own code
  (ImageBuilder._store_layer under build.run_biggest_first, PACK_WORKERS=CPUs).

Targets (issue 10): parallel >= 1.7x serial; gzip one layer >= 1.0x the floor;
peak RSS <= 150 MB.
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
import json, os, sys, time
sys.path.insert(0, {root!r})
from builder import archive, build, layers
from builder.cache import LayerRecord
from builder.config import Config

class Discard:
    # An upload that throws the bytes away: the benchmark measures packing, not storage.
    def write(self, data):
        return len(data)
    def commit(self, digest, md5, size, media_type):
        return True
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        pass

class DiscardStorage:
    def upload(self):
        return Discard()
    def put_layer_index(self, name, data):
        pass
    def read_layer_index(self, name):
        return None
    def stat(self, digest):
        return None

class NoCache:
    def get_layer(self, key):
        return None
    def put_layer(self, record):
        pass

class Info:
    def __init__(self, size):
        self.nar_size, self.references = size, ()

args = json.loads(sys.argv[1])
mode, compression, paths, root = args["mode"], args["compression"], args["paths"], args["store_root"]
cpus = len(os.sched_getaffinity(0))
started = time.perf_counter()
if mode == "one":
    blob = archive.pack_store_paths(paths, Discard(), compression, root, threads=cpus)
    size, digest = blob.size, blob.digest
else:
    infos = {{p: Info(args["sizes"][p]) for p in paths}}
    plans = layers.plan_layers(infos, paths, 120, solo_bytes=0)  # every path a layer, as every path is a root
    if mode == "before":
        sys.path.insert(0, args["before_dir"])
        import archive_before
        blobs = [archive_before.pack_store_paths(plan.paths, Discard(), compression, root) for plan in plans]
        size, digest = sum(b.size for b in blobs), [b.digest for b in blobs]
    elif mode == "serial":
        blobs = [archive.pack_store_paths(plan.paths, Discard(), compression, root, threads=1) for plan in plans]
        size, digest = sum(b.size for b in blobs), [b.digest for b in blobs]
    else:
        config = Config(compression=compression, pack_workers=cpus, nix_store=root)
        builder = build.ImageBuilder(config, DiscardStorage(), NoCache(), log=lambda *a, **k: None)
        builder.store_root = root
        stored = build.run_biggest_first([(p.size, lambda p=p: builder._store_layer(p)) for p in plans], cpus)
        size, digest = sum(layer.size for layer, _ in stored), [layer.digest for layer, _ in stored]
seconds = time.perf_counter() - started
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "size": size, "vmhwm_kb": hwm, "digest": digest}}))
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


def pack(store_root: str, paths: list[str], compression: str, mode: str, sizes: dict[str, int],
         before_dir: str | None = None) -> dict:
    arg = json.dumps({"paths": paths, "compression": compression, "store_root": store_root, "mode": mode,
                      "sizes": sizes, "before_dir": before_dir})
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), arg], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--store-root", default=None)
    parser.add_argument("--paths", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--demo", metavar="ATTR", help="pack the closure of a nix/demo attribute")
    parser.add_argument("--nix-store", default="/tmp/bench-pack-nix/store",
                        help="chroot store for --demo (files under STORE/nix/store)")
    parser.add_argument("--compressions", default="gzip,zstd,none")
    parser.add_argument("--before", metavar="REV", help="also pack serially with builder/archive.py at this git revision")
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
    compressions = args.compressions.split(",")
    before_dir = None
    if args.before:
        before_dir = tempfile.mkdtemp(prefix="bench-pack-before-")
        source = subprocess.run(["git", "-C", ROOT, "show", f"{args.before}:builder/archive.py"], check=True,
                                capture_output=True, text=True).stdout
        with open(os.path.join(before_dir, "archive_before.py"), "w") as f:
            f.write(source)
    try:
        sizes = {p: tree_bytes(store_root, [p]) for p in paths}
        size = sum(sizes.values())
        print(f"{len(paths)} store paths, {size / 1e6:.0f} MB of file data, {len(os.sched_getaffinity(0))} CPUs")
        baseline(store_root, paths)  # warm the page cache
        modes = [("one", c) for c in compressions] + [("serial", "gzip"), ("parallel", "gzip")]
        if before_dir:
            modes.append(("before", "gzip"))
        rates: dict[str, list[float]] = {"floor": []}
        hwm: dict[str, int] = {}
        out_size: dict[str, int] = {}
        digests: dict[str, object] = {}
        for _ in range(args.rounds):
            rates["floor"].append(size / baseline(store_root, paths) / 1e6)
            for mode, compression in modes:
                name = f"{mode} {compression}"
                r = pack(store_root, paths, compression, mode, sizes, before_dir)
                rates.setdefault(name, []).append(size / r["seconds"] / 1e6)
                hwm[name] = max(hwm.get(name, 0), r["vmhwm_kb"])
                out_size[name] = r["size"]
                if digests.setdefault(name, r["digest"]) != r["digest"]:
                    raise SystemExit(f"{name}: the digest changed between rounds")
        if before_dir:
            speedup = median([p / s for p, s in zip(rates["parallel gzip"], rates["before gzip"])])
            print(f"parallel / before (median of per-round ratios): {speedup:.2f}x (target >= 1.7x)")
        if digests["serial gzip"] != digests["parallel gzip"]:
            raise SystemExit("parallel packing gave other digests than serial packing")
        floor = median(rates["floor"])
        print(f"medians of {args.rounds} alternating rounds")
        print(f"tar -c | sha256sum     : {floor:7.0f} MB/s")
        for name in rates:
            if name == "floor":
                continue
            rate = median(rates[name])
            print(f"{name:<22}: {rate:7.0f} MB/s = {rate / floor:.2f}x floor, output {out_size[name] / size:.3f} "
                  f"of input, peak RSS {hwm[name] / 1024:.0f} MB")
        speedup = median([p / s for p, s in zip(rates["parallel gzip"], rates["serial gzip"])])
        print(f"parallel / serial (median of per-round ratios): {speedup:.2f}x")
        if "one gzip" in rates:
            ratio = median([g / f for g, f in zip(rates["one gzip"], rates["floor"])])
            print(f"one layer gzip / floor (median of per-round ratios): {ratio:.2f}x (target >= 1.0x)")
        print(f"peak RSS, all modes: {max(hwm.values()) / 1024:.0f} MB (target <= 150)")
    finally:
        for folder in (tmp, before_dir):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
