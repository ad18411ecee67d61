"""Layer reuse across a corpus of images, for builder.layers and baseline strategies.

    .venv/bin/python bench/bench_layer_reuse.py [--corpus v2|v1] [--images 400] [--seed 1] [--pull-model]

Two generated package sets; a corpus of images of 1-8 apps picked with Zipf-like popularity.
- v1 (the first): a 30 MB libc every package uses, 10 popular libraries, 150 mid-level ones,
  300 apps with 0-20 private dependencies; lognormal sizes with medians of 0.5-3 MB, so almost
  no path is tiny (closures: median 97 paths).
- v2 (default): calibrated to what a realistic nixpkgs package graph shows (issue 10's figures),
  set before any layering rule was tried on it: closures of median ~70 and p90 >= 100 paths
  (so ~70 layers at MAX_LAYERS=100, p90 100), ~18% of those one-path layers under 100 KiB, and a
  few big shared paths holding most bytes (the 5 biggest hold ~70% of an image). Named base paths
  with nixpkgs-like nar sizes and references (glibc 30 MB, gcc-lib, python3 105 MB, perl, llvm,
  nodejs, openssl; small ones: zlib, bzip2, libffi, keyutils, libidn2, mailcap, iana-etc, cacert,
  tzdata...), then generated C libraries, Python and Perl modules (mostly small, shared through
  Zipf-weighted picks) and apps of six kinds (C, Python, Perl, Node, Ruby, LLVM-based) with small
  private paths (data, plugins, wrappers). Every image also holds cacert and iana-etc
  (ALWAYS_INCLUDE). The calibration figures are printed with every run.
Images are built in order; the figure is the fraction of layer bytes of each image already
stored by earlier images (summed over the corpus). "Path-level ideal" is the fraction of
store-path bytes seen before: no layer strategy can beat it. --pull-model: rules for fewer
layers, with layers per image and modelled cold-pull times (assumptions printed).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from builder import layers  # noqa: E402
from builder.config import Config  # noqa: E402


@dataclass(frozen=True)
class StorePath:
    path: str
    nar_size: int
    references: tuple[str, ...]


Strategy = Callable[[Mapping[str, StorePath], Sequence[str], int], list[tuple[str, ...]]]


def generate_universe(rng: random.Random) -> tuple[dict[str, StorePath], list[str]]:
    def size(median: float) -> int:
        return max(1000, int(rng.lognormvariate(0, 1.2) * median))

    refs: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}

    def add(name: str, deps: list[str], nbytes: int) -> str:
        path = f"/nix/store/{hashlib.sha1(name.encode()).hexdigest()[:32]}-{name}"
        refs[path] = deps
        sizes[path] = nbytes
        return path

    libc = add("glibc", [], 30_000_000)
    popular = [add(f"pop{i}", [libc], size(2_000_000)) for i in range(10)]
    mid: list[str] = []
    for i in range(150):
        deps = [libc] + rng.sample(popular, rng.randint(0, 3)) + rng.sample(mid, min(len(mid), rng.randint(0, 4)))
        mid.append(add(f"lib{i}", deps, size(1_500_000)))
    apps: list[str] = []
    for i in range(300):
        private = []
        for j in range(rng.choice([0, 0, 1, 2, 4, 8, 20])):  # plugins, data, wrappers: this app's alone
            private.append(add(f"app{i}-part{j}", [libc] + private[-1:], size(500_000)))
        deps = ([libc] + rng.sample(popular, rng.randint(1, 4))
                + rng.sample(mid, rng.choice([0, 1, 2, 4, 8, 16])) + private)
        apps.append(add(f"app{i}", deps, size(3_000_000)))
    universe = {p: StorePath(p, sizes[p], tuple(refs[p])) for p in refs}
    return universe, apps


# Named runtime paths of a nixpkgs-like base, with nar sizes of the order nixpkgs 23.x x86_64 reports
# (nix path-info -S): name -> (bytes, references).
NIXPKGS_CORE: dict[str, tuple[int, tuple[str, ...]]] = {
    "xgcc-libgcc": (140_000, ()),
    "libunistring": (1_800_000, ()),
    "libidn2": (350_000, ("libunistring",)),
    "glibc": (30_000_000, ("libidn2", "xgcc-libgcc")),
    "gcc-lib": (8_500_000, ("glibc", "xgcc-libgcc")),
    "cacert": (480_000, ()),
    "iana-etc": (1_000_000, ()),
    "mailcap": (100_000, ()),
    "tzdata": (2_000_000, ()),
    "publicsuffix-list": (250_000, ()),
    "zlib": (130_000, ("glibc",)),
    "bzip2": (80_000, ("glibc",)),
    "xz": (500_000, ("glibc",)),
    "zstd": (1_100_000, ("glibc",)),
    "lz4": (200_000, ("glibc",)),
    "libffi": (60_000, ("glibc",)),
    "expat": (250_000, ("glibc",)),
    "libxcrypt": (200_000, ("glibc",)),
    "attr": (60_000, ("glibc",)),
    "acl": (80_000, ("attr", "glibc")),
    "libcap": (150_000, ("attr", "glibc")),
    "keyutils": (70_000, ("glibc",)),
    "libseccomp": (200_000, ("glibc",)),
    "libyaml": (150_000, ("glibc",)),
    "libuv": (400_000, ("glibc",)),
    "c-ares": (250_000, ("glibc",)),
    "nghttp2-lib": (200_000, ("glibc",)),
    "brotli-lib": (800_000, ("glibc",)),
    "pcre2": (1_600_000, ("glibc",)),
    "gmp": (850_000, ("glibc",)),
    "mpfr": (1_500_000, ("gmp", "glibc")),
    "util-linux-lib": (2_300_000, ("glibc",)),
    "e2fsprogs-lib": (1_500_000, ("glibc",)),
    "ncurses": (3_200_000, ("glibc",)),
    "readline": (500_000, ("ncurses", "glibc")),
    "libedit": (250_000, ("ncurses", "glibc")),
    "gdbm": (450_000, ("readline", "glibc")),
    "sqlite": (2_000_000, ("readline", "zlib", "glibc")),
    "openssl": (6_300_000, ("glibc",)),
    "krb5-lib": (3_000_000, ("keyutils", "openssl", "e2fsprogs-lib", "glibc")),
    "libssh2": (350_000, ("openssl", "zlib", "glibc")),
    "libpsl": (100_000, ("libidn2", "libunistring", "publicsuffix-list", "glibc")),
    "curl": (1_000_000, ("openssl", "zlib", "zstd", "brotli-lib", "nghttp2-lib", "libssh2", "krb5-lib", "libpsl",
                         "libidn2", "glibc")),
    "libevent": (1_200_000, ("openssl", "glibc")),
    "libxml2": (2_000_000, ("zlib", "xz", "glibc")),
    "libxslt": (500_000, ("libxml2", "glibc")),
    "systemd-minimal-libs": (1_500_000, ("libcap", "xz", "zstd", "lz4", "glibc")),
    "dbus-lib": (1_000_000, ("expat", "systemd-minimal-libs", "glibc")),
    "glib": (8_000_000, ("libffi", "pcre2", "zlib", "util-linux-lib", "glibc")),
    "bash": (1_600_000, ("glibc",)),
    "coreutils": (7_000_000, ("acl", "attr", "gmp", "openssl", "glibc")),
    "gnugrep": (1_100_000, ("pcre2", "glibc")),
    "gnused": (800_000, ("glibc",)),
    "gawk": (3_000_000, ("mpfr", "gmp", "readline", "glibc")),
    "findutils": (1_500_000, ("coreutils", "glibc")),
    "gettext": (7_000_000, ("bash", "glibc")),
    "icu": (35_000_000, ("gcc-lib", "glibc")),
    "lua": (400_000, ("readline", "glibc")),
    "perl": (55_000_000, ("libxcrypt", "glibc")),
    "python3": (105_000_000, ("bzip2", "expat", "libffi", "gdbm", "xz", "ncurses", "openssl", "readline", "sqlite",
                              "zlib", "libxcrypt", "tzdata", "mailcap", "bash", "glibc")),
    "ruby": (30_000_000, ("openssl", "zlib", "libyaml", "libffi", "readline", "gdbm", "ncurses", "glibc")),
    "nodejs": (65_000_000, ("openssl", "zlib", "icu", "libuv", "c-ares", "nghttp2-lib", "brotli-lib", "gcc-lib",
                            "glibc")),
    "llvm-lib": (110_000_000, ("gcc-lib", "zlib", "ncurses", "libxml2", "libffi", "glibc")),
}


def generate_universe_v2(rng: random.Random) -> tuple[dict[str, StorePath], list[str], list[str]]:
    """The v2 package set: named base paths (NIXPKGS_CORE), then generated C libraries, Python and
    Perl modules (small, shared through Zipf-weighted picks) and apps with small private paths
    (wrappers, data, plugins). Returns the set, the apps, and the paths every image gets."""
    refs: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}

    def add(name: str, deps: list[str], nbytes: int) -> str:
        path = f"/nix/store/{hashlib.sha1(name.encode()).hexdigest()[:32]}-{name}"
        refs[path] = sorted(set(deps))
        sizes[path] = nbytes
        return path

    def size(median: float, sigma: float) -> int:
        return max(200, int(rng.lognormvariate(0, sigma) * median))

    def pick(pool: list[str], k: int) -> list[str]:
        """k distinct members, the first of `pool` the most likely (Zipf-like popularity)."""
        chosen: list[str] = []
        weights = [1 / (i + 1) ** 0.8 for i in range(len(pool))]
        while len(chosen) < min(k, len(pool)):
            p = rng.choices(pool, weights)[0]
            if p not in chosen:
                chosen.append(p)
        return chosen

    core: dict[str, str] = {}
    for name, (nbytes, deps) in NIXPKGS_CORE.items():
        core[name] = add(name, [core[d] for d in deps], nbytes)
    glibc, gcc_lib = core["glibc"], core["gcc-lib"]
    # C dependencies an app or library may have, most used first.
    c_deps = [core[n] for n in (
        "zlib", "openssl", "ncurses", "bash", "xz", "bzip2", "libffi", "expat", "pcre2", "readline", "curl", "zstd",
        "coreutils", "sqlite", "libxml2", "glib", "gmp", "libcap", "attr", "acl", "util-linux-lib", "libuv",
        "libevent", "libedit", "lz4", "libseccomp", "libyaml", "keyutils", "krb5-lib", "libssh2", "brotli-lib",
        "nghttp2-lib", "dbus-lib", "systemd-minimal-libs", "gettext", "gnugrep", "gnused", "gawk", "findutils",
        "libxslt", "icu", "lua", "mpfr", "c-ares", "tzdata", "mailcap")]
    libs: list[str] = []
    for i in range(LIBS_V2):
        deps = [glibc] + ([gcc_lib] if rng.random() < 0.3 else []) + pick(c_deps, rng.choice([0, 1, 1, 2, 3]))
        deps += pick(libs, rng.choice([0, 0, 1, 1, 2, 3]))
        libs.append(add(f"lib{i}", deps, size(200_000, 1.6)))
    python, perl = core["python3"], core["perl"]
    pymods: list[str] = []
    for i in range(PYMODS_V2):
        deps = [python] + pick(pymods, rng.choice([0, 0, 1, 1, 2, 3]))
        deps += pick(c_deps, 1) if rng.random() < 0.2 else []
        pymods.append(add(f"python3.11-mod{i}", deps, size(250_000, 1.5)))
    perlmods: list[str] = []
    for i in range(PERLMODS_V2):
        deps = [perl] + pick(perlmods, rng.choice([0, 1, 1, 2]))
        perlmods.append(add(f"perl5.38-mod{i}", deps, size(60_000, 1.3)))
    kinds = {"c": [], "python": [python], "perl": [perl], "node": [core["nodejs"]], "ruby": [core["ruby"]],
             "llvm": [core["llvm-lib"], gcc_lib]}
    apps: list[str] = []
    for i in range(APPS_V2):
        kind = rng.choices(list(kinds), [60, 22, 6, 5, 3, 4])[0]
        deps = [glibc] + kinds[kind] + pick(c_deps, rng.choice([0, 1, 2, 3, 4, 6]))
        deps += pick(libs, rng.choice([0, 1, 2, 3, 5, 8]))
        if kind == "python":
            deps += pick(pymods, rng.choice([1, 2, 4, 6, 10, 16]))
        if kind == "perl":
            deps += pick(perlmods, rng.choice([1, 2, 4, 8]))
        private: list[str] = []
        for j in range(rng.choice([0, 0, 1, 1, 2, 3, 5, 8])):  # data, plugins, split outputs: this app's alone
            private.append(add(f"app{i}-part{j}", ([glibc] if rng.random() < 0.5 else []) + private[-1:],
                               size(60_000, 1.6)))
        apps.append(add(f"app{i}", deps + private, size(2_000_000, 1.4)))
    universe = {p: StorePath(p, sizes[p], tuple(refs[p])) for p in refs}
    return universe, apps, [core["cacert"], core["iana-etc"]]


LIBS_V2, PYMODS_V2, PERLMODS_V2, APPS_V2 = 400, 250, 80, 500


def closure_of(universe: Mapping[str, StorePath], roots: Sequence[str]) -> dict[str, StorePath]:
    seen: dict[str, StorePath] = {}
    stack = list(roots)
    while stack:
        p = stack.pop()
        if p not in seen:
            seen[p] = universe[p]
            stack.extend(universe[p].references)
    return seen


def corpus(rng: random.Random, apps: list[str], count: int) -> list[list[str]]:
    weights = [1 / (i + 1) for i in range(len(apps))]  # Zipf: some apps are asked for far more often
    images = []
    for _ in range(count):
        k = rng.choice([1, 1, 2, 2, 3, 4, 6, 8])
        images.append(sorted(set(rng.choices(apps, weights, k=k))))
    return images


# --- strategies --------------------------------------------------------------

def ours(paths, roots, budget):
    """builder.layers with the default LAYER_SOLO_BYTES."""
    return [plan.paths for plan in layers.plan_layers(paths, roots, budget, solo_bytes=Config.layer_solo_bytes)]


def solo_from(solo_bytes: int) -> Strategy:
    """builder.layers with another LAYER_SOLO_BYTES (0: every path solo, the rule before)."""
    def strategy(paths, roots, budget):
        return [plan.paths for plan in layers.plan_layers(paths, roots, budget, solo_bytes=solo_bytes)]
    return strategy


previous = solo_from(0)


def one_layer(paths, roots, budget):
    return [tuple(sorted(paths))]


def _popularity(paths: Mapping[str, StorePath]) -> dict[str, int]:
    """Transitive referrer count inside the closure, as streamLayeredImage's popularity contest."""
    memo: dict[str, set[str]] = {}

    def clos(p: str) -> set[str]:
        if p not in memo:
            s = {p}
            for r in paths[p].references:
                if r != p:
                    s |= clos(r)
            memo[p] = s
        return memo[p]

    count = {p: 0 for p in paths}
    for p in paths:
        for q in clos(p):
            count[q] += 1
    return count


