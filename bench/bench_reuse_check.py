"""What the reuse check (`Storage.verify`) costs per layer, on each backend, against the old check.

The old check asked only whether the blob exists (`stat`). Now a recorded layer is reused only
after `verify`: the filesystem hashes the file against its digest once per process (then a
`stat` and a lookup), GCS reads the object's metadata once per reuse. Rounds alternate; figures
are medians over rounds of the per-layer time.

Usage: .venv/bin/python bench/bench_reuse_check.py [--rounds 5] [--gcs-layers 50]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.storage.filesystem import FilesystemStorage  # noqa: E402
from builder.storage.gcs import GcsStorage  # noqa: E402
from tests.fixtures_gcs import GcsEmulator, find_emulator_binary, free_port  # noqa: E402

SIZES = {"64 KiB": 64 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20, "128 MiB": 128 << 20}
PER_SIZE = {"64 KiB": 40, "1 MiB": 20, "16 MiB": 6, "128 MiB": 2}


def store(storage, data: bytes) -> tuple[str, int, str]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    md5 = hashlib.md5(data).hexdigest()
    with storage.upload() as upload:
        upload.write(data)
        upload.commit(digest, md5, len(data), "application/octet-stream")
    return digest, len(data), md5


def per_layer(layers, check) -> float:
    started = time.perf_counter()
    for digest, size, md5 in layers:
        assert check(digest, size, md5)
    return (time.perf_counter() - started) / len(layers)


def filesystem(rounds: int) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as root:
        writer = FilesystemStorage(root)
        writer.check()
        for label, size in SIZES.items():
            layers = [store(writer, os.urandom(size)) for _ in range(PER_SIZE[label])]
            old, first, remembered = [], [], []
            for _ in range(rounds):
                # The old check: does the file exist (one stat)?
                old.append(per_layer(layers, lambda d, s, m: os.stat(writer.blob_path(d)).st_size == s))
                fresh = FilesystemStorage(root)  # a new process: nothing verified yet
                first.append(per_layer(layers, fresh.verify))
                remembered.append(per_layer(layers, fresh.verify))
            old_s, first_s, remembered_s = (statistics.median(x) for x in (old, first, remembered))
            rows.append(f"| filesystem, {label} layer | {old_s * 1e6:.1f} µs | {first_s * 1e3:.2f} ms "
                        f"({size / first_s / 1e6:.0f} MB/s) | {remembered_s * 1e6:.1f} µs "
                        f"({remembered_s / old_s:.1f}x) |")
    return rows


def gcs(rounds: int, count: int) -> list[str]:
    emulator = GcsEmulator(binary=find_emulator_binary(), port=free_port())
    emulator.start()
    try:
        bucket = emulator.client().create_bucket("bench")
        storage = GcsStorage(bucket, public=True, endpoint=emulator.url)
        layers = [store(storage, os.urandom(64 << 10)) for _ in range(count)]
        old, new = [], []
        for _ in range(rounds):
            old.append(per_layer(layers, lambda d, s, m: storage.stat(d) is not None))  # the old check
            new.append(per_layer(layers, storage.verify))
        old_s, new_s = statistics.median(old), statistics.median(new)
        return [f"| fake-gcs-server (one metadata read either way) | {old_s * 1e3:.2f} ms | {new_s * 1e3:.2f} ms "
                f"({new_s / old_s:.2f}x) | (not remembered: every reuse reads) |"]
    finally:
        emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gcs-layers", type=int, default=50)
    args = parser.parse_args()
    print("| backend | old check (exists) | verify, first in a process | verify, remembered |")
    print("|---|---:|---:|---:|")
    for row in filesystem(args.rounds) + gcs(args.rounds, args.gcs_layers):
        print(row, flush=True)


if __name__ == "__main__":
    main()
