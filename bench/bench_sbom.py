"""What the SBOM costs a cold build, and whether two fresh instances build the same digests.

Cold build: `ImageBuilder.image` in this process, with empty storage and cache, on its own copy
of the demo package set salted so that Nix has built none of its derivations (as
bench_platforms.py does). Two variants, alternating per round:

- with:    the registry as it is (packages' meta evaluated, SBOM generated and stored);
- without: image.nix without the meta reading, and no SBOM step (what the build was before).

Reported: the median of the rounds' ratios with / without (and each time), the SBOM step's own
time (its `sbom` log event), the SBOM's bytes against the image's, and the evaluation alone
(image.nix on the already-built set, with / without meta, alternating).

`--scaling`: the SBOM's generation alone for synthetic closures of 100, 300 and 1000 store paths
(5 references each, as nixpkgs' closures have a few), median of 5 runs each.

`--digests`: two registry processes that share nothing (own storage, cache and a copy of the
demo set in another folder) serve one image; its manifest, index and referrer digests are printed.

Usage: .venv/bin/python bench/bench_sbom.py [--rounds 7] [--image shell/hello] [--digests | --scaling]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder import names, nix, sbom  # noqa: E402
from builder.build import ImageBuilder  # noqa: E402
from builder.config import Config, open_cache, open_storage  # noqa: E402
from builder.manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST  # noqa: E402
from tests.registry_process import RegistryProcess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "nix" / "demo"
ANCHOR = 'export PATH="$TMPDIR/.bin"'
META = "    info = packageInfo v;\n"


def salted_demo(root: Path) -> Path:
    copy = root / f"demo-{uuid.uuid4().hex[:8]}"
    shutil.copytree(DEMO, copy)
    default = copy / "default.nix"
    text = default.read_text()
    assert ANCHOR in text, "the demo set's builder preamble changed"
    default.write_text(text.replace(ANCHOR, f"{ANCHOR}; BENCH_SALT_{uuid.uuid4().hex}=1", 1))
    return copy


def image_nix_without_meta(root: Path) -> Path:
    text = nix.IMAGE_NIX.read_text()
    assert META in text, "image.nix no longer reads meta where this benchmark expects"
    path = root / "image-without-meta.nix"
    path.write_text(text.replace(META, "    info = { };\n"))
    return path


class Variant:
    """Switches the build between with and without the SBOM (meta evaluation and SBOM step)."""

    def __init__(self, without_nix: Path):
        self.with_nix, self.without_nix = nix.IMAGE_NIX, without_nix
        self.store_sbom = ImageBuilder._store_sbom

    def use(self, sbom: bool) -> None:
        nix.IMAGE_NIX = self.with_nix if sbom else self.without_nix
        ImageBuilder._store_sbom = self.store_sbom if sbom else (lambda *args, **kwargs: [])


def cold_build(root: Path, image: str) -> tuple[float, list[dict], int]:
    """(seconds, sbom events, bytes of the image's blobs) of one cold build."""
    state = root / f"state-{uuid.uuid4().hex[:8]}"
    env = {"NIXERY_PKGS_PATH": str(salted_demo(root)), "STORAGE_PATH": str(state / "storage"),
           "CACHE_PATH": str(state / "cache.sqlite"), "WORK_DIR": str(state / "work"), "NIX_TIMEOUT": "600",
           "PLATFORMS": "linux/amd64"}
    config = Config.from_env(env)
    events: list[dict] = []
    storage = open_storage(config)
    storage.check()  # creates its folders, as at a registry's start
    builder = ImageBuilder(config, storage, open_cache(config),
                           log=lambda name, message, **fields: events.append({"event": name, **fields}))
    request = names.parse_image_name(image, always_include=config.always_include, max_packages=config.max_packages,
                                     max_length=config.max_name_length)
    started = time.perf_counter()
    builder.image(request, "latest")
    seconds = time.perf_counter() - started
    stored = sum(p.stat().st_size for p in (state / "storage").rglob("*") if p.is_file())
    shutil.rmtree(state, ignore_errors=True)
    return seconds, [e for e in events if e["event"] == "sbom"], stored


def evaluation_seconds(image_nix: Path, packages: list[str]) -> float:
    args = ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", "--option", "substituters", "",
            "--option", "build-users-group", "", str(image_nix), "--argstr", "packagesJson", json.dumps(packages),
            "--argstr", "sourceJson", json.dumps({"kind": "path", "path": str(DEMO)})]
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - started


def describe(values: list[float], unit: str = "s", digits: int = 3) -> str:
    return f"{statistics.median(values):.{digits}f} {unit} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"