def popularity_then_size(paths, roots, budget):
    """nixpkgs streamLayeredImage: most popular (then biggest) budget-1 paths solo, the rest in one layer."""
    pop = _popularity(paths)
    ranked = sorted(paths, key=lambda p: (-pop[p], -paths[p].nar_size, p))
    if len(ranked) <= budget:
        return [(p,) for p in ranked]
    return [(p,) for p in ranked[: budget - 1]] + [tuple(sorted(ranked[budget - 1:]))]


def size_times_popularity(paths, roots, budget):
    """Ranked by size times in-closure popularity: solo for the top budget-1, the rest in one layer."""
    pop = _popularity(paths)
    ranked = sorted(paths, key=lambda p: (-paths[p].nar_size * pop[p], p))
    if len(ranked) <= budget:
        return [(p,) for p in ranked]
    return [(p,) for p in ranked[: budget - 1]] + [tuple(sorted(ranked[budget - 1:]))]


def _dominators(paths: Mapping[str, StorePath], roots: Sequence[str]) -> dict[str, str | None]:
    """Immediate dominators (None: only the image itself), Cooper-Harvey-Kennedy over a virtual root."""
    refs = {p: [r for r in info.references if r != p and r in paths] for p, info in paths.items()}
    referrers: dict[str, list[str]] = {p: [] for p in paths}
    for p, rs in refs.items():
        for r in rs:
            referrers[r].append(p)
    starts = sorted(set(roots) | {p for p, rs in referrers.items() if not rs})
    order: list[str] = []
    seen: set[str] = set()

    def visit(p: str) -> None:
        seen.add(p)
        for r in refs[p]:
            if r not in seen:
                visit(r)
        order.append(p)

    for p in starts:
        if p not in seen:
            visit(p)
    virtual = ""
    rpo = [virtual] + order[::-1]
    position = {p: i for i, p in enumerate(rpo)}
    preds = {p: referrers[p] + ([virtual] if p in starts else []) for p in paths}
    idom: dict[str, str | None] = {p: None for p in paths}
    idom[virtual] = virtual

    def intersect(a: str, b: str) -> str:
        while a != b:
            while position[a] > position[b]:
                a = idom[a]  # type: ignore[assignment]
            while position[b] > position[a]:
                b = idom[b]  # type: ignore[assignment]
        return a

    changed = True
    while changed:
        changed = False
        for p in rpo[1:]:
            new = None
            for q in preds[p]:
                if idom[q] is not None:
                    new = q if new is None else intersect(q, new)
            if idom[p] != new:
                idom[p], changed = new, True
    return {p: (None if d == virtual else d) for p, d in idom.items() if p != virtual}


