"""Cold start on the function: what the first build on a fresh instance costs, and what /tmp holds.

Each round starts fresh function instances exactly as tests/test_production_like.py
does (functions-framework as nobody, read-only source, a private tmpfs at /tmp,
terraform's environment; fake-gcs-server, the Firestore emulator, the Nix artefact
and a signed binary cache on loopback), each round with its own bucket and
Firestore collections, and measures:

- start:      process start until /v2/ answers (no Nix involved)
- pull-cold:  `skopeo copy` of `hello` on the fresh instance: bootstrap + evaluate +
              substitute + pack + upload + the pull itself
- bootstrap / download / unpack: from the `nix-bootstrap` event
- substitute: evaluate + substitute, from the `nix-build` event (its nix_seconds
              minus the bootstrap, which happens inside the first build)
- pack:       the rest of the build (layers packed and uploaded, manifests)
- big:        a second image on the same (now warm) instance, `bigpackage`
              (50 MiB incompressible): substitution and packing at size
- tmp:        bytes used in the instance's /tmp after each step (tmpfs = memory)
- pull-fresh: `skopeo copy` of `hello` on another fresh instance: served from
              Firestore and GCS, no Nix

Then `fetch`: the bootstrapped Nix fetches a nixpkgs-sized package-set tarball
(generated: many small .nix files) from loopback HTTP with fetchTarball into a
chroot store on a private tmpfs (TMPDIR on it too, as on the function), twice: the
first downloads and unpacks it, the second is answered by Nix's fetch cache.

Usage: .venv/bin/python bench/bench_cold_function.py [--rounds 3] [--fetch-files 45000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder import bootstrap  # noqa: E402
from builder.config import Config  # noqa: E402
from tests.fixtures_firestore import FirestoreEmulator, find_emulator_jar  # noqa: E402
from tests.fixtures_gcs import GcsEmulator, find_emulator_binary, free_port, write_service_account_key  # noqa: E402
from tests.fixtures_nixcache import (  # noqa: E402
    CACHED_PACKAGES, CloudFunction, FileServer, function_root, make_binary_cache, make_function_source,
    make_nix_artefact, terraform_environment,
)


def pull(function: CloudFunction, image: str, layout: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{function.host}/{image}", f"oci:{layout}:latest"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pull of {image} failed: {result.stderr}\n{function.log_path.read_text()[-3000:]}")
    return time.perf_counter() - started


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def summary(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{statistics.median(values):.3f}" + (f" (min {min(values):.3f}, max {max(values):.3f})" if len(values) > 1 else "")


def one_round(i: int, root: Path, scratch: Path, base_env: dict, gcs: GcsEmulator, key_email: str) -> dict:
    bucket = gcs.client().create_bucket(f"bench-cold-{uuid.uuid4().hex[:12]}")
    env = {**base_env, "GCS_BUCKET": bucket.name, "GCS_SIGNING_ACCOUNT": key_email,
           "FIRESTORE_COLLECTION_PREFIX": f"bench{i}-{uuid.uuid4().hex[:6]}-"}
    row: dict = {}
    first = CloudFunction(scratch / f"r{i}-a", root, env)
    started = time.perf_counter()
    first.start()
    row["start"] = time.perf_counter() - started
    row["tmp_idle"] = first.tmp_used_bytes()
    try:
        row["pull_cold"] = pull(first, "hello", scratch / f"r{i}-oci-a")
        [booted] = first.events("nix-bootstrap")
        [built] = first.events("nix-build")
        row.update(bootstrap=booted["duration"], download=booted["download_seconds"],
                   unpack=booted["unpack_seconds"], artefact_bytes=booted["artefact_bytes"],
                   unpacked_bytes=booted["unpacked_bytes"], build=built["duration"], nix=built["nix_seconds"])
        # The build's Nix time includes the bootstrap: it happens when the build first asks for Nix.
        row["substitute"] = built["nix_seconds"] - booted["duration"]
        row["pack"] = built["duration"] - built["nix_seconds"]
        row["tmp_after_hello"] = first.tmp_used_bytes()
        row["pull_big"] = pull(first, "bigpackage", scratch / f"r{i}-oci-big")
        big = [e for e in first.events("nix-build") if e.get("result") == "built"][-1]
        row.update(big_build=big["duration"], big_nix=big["nix_seconds"], big_pack=big["duration"] - big["nix_seconds"])
        row["tmp_after_big"] = first.tmp_used_bytes()
        tmp = first.tmp()
        row["tmp_store"] = int(subprocess.run(["du", "-sb", str(tmp / "nix")], capture_output=True, text=True)
                               .stdout.split()[0])
    finally:
        first.stop()
    second = CloudFunction(scratch / f"r{i}-b", root, env)
    second.start()
    try:
        row["pull_fresh"] = pull(second, "hello", scratch / f"r{i}-oci-b")
        assert not second.events("nix-bootstrap") and not second.events("nix-build"), "fresh instance ran Nix"
        row["tmp_fresh"] = second.tmp_used_bytes()
    finally:
        second.stop()
    return row


def fake_package_set(folder: Path, files: int, seed: int = 1) -> Path:
    """A tarball shaped like nixpkgs: `files` small .nix files in nested folders, plus a default.nix."""
    rng = random.Random(seed)
    words = ("stdenv mkDerivation pname version src fetchurl sha256 buildInputs nativeBuildInputs meta "
             "description homepage license maintainers platforms lib optional callPackage inherit let in "
             "with rec configureFlags installPhase patches postPatch makeFlags doCheck").split()
    tree = folder / "nixpkgs"
    for n in range(files):
        path = tree / "pkgs" / f"{n % 97:02d}" / f"{n % 1009:04d}" / f"p{n}.nix"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = " ".join(rng.choice(words) for _ in range(rng.randint(150, 900)))
        path.write_text(f"# package {n}\n{{ {body} }}\n")
    (tree / "default.nix").write_text("{ ... }: { answer = 42; }\n")
    tarball = folder / "nixpkgs.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=6) as tar:
        tar.add(tree, arcname="nixpkgs")
    shutil.rmtree(tree)
    return tarball


def measure_fetch(artefact_url: str, sha256: str, files: int, scratch: Path) -> dict:
    """Two fetchTarball evaluations into a chroot store on a private tmpfs (memory, as on the function)."""
    work = scratch / "fetch"
    bin_dir = bootstrap.ensure_nix(Config.from_env({"WORK_DIR": str(work / "nixery"), "NIX_BOOTSTRAP_URL": artefact_url,
                                                    "NIX_BOOTSTRAP_SHA256": sha256}), lambda *a, **k: None)
    served = scratch / "served"
    served.mkdir()
    tarball = fake_package_set(served, files)
    server = FileServer(served).start()
    mounted = work / "tmpfs"
    mounted.mkdir()
    expression = f'(import (builtins.fetchTarball "{server.url}/{tarball.name}") {{}}).answer'
    evaluate = " ".join(shlex.quote(a) for a in [
        os.path.join(bin_dir, "nix-instantiate"), "--eval", "--read-write-mode", "--option", "store",
        str(mounted / "nix"), "--option", "substituters", "", "-E", expression])
    script = f"""
        mount -t tmpfs -o size=8g tmpfs {shlex.quote(str(mounted))} || exit 1
        # Nix unpacks in TMPDIR, then moves into the store: on the function both are /tmp.
        mkdir {shlex.quote(str(mounted / "tmp"))} && export TMPDIR={shlex.quote(str(mounted / "tmp"))}
        for i in 1 2; do
            start=$(date +%s.%N); {evaluate} >/dev/null || exit 1; echo "seconds $start $(date +%s.%N)"
        done
        echo "used $(df -B1 --output=used {shlex.quote(str(mounted))} | tail -1)"
        echo "files $(find {shlex.quote(str(mounted))} | wc -l)"
    """
    try:
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                                capture_output=True, text=True)
    finally:
        server.stop()
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    lines = [line.split() for line in result.stdout.splitlines()]
    times = [float(end) - float(start) for kind, start, end in (x for x in lines if x[0] == "seconds")]
    used = next(int(x[1]) for x in lines if x[0] == "used")
    inodes = next(int(x[1]) for x in lines if x[0] == "files")
    return {"files": files, "tarball_bytes": tarball.stat().st_size, "first": times[0], "second": times[1],
            "tmpfs_used": used, "inodes": inodes, "requests": server.count(tarball.name)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fetch-files", type=int, default=45000, help="0 skips the fetch measurement")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    root = function_root()
    gcs = GcsEmulator(binary=find_emulator_binary(), port=free_port())
    firestore = FirestoreEmulator(jar=find_emulator_jar(), port=free_port())
    servers: list[FileServer] = []
    try:
        make_function_source(root)
        gcs.start()
        firestore.start()
        key = write_service_account_key(root / "secrets" / "key.json")
        key.path.chmod(0o444)

        (scratch / "artefact").mkdir()
        artefact = scratch / "artefact" / "nix.tar.xz"
        sha256 = make_nix_artefact(artefact)
        servers.append(FileServer(scratch / "artefact").start())
        artefact_url = f"{servers[0].url}/{artefact.name}"

        t = time.perf_counter()
        public_key, _ = make_binary_cache(scratch / "cache-build", CACHED_PACKAGES + ("bigPackage",))
        print(f"binary cache made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        servers.append(FileServer(scratch / "cache-build" / "cache").start())

        env = terraform_environment()
        env.update({
            "GOOGLE_APPLICATION_CREDENTIALS": str(key.path), **gcs.env(), **firestore.env(),
            "FIRESTORE_DATABASE": "(default)", "NIX_BOOTSTRAP_URL": artefact_url, "NIX_BOOTSTRAP_SHA256": sha256,
            "NIX_SUBSTITUTERS": servers[1].url, "NIX_TRUSTED_PUBLIC_KEYS": public_key,
            "NIXERY_PKGS_PATH": str(root / "source" / "nix" / "demo"),
        })
        rows = []
        for i in range(args.rounds):
            row = one_round(i, root, scratch, env, gcs, key.email)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr)
            rows.append(row)

        print(f"\n## cold function, {args.rounds} rounds (median, min, max; seconds)\n")
        for key_name in ("start", "pull_cold", "bootstrap", "download", "unpack", "substitute", "pack", "build",
                         "pull_big", "big_nix", "big_pack", "pull_fresh"):
            print(f"{key_name:12} {summary(rows, key_name)}")
        last = rows[-1]
        print(f"\nartefact {mib(last['artefact_bytes'])}, unpacked {mib(last['unpacked_bytes'])}")
        for key_name in ("tmp_idle", "tmp_after_hello", "tmp_after_big", "tmp_store", "tmp_fresh"):
            print(f"{key_name:16} {mib(statistics.median(r[key_name] for r in rows))}")

        if args.fetch_files:
            fetch = measure_fetch(artefact_url, sha256, args.fetch_files, scratch)
            print(f"\nfetchTarball of a {fetch['files']}-file package set ({mib(fetch['tarball_bytes'])} .tar.gz): "
                  f"first {fetch['first']:.2f} s, again {fetch['second']:.2f} s ({fetch['requests']} download); "
                  f"tmpfs used {mib(fetch['tmpfs_used'])} for {fetch['inodes']} store files and folders")
    finally:
        for server in servers:
            server.stop()
        gcs.stop()
        firestore.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
