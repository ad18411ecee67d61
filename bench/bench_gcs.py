"""Upload throughput of the GCS backend's Upload against plain google-cloud-storage uploads.

Runs fake-gcs-server (in memory) on loopback and uploads the same random bytes
several ways, alternating rounds so drift hits all alike:

- raw:     Blob.upload_from_file of an in-memory buffer (the library's defaults)
- raw:chunked: the same with the Upload's chunk size (the same number of requests)
- spool:   write to a temporary file, then upload_from_file (the alternative design)
- upload:  builder.storage.gcs Upload, fed in 1 MiB writes, committed (probe, finalize,
           check, copy to the final key, delete the temporary object)
- upload:commit / upload:stream: the Upload's time split at commit()
- skip:    the same Upload again for a blob already stored (the MD5 check's fast path)

Usage: .venv/bin/python bench/bench_gcs.py [--mb 200] [--rounds 3] [--chunk-mb 16]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.storage.gcs import GcsStorage, blob_key  # noqa: E402
from tests.fixtures_gcs import GcsEmulator, find_emulator_binary, free_port  # noqa: E402

PIECE = 1 << 20
MEDIA = "application/vnd.oci.image.layer.v1.tar"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-mb", type=int, default=16)
    args = parser.parse_args()

    data = os.urandom(args.mb << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    md5 = hashlib.md5(data).hexdigest()
    view = memoryview(data)

    emulator = GcsEmulator(binary=find_emulator_binary(), port=free_port())
    emulator.start()
    try:
        client = emulator.client()
        bucket = client.create_bucket("bench")
        storage = GcsStorage(bucket, public=True, endpoint=emulator.url, chunk_size=args.chunk_mb << 20)

        def raw() -> None:
            bucket.blob("raw/" + uuid.uuid4().hex).upload_from_file(io.BytesIO(data), size=len(data))

        def raw_chunked() -> None:
            blob = bucket.blob("raw/" + uuid.uuid4().hex, chunk_size=args.chunk_mb << 20)
            blob.upload_from_file(io.BytesIO(data), size=len(data))

        def spool() -> None:
            with tempfile.TemporaryFile() as f:
                for i in range(0, len(data), PIECE):
                    f.write(view[i:i + PIECE])
                f.seek(0)
                bucket.blob("spool/" + uuid.uuid4().hex).upload_from_file(f, size=len(data), checksum="md5")

        def ours() -> None:
            with storage.upload() as up:
                for i in range(0, len(data), PIECE):
                    up.write(view[i:i + PIECE].tobytes())
                times["upload:commit"].append(timed(lambda: up.commit(digest, md5, len(data), MEDIA)))
            assert bucket.get_blob(blob_key(digest)).size == len(data)

        def skip() -> None:
            with storage.upload() as up:
                for i in range(0, len(data), PIECE):
                    up.write(view[i:i + PIECE].tobytes())
                assert up.commit(digest, md5, len(data), MEDIA) is False

        def clean() -> None:
            for blob in client.list_blobs("bench"):
                if blob.name != blob_key(digest):
                    blob.delete()

        times: dict[str, list[float]] = {"raw": [], "raw:chunked": [], "spool": [], "upload": [], "upload:commit": [], "skip": []}
        for _ in range(args.rounds):
            times["raw"].append(timed(raw))
            clean()
            times["raw:chunked"].append(timed(raw_chunked))
            clean()
            times["spool"].append(timed(spool))
            clean()
            bucket.blob(blob_key(digest)).delete() if bucket.get_blob(blob_key(digest)) else None
            times["upload"].append(timed(ours))
            times["skip"].append(timed(skip))
            clean()
    finally:
        emulator.stop()

    mb = len(data) / 1e6
    print(f"{args.mb} MiB, {args.rounds} rounds, Upload chunk {args.chunk_mb} MiB; median s, MB/s:")
    times["upload:stream"] = [u - c for u, c in zip(times["upload"], times["upload:commit"])]
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, t in medians.items():
        print(f"  {name:13s} {t:6.2f} s  {mb / t:7.1f} MB/s   (all: {', '.join(f'{x:.2f}' for x in times[name])})")
    print(f"  ratio upload/raw throughput: {medians['raw'] / medians['upload']:.2f}"
          f" (streaming phase alone: {medians['raw'] / medians['upload:stream']:.2f};"
          f" against raw:chunked: {medians['raw:chunked'] / medians['upload']:.2f})")


if __name__ == "__main__":
    main()