def nixery(paths, roots, budget):
    """Nixery: top-level dominator subtrees are layers (even under budget), merged by popularity*size."""
    idom = _dominators(paths, roots)
    pop = _popularity(paths)

    def top(p: str) -> str:
        while idom[p] is not None:
            p = idom[p]
        return p

    groups: dict[str, list[str]] = {}
    for p in sorted(paths):
        groups.setdefault(top(p), []).append(p)
    rated = sorted((pop[h] * sum(paths[p].nar_size for p in g), sorted(g)) for h, g in groups.items())
    while len(rated) > budget:
        (r0, g0), (r1, g1) = rated[0], rated[1]
        rated = [(r0 + r1, sorted(g0 + g1))] + rated[2:]
    return [tuple(g) for _, g in rated]


def dominator_fold(paths, roots, budget):
    """Solo layers, then the cheapest (size*popularity) path folds into its dominator's group until it fits."""
    idom = _dominators(paths, roots)
    pop = _popularity(paths)
    group = {p: p for p in paths}  # path -> group head
    size = {p: info.nar_size for p, info in paths.items()}

    def head(p: str) -> str:
        while group[p] != p:
            p = group[p]
        return p

    count = len(paths)
    while count > budget:
        foldable = [h for h in paths if group[h] == h and idom[h] is not None]
        if not foldable:
            break
        h = min(foldable, key=lambda h: (size[h] * pop[h], h))
        target = head(idom[h])
        group[h] = target
        size[target] += size[h]
        count -= 1
    groups: dict[str, list[str]] = {}
    for p in sorted(paths):
        groups.setdefault(head(p), []).append(p)
    ranked = sorted(groups.values(), key=lambda g: (sum(paths[p].nar_size for p in g) * pop[head(g[0])], g))
    excess = max(0, len(ranked) - budget + 1) if len(ranked) > budget else 0
    rest = [tuple(sorted(p for g in ranked[:excess] for p in g))] if excess else []
    return rest + [tuple(g) for g in ranked[excess:]]


