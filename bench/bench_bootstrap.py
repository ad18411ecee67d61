"""Nix bootstrap on a fresh instance: by store path from a signed binary cache vs a single-file download.

Both serve the same Nix (the machine's `nix` binary, laid out as a static Nix's store
path is: bin/nix plus the command names as links) from a loopback HTTP server:

- file:      NIX_BOOTSTRAP_URL, the binary as one file (as Hydra's download was),
             SHA-256 checked, then copied into place (the path used before);
- cache-xz:  NIX_BOOTSTRAP_STORE_PATH from a signed binary cache made by
             `nix copy --to file://...` (xz, as cache.nixos.org serves nixStatic):
             narinfo fetched, ed25519 signature checked, NAR streamed, decompressed,
             hashed and unpacked;
- cache-zstd: the same with `compression=zstd`.

Each round bootstraps into a fresh WORK_DIR (as a fresh instance does), including the
`nix --version` run that ends every bootstrap, variants alternating within a round.
Reported: median and spread of the wall time over the rounds, and the bytes fetched
over HTTP (as the server counts them).

Usage: .venv/bin/python bench/bench_bootstrap.py [--rounds 9]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder import bootstrap, narinfo  # noqa: E402
from builder.config import Config  # noqa: E402
from tests.fixtures_nixcache import FileServer, make_binary_cache  # noqa: E402


def served_bytes(root: Path, paths: list[str]) -> int:
    return sum((root / p.lstrip("/")).stat().st_size for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-bootstrap-"))
    servers = []
    try:
        variants: dict[str, dict] = {}
        for compression in ("xz", "zstd"):
            root = scratch / f"cache-{compression}"
            public_key, paths = make_binary_cache(root, packages=(), compression=compression)
            server = FileServer(root / "cache").start()
            servers.append(server)
            variants[f"cache-{compression}"] = {
                "server": server, "root": root / "cache",
                "env": {"NIX_BOOTSTRAP_STORE_PATH": paths["nix"], "NIX_SUBSTITUTERS": server.url,
                        "NIX_TRUSTED_PUBLIC_KEYS": public_key},
            }
        single = scratch / "file"
        single.mkdir()
        shutil.copyfile(os.path.realpath(shutil.which("nix")), single / "nix")
        sha256 = hashlib.sha256((single / "nix").read_bytes()).hexdigest()
        server = FileServer(single).start()
        servers.append(server)
        variants = {"file": {"server": server, "root": single,
                             "env": {"NIX_BOOTSTRAP_URL": f"{server.url}/nix", "NIX_BOOTSTRAP_SHA256": sha256}},
                    **variants}

        times: dict[str, list[float]] = {name: [] for name in variants}
        fetched: dict[str, int] = {}
        for round_ in range(args.rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                variant = variants[name]
                work = scratch / f"work-{name}-{round_}"
                config = Config.from_env({"WORK_DIR": str(work), **variant["env"]})
                before = len(variant["server"].requests)
                started = time.perf_counter()
                bootstrap.ensure_nix(config, lambda *a, **k: None)
                times[name].append(time.perf_counter() - started)
                fetched[name] = served_bytes(variant["root"], variant["server"].requests[before:])
                shutil.rmtree(work)

        nar_size = narinfo.parse(next((variants["cache-xz"]["root"]).glob("*.narinfo")).read_text()).nar_size
        print(f"payload: Nix binary {os.path.getsize(single / 'nix')} bytes (NAR {nar_size} bytes); "
              f"{args.rounds} rounds, alternating")
        print(f"{'variant':<11} {'median ms':>10} {'min..max ms':>16} {'bytes fetched':>14} {'vs file':>8}")
        base = statistics.median(times["file"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<11} {median * 1000:10.1f} {min(values) * 1000:7.1f}..{max(values) * 1000:<7.1f} "
                  f"{fetched[name]:14d} {median / base:7.2f}x")
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