def measure(rounds: int, image: str) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sbom-") as scratch:
        root = Path(scratch)
        variant = Variant(image_nix_without_meta(root))
        times: dict[bool, list[float]] = {True: [], False: []}
        ratios, sbom_seconds, sbom_bytes, stored = [], [], [], {True: [], False: []}
        for i in range(rounds):
            for with_sbom in ((True, False) if i % 2 == 0 else (False, True)):
                variant.use(with_sbom)
                seconds, events, total = cold_build(root, image)
                times[with_sbom].append(seconds)
                stored[with_sbom].append(total)
                if with_sbom:
                    [event] = events
                    sbom_seconds.append(event["duration"])
                    sbom_bytes.append(event["bytes"])
            variant.use(True)
            ratios.append(times[True][-1] / times[False][-1])
            print(f"round {i + 1}: with {times[True][-1]:.2f} s, without {times[False][-1]:.2f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        request = names.parse_image_name(image, always_include=("cacert", "iana-etc"), max_packages=64,
                                         max_length=1024)
        evaluation: dict[bool, list[float]] = {True: [], False: []}
        for i in range(rounds * 3):
            for with_meta in ((True, False) if i % 2 == 0 else (False, True)):
                evaluation[with_meta].append(evaluation_seconds(
                    variant.with_nix if with_meta else variant.without_nix, list(request.packages)))
    print(f"\n{image}, {rounds} rounds, cold builds (fresh derivations, storage and cache each time):")
    print(f"  with SBOM     {describe(times[True])}")
    print(f"  without SBOM  {describe(times[False])}")
    print(f"  with / without: {describe(ratios, 'x')}")
    print(f"  SBOM step (generate + store + record): {describe(sbom_seconds)}")
    print(f"  evaluation alone, with meta {describe(evaluation[True])}, without {describe(evaluation[False])}")
    extra = statistics.median(stored[True]) - statistics.median(stored[False])
    print(f"  SBOM {statistics.median(sbom_bytes):.0f} bytes; stored blobs {statistics.median(stored[True]):.0f} "
          f"with vs {statistics.median(stored[False]):.0f} without (+{extra:.0f} bytes, "
          f"{100 * extra / statistics.median(stored[False]):.2f}%)")


def scaling() -> None:
    import random

    rng = random.Random(1)
    labels = {"org.opencontainers.image.created": "1970-01-01T00:00:01Z", "org.opencontainers.image.title": "x"}
    for count in (100, 300, 1000):
        paths = [f"/nix/store/{i:032d}-package{i}-1.{i}" for i in range(count)]
        closure = nix.Closure(
            roots={f"p{i}": paths[-1 - i] for i in range(5)}, gc_root_dir="",
            paths={p: nix.StorePath(p, 4096, tuple(sorted(rng.sample(paths[:i], min(i, 5)))), "sha256-" + "A" * 43 + "=")
                   for i, p in enumerate(paths)})
        runs, size = [], 0
        for _ in range(5):
            started = time.perf_counter()
            size = len(sbom.generate(closure, "x", labels, "sha256:" + "0" * 64))
            runs.append(time.perf_counter() - started)
        print(f"  {count:5} store paths: {describe(runs)}, {size} bytes")


def digests(image: str) -> None:
    """Two registries that share nothing serve `image`: print what they answer, side by side."""
    seen = []
    with tempfile.TemporaryDirectory(prefix="bench-sbom-digests-") as scratch:
        for n in range(2):
            copy = Path(scratch) / f"elsewhere-{n}" / "demo"
            shutil.copytree(DEMO, copy)
            registry = RegistryProcess(Path(scratch) / f"instance-{n}", {"NIXERY_PKGS_PATH": str(copy)}).start()
            try:
                answers = {}
                for accept in (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST):
                    response = registry.get(f"/v2/{image}/manifests/latest", headers={"Accept": accept}, timeout=900)
                    digest = response.headers["Docker-Content-Digest"]
                    answers[accept] = digest
                    if accept != OCI_INDEX:
                        referrers = registry.get(f"/v2/{image}/referrers/{digest}").json()["manifests"]
                        answers[accept + " SBOM referrer"] = referrers[0]["digest"]
                seen.append(answers)
            finally:
                registry.stop()
    for what in seen[0]:
        same = "equal" if seen[0][what] == seen[1][what] else "DIFFERENT"
        print(f"  {what}: {seen[0][what]} / {seen[1][what]}: {same}")
    print("all equal" if seen[0] == seen[1] else "DIGESTS DIFFER")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--image", default="shell/hello")
    parser.add_argument("--digests", action="store_true", help="only the two-instance digest check")
    parser.add_argument("--scaling", action="store_true", help="only the generation time by closure size")
    args = parser.parse_args()
    if args.digests:
        digests(args.image)
    elif args.scaling:
        scaling()
    else:
        measure(args.rounds, args.image)


if __name__ == "__main__":
    main()