def small_by_roots(threshold: int) -> Strategy:
    """Paths of `threshold` bytes or more solo (the biggest first, up to budget); the smaller ones
    grouped by the set of requested packages that reach them (an app's private helpers travel
    together in every image holding the app)."""
    def strategy(paths, roots, budget):
        reach: dict[str, set[str]] = {p: set() for p in paths}
        for root in roots:
            stack, seen = [root], set()
            while stack:
                p = stack.pop()
                if p in seen:
                    continue
                seen.add(p)
                reach[p].add(root)
                stack.extend(r for r in paths[p].references if r in paths and r != p)
        ranked = sorted(paths, key=lambda p: (-paths[p].nar_size, p))
        solo = [p for p in ranked if paths[p].nar_size >= threshold]
        buckets: dict[frozenset, list[str]] = {}
        for p in ranked:
            if paths[p].nar_size < threshold:
                buckets.setdefault(frozenset(reach[p]), []).append(p)
        groups = [(p,) for p in solo] + [tuple(sorted(g)) for g in buckets.values()]
        if len(groups) <= budget:
            return groups
        # Over budget: the biggest groups keep theirs, the rest share one layer.
        groups.sort(key=lambda g: (-sum(paths[p].nar_size for p in g), g))
        return groups[: budget - 1] + [tuple(sorted(p for g in groups[budget - 1:] for p in g))]
    return strategy


