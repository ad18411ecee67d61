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

Then `resolution`: the package source is a generated set of nixpkgs' shape (bench/nixpkgs_shaped.py:
tens of thousands of files, a deep import graph, a shared base every package forces) published as a
channel on loopback (`<channel>/git-revision`, a tarball per commit), and per round:
(a) a fresh instance pulls never-seen `hello` (bootstrap, fetch + unpack + evaluate, substitute,
pack + upload), then `coreutils` and `bashinteractive`; (b) another fresh instance is asked for the
manifest of `coreutils/hello`, a new combination of known packages; (c) the warm first instance is
asked for `bashinteractive/hello`. Fetch and unpack are split out of the evaluation by timing the
tarball's download and a bare fetchTarball of it once.

Usage: .venv/bin/python bench/bench_cold_function.py [--rounds 3] [--fetch-files 45000]
       [--resolution-files 40000] [--only-resolution]
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
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import nixpkgs_shaped  # noqa: E402
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
    served = scratch / "served"
    served.mkdir()
    tarball = fake_package_set(served, files)
    server = FileServer(served).start()
    try:
        result = time_fetch(artefact_url, sha256, f"{server.url}/{tarball.name}", scratch / "fetch",
                            "(import (builtins.fetchTarball URL) {}).answer")
    finally:
        server.stop()
    return {"files": files, "tarball_bytes": tarball.stat().st_size, **result,
            "requests": server.count(tarball.name)}


def time_fetch(artefact_url: str, sha256: str, url: str, work: Path, expression: str) -> dict:
    """Evaluate `expression` (URL stands for `url`) twice with the bootstrapped Nix, on a private tmpfs."""
    bin_dir = bootstrap.ensure_nix(Config.from_env({"WORK_DIR": str(work / "nixery"), "NIX_BOOTSTRAP_URL": artefact_url,
                                                    "NIX_BOOTSTRAP_SHA256": sha256}), lambda *a, **k: None)
    mounted = work / "tmpfs"
    mounted.mkdir()
    expression = expression.replace("URL", f'"{url}"')
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
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    lines = [line.split() for line in result.stdout.splitlines()]
    times = [float(end) - float(start) for kind, start, end in (x for x in lines if x[0] == "seconds")]
    used = next(int(x[1]) for x in lines if x[0] == "used")
    inodes = next(int(x[1]) for x in lines if x[0] == "files")
    return {"first": times[0], "second": times[1], "tmpfs_used": used, "inodes": inodes}


# -- resolution: fresh instances and a package set of nixpkgs' shape ---------------------------

CHANNEL = "bench-unstable"
COMMIT = "c0ffee" + "0" * 34


def publish_channel(site: Path, files: int) -> Path:
    """The generated set as a channel under `site`: channels/<CHANNEL>/git-revision, archive/<COMMIT>.tar.gz."""
    (site / "channels" / CHANNEL).mkdir(parents=True)
    (site / "channels" / CHANNEL / "git-revision").write_text(COMMIT + "\n")
    (site / "archive").mkdir()
    tree = nixpkgs_shaped.generate(site / "tree", files=files)
    tarball = site / "archive" / f"{COMMIT}.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=6) as tar:
        tar.add(tree, arcname=f"nixpkgs-{COMMIT[:7]}")
    shutil.rmtree(tree)
    return tarball