def threshold_solo(threshold: int) -> Strategy:
    """Only paths of `threshold` bytes or more get a layer of their own; the rest share one."""
    def strategy(paths, roots, budget):
        ranked = sorted(paths, key=lambda p: (-paths[p].nar_size, p))
        solo = [p for p in ranked if paths[p].nar_size >= threshold][: budget - 1]
        rest = tuple(sorted(set(paths) - set(solo)))
        return [(p,) for p in solo] + ([rest] if rest else [])
    return strategy


def _keep_biggest(groups: list[tuple[str, ...]], paths, budget: int) -> list[tuple[str, ...]]:
    if len(groups) <= budget:
        return groups
    groups = sorted(groups, key=lambda g: (-sum(paths[p].nar_size for p in g), g))
    return groups[: budget - 1] + [tuple(sorted(p for g in groups[budget - 1:] for p in g))]


def small_by_dominator(threshold: int, shared_solo: int) -> Strategy:
    """Paths of `threshold` bytes or more solo; a smaller path joins the group of its nearest
    dominator that is solo (the group holds the small paths alone); a smaller path that only the
    image itself dominates (shared by several packages) is solo from `shared_solo` bytes, below
    that in one shared layer."""
    def strategy(paths, roots, budget):
        idom = _dominators(paths, roots)
        big = {p for p in paths if paths[p].nar_size >= threshold}
        groups: list[tuple[str, ...]] = [(p,) for p in sorted(big)]
        buckets: dict[str | None, list[str]] = {}
        for p in sorted(paths):
            if p in big:
                continue
            d = idom[p]
            while d is not None and d not in big:
                d = idom[d]
            if d is None and paths[p].nar_size >= shared_solo:
                groups.append((p,))
            else:
                buckets.setdefault(d, []).append(p)
        return _keep_biggest(groups + [tuple(g) for g in buckets.values()], paths, budget)
    return strategy


def anchored_smallest(threshold: int) -> Strategy:
    """builder.layers' anchors (paths of `threshold` bytes or more, requested packages), but a
    smaller path goes with the reaching anchor of the SMALLEST closure (the most basic package
    needing it) instead of the biggest."""
    def strategy(paths, roots, budget):
        refs = {p: sorted(r for r in paths[p].references if r in paths and r != p) for p in paths}
        referred = {r for rs in refs.values() for r in rs}
        anchors = {p for p in paths if paths[p].nar_size >= threshold} | set(roots) | (set(paths) - referred)
        below: dict[str, set[str]] = {}

        def closure(p: str) -> set[str]:
            if p not in below:
                below[p] = {p}.union(*(closure(r) for r in refs[p]))
            return below[p]

        candidates: dict[str, list[str]] = {p: [] for p in paths}
        for a in sorted(anchors):
            stack, seen = list(refs[a]), set()
            while stack:
                q = stack.pop()
                if q in seen or q in anchors:
                    continue
                seen.add(q)
                candidates[q].append(a)
                stack.extend(refs[q])
        buckets: dict[str, list[str]] = {}
        for p in sorted(set(paths) - anchors):
            buckets.setdefault(min(candidates[p], key=lambda a: (len(closure(a)), a)), []).append(p)
        groups = [(p,) for p in sorted(anchors)] + [tuple(g) for g in buckets.values()]
        return _keep_biggest(groups, paths, budget)
    return strategy