def get_manifest(function: CloudFunction, image: str) -> float:
    """Seconds for one manifest GET (what `docker pull` waits for before any layer)."""
    request = urllib.request.Request(f"http://{function.host}/v2/{image}/manifests/latest",
                                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    return time.perf_counter() - started


def built(function: CloudFunction, image: str) -> dict:
    return [e for e in function.events("nix-build") if e.get("image") == image and e.get("result") == "built"][-1]


def resolution_round(i: int, root: Path, scratch: Path, base_env: dict, gcs: GcsEmulator, key_email: str,
                     site: FileServer) -> dict:
    bucket = gcs.client().create_bucket(f"bench-res-{uuid.uuid4().hex[:12]}")
    env = {**base_env, "GCS_BUCKET": bucket.name, "GCS_SIGNING_ACCOUNT": key_email,
           "FIRESTORE_COLLECTION_PREFIX": f"res{i}-{uuid.uuid4().hex[:6]}-"}
    tarballs_before = site.count(".tar.gz")
    row: dict = {}
    first = CloudFunction(scratch / f"res{i}-a", root, env)
    first.start()
    second = None
    try:
        # (a) fresh instance, never-seen package
        row["a_pull"] = pull(first, "hello", scratch / f"res{i}-oci-a")
        [booted] = first.events("nix-bootstrap")
        event = built(first, "hello")
        row.update(a_bootstrap=booted["duration"], a_fetch=event["seconds"].get("fetch", 0.0),
                   a_evaluate=event["seconds"].get("evaluate", 0.0),
                   a_substitute=event["seconds"].get("substitute", 0.0), a_pack=event["seconds"].get("pack", 0.0),
                   a_build=event["duration"], a_tmp=first.tmp_used_bytes())
        row["a_manifest"] = get_manifest(first, "hello")  # cached now: the pull's own manifest GET built it
        for image in ("coreutils", "bashinteractive"):
            pull(first, image, scratch / f"res{i}-oci-{image}")
        row["tarballs_a"] = site.count(".tar.gz") - tarballs_before

        # (b) fresh instance, new combination of known packages
        second = CloudFunction(scratch / f"res{i}-b", root, env)
        second.start()
        before = site.count(".tar.gz")
        row["b_manifest"] = get_manifest(second, "coreutils/hello")
        event = built(second, "coreutils/hello")
        row.update(b_build=event["duration"], b_evaluated=event["evaluated"], b_recorded=event["recorded"],
                   b_substitute=event["seconds"].get("substitute", 0.0), b_pack=event["seconds"].get("pack", 0.0),
                   b_bootstrapped=len(second.events("nix-bootstrap")), b_tmp=second.tmp_used_bytes(),
                   b_tarballs=site.count(".tar.gz") - before)

        # (c) warm instance, new combination of known packages
        before = site.count(".tar.gz")
        row["c_manifest"] = get_manifest(first, "bashinteractive/hello")
        event = built(first, "bashinteractive/hello")
        row.update(c_build=event["duration"], c_evaluated=event["evaluated"], c_recorded=event["recorded"],
                   c_substitute=event["seconds"].get("substitute", 0.0), c_pack=event["seconds"].get("pack", 0.0),
                   c_tmp=first.tmp_used_bytes(), c_tarballs=site.count(".tar.gz") - before)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fetch-files", type=int, default=45000, help="0 skips the fetch measurement")
    parser.add_argument("--resolution-files", type=int, default=40000, help="0 skips the resolution measurement")
    parser.add_argument("--only-resolution", action="store_true", help="skip the other measurements")
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
        if args.resolution_files:
            measure_resolution(args, root, scratch, env, gcs, key.email, artefact_url, sha256)
        if args.only_resolution:
            return
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


def measure_resolution(args, root: Path, scratch: Path, env: dict, gcs: GcsEmulator, key_email: str,
                       artefact_url: str, sha256: str) -> None:
    site_dir = scratch / "site"
    started = time.perf_counter()
    tarball = publish_channel(site_dir, args.resolution_files)
    print(f"package set generated and packed in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    site = FileServer(site_dir).start()
    try:
        url = f"{site.url}/archive/{tarball.name}"
        started = time.perf_counter()
        with urllib.request.urlopen(url) as response:
            while response.read(1 << 20):
                pass
        download = time.perf_counter() - started
        fetch = time_fetch(artefact_url, sha256, url, scratch / "res-fetch", "builtins.fetchTarball URL")
        channel_env = {k: v for k, v in env.items() if k != "NIXERY_PKGS_PATH"}
        channel_env.update(NIXERY_CHANNEL=CHANNEL, NIXPKGS_CHANNELS_URL=f"{site.url}/channels",
                           NIXPKGS_ARCHIVE_URL=f"{site.url}/archive/{{rev}}.tar.gz")
        rows = []
        for i in range(args.rounds):
            row = resolution_round(i, root, scratch, channel_env, gcs, key_email, site)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr)
            rows.append(row)
    finally:
        site.stop()
    print(f"\n## resolution: a {args.resolution_files}-file package set of nixpkgs' shape "
          f"({mib(tarball.stat().st_size)} .tar.gz), {args.rounds} rounds (median, min, max; seconds)\n")
    print(f"download of the tarball alone (loopback): {download:.2f} s; fetchTarball (download + unpack into "
          f"the store, tmpfs): {fetch['first']:.2f} s, tmpfs {mib(fetch['tmpfs_used'])}")
    for key_name in ("a_pull", "a_build", "a_bootstrap", "a_fetch", "a_evaluate", "a_substitute", "a_pack", "a_manifest",
                     "b_manifest", "b_build", "b_substitute", "b_pack", "c_manifest", "c_build", "c_substitute",
                     "c_pack"):
        print(f"{key_name:14} {summary(rows, key_name)}")
    for key_name in ("a_tmp", "b_tmp", "c_tmp"):
        print(f"{key_name:14} {mib(statistics.median(r[key_name] for r in rows))}")
    for key_name in ("tarballs_a", "b_tarballs", "b_evaluated", "b_recorded", "b_bootstrapped", "c_tarballs",
                     "c_evaluated", "c_recorded"):
        print(f"{key_name:14} {[r[key_name] for r in rows]}")


if __name__ == "__main__":
    main()