# Candidates for fewer layers, reported with the pull model (--pull-model).
FEWER_LAYERS: dict[str, tuple[Strategy, int]] = {
    "every path solo, over budget biggest solo + remainder (the rule before), budget 100": (previous, 100),
    "the rule before at budget 40": (previous, 40),
    "solo from 1 MiB, rest one layer": (threshold_solo(1 << 20), 100),
    "solo from 100 KiB, rest one layer": (threshold_solo(100 << 10), 100),
    "solo from 2 MiB, smaller grouped by requesting packages": (small_by_roots(2 << 20), 100),
    "solo from 1 MiB, smaller grouped by requesting packages": (small_by_roots(1 << 20), 100),
    "solo from 1 MiB, smaller by nearest solo dominator, shared ones solo from 256 KiB":
        (small_by_dominator(1 << 20, 256 << 10), 100),
    "anchors (1 MiB or requested), smaller with the reaching anchor of smallest closure":
        (anchored_smallest(1 << 20), 100),
    "**builder.layers: anchors (1 MiB or requested), smaller with the reaching anchor of biggest closure**":
        (ours, 100),
    "the same, anchors from 512 KiB": (solo_from(512 << 10), 100),
    "the same, anchors from 2 MiB": (solo_from(2 << 20), 100),
    "the same at budget 40": (ours, 40),
}


STRATEGIES: dict[str, Strategy] = {
    "builder.layers: anchors from 1 MiB (ours)": ours,
    "every path solo (the rule before)": previous,
    "size x popularity solo": size_times_popularity,
    "dominator fold, cheapest first": dominator_fold,
    "popularity then size (streamLayeredImage)": popularity_then_size,
    "Nixery dominator + merge rating": nixery,
    "one layer per image": one_layer,
}


# Pull model: a client fetches `PARALLEL` layers at once (docker's max-concurrent-downloads), each
# costing `REQUESTS_PER_LAYER` round trips of `LATENCY` (the registry's redirect, then storage)
# before its bytes arrive at `BANDWIDTH`.
LATENCY = 0.05
REQUESTS_PER_LAYER = 2
PARALLEL = 3
BANDWIDTH = 100e6


def pull_model(universe, images, strategy: Strategy, budget: int) -> dict[str, float]:
    """Reuse, layers per image (median, p90; customisation layer included) and modelled cold-pull
    seconds (median) for a client with an empty cache and one holding every earlier image's layers."""
    stored: set[tuple[str, ...]] = set()
    reused = total = 0
    counts, empty, warm = [], [], []
    for roots in images:
        paths = closure_of(universe, roots)
        groups = strategy(paths, roots, budget)
        assert len(groups) <= budget and sum(map(len, groups)) == len(paths)
        counts.append(len(groups) + 1)
        nbytes = [sum(paths[p].nar_size for p in g) for g in groups]
        new = [n for g, n in zip(groups, nbytes) if g not in stored]
        for g, n in zip(groups, nbytes):
            total += n
            reused += n if g in stored else 0
            stored.add(g)

        def seconds(layer_bytes: list[int]) -> float:
            rounds = -(-(len(layer_bytes) + 1) // PARALLEL)  # + the customisation layer
            return rounds * REQUESTS_PER_LAYER * LATENCY + sum(layer_bytes) / BANDWIDTH

        empty.append(seconds(nbytes))
        warm.append(seconds(new))
    counts.sort()
    return {"reuse": reused / total, "median": statistics.median(counts), "p90": counts[len(counts) * 9 // 10],
            "empty": statistics.median(empty), "warm": statistics.median(warm)}


def measure(universe, images, strategy: Strategy, budget: int) -> tuple[float, float, float]:
    stored: set[tuple[str, ...]] = set()
    reused = total = 0
    layer_counts = []
    for roots in images:
        paths = closure_of(universe, roots)
        groups = strategy(paths, roots, budget)
        assert len(groups) <= budget and sum(map(len, groups)) == len(paths)
        layer_counts.append(len(groups))
        for group in groups:
            nbytes = sum(paths[p].nar_size for p in group)
            total += nbytes
            if group in stored:
                reused += nbytes
            stored.add(group)
    return reused / total, sum(layer_counts) / len(layer_counts), total


def ideal(universe, images) -> float:
    seen: set[str] = set()
    reused = total = 0
    for roots in images:
        for p, info in closure_of(universe, roots).items():
            total += info.nar_size
            reused += info.nar_size if p in seen else 0
            seen.add(p)
    return reused / total


def calibration(universe, images) -> str:
    """The corpus facts v2 is calibrated to, under the rule before (every path solo)."""
    small = count = 0
    top5 = []
    for roots in images:
        paths = closure_of(universe, roots)
        for group in previous(paths, roots, 100):
            count += 1
            small += sum(paths[p].nar_size for p in group) < 100 << 10
        sizes = sorted((info.nar_size for info in paths.values()), reverse=True)
        top5.append(sum(sizes[:5]) / sum(sizes))
    return (f"{small / count:.1%} of the rule-before layers under 100 KiB; the 5 biggest paths hold a median "
            f"{statistics.median(top5):.0%} of an image's bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--corpus", choices=["v1", "v2"], default="v2",
                        help="v2: calibrated to nixpkgs closures (default); v1: the first, lognormal-only set")
    parser.add_argument("--budgets", type=int, nargs="*", default=[100, 20, 5])
    parser.add_argument("--pull-model", action="store_true",
                        help="instead: rules for fewer layers, with layers per image and modelled pull times")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    if args.corpus == "v1":
        universe, apps = generate_universe(rng)
        images = corpus(rng, apps, args.images)
    else:
        universe, apps, always = generate_universe_v2(rng)
        images = [sorted(set(roots) | set(always)) for roots in corpus(rng, apps, args.images)]
    sizes = sorted(len(closure_of(universe, roots)) for roots in images)
    print(f"{len(universe)} store paths in the package set, {len(images)} images; "
          f"closure sizes: median {sizes[len(sizes) // 2]}, p90 {sizes[len(sizes) * 9 // 10]}, max {sizes[-1]} paths")
    print(f"path-level ideal: {ideal(universe, images):.1%} of bytes already stored")
    print(calibration(universe, images))
    if args.pull_model:
        print(f"\npull model: {PARALLEL} layers at once, {REQUESTS_PER_LAYER} requests of {LATENCY * 1000:.0f} ms "
              f"per layer, {BANDWIDTH / 1e6:.0f} MB/s\n")
        print("| rule | reuse | layers/image median | p90 | cold pull, empty client | cold pull, client with "
              "earlier layers |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, (strategy, budget) in FEWER_LAYERS.items():
            m = pull_model(universe, images, strategy, budget)
            print(f"| {name} | {m['reuse']:.1%} | {m['median']:.0f} | {m['p90']} | {m['empty']:.2f} s | "
                  f"{m['warm']:.2f} s |")
        return
    for budget in args.budgets:
        over = sum(1 for s in sizes if s > budget) / len(sizes)
        print(f"\nbudget {budget} ({over:.0%} of images over budget)")
        for name, strategy in STRATEGIES.items():
            reuse, mean_layers, total = measure(universe, images, strategy, budget)
            print(f"  {name:<44} reuse {reuse:6.1%}   mean layers {mean_layers:5.1f}")


if __name__ == "__main__":
    main()
