"""Layer reuse across a corpus of images, for builder.layers and baseline strategies.

    .venv/bin/python bench/bench_layer_reuse.py [--images 400] [--seed 1]

A generated nixpkgs-like package set (a libc every package uses, a few popular
libraries, mid-level libraries, leaf apps with private dependencies; sizes
heavy-tailed) and a corpus of images of 1-8 apps picked with Zipf-like
popularity. Images are built in order; the figure is the fraction of layer
bytes of each image already stored by earlier images (summed over the corpus).
"Path-level ideal" is the fraction of store-path bytes seen before: no layer
strategy can beat it.
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
    return [plan.paths for plan in layers.plan_layers(paths, roots, budget)]


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


# Candidates for fewer layers, reported with the pull model (--pull-model).
FEWER_LAYERS: dict[str, tuple[Strategy, int]] = {
    "today: biggest solo, budget 100": (None, 100),  # type: ignore[dict-item]  # filled below
    "today's rule at budget 40": (None, 40),  # type: ignore[dict-item]
    "solo from 1 MiB, rest one layer": (threshold_solo(1 << 20), 100),
    "solo from 100 KiB, rest one layer": (threshold_solo(100 << 10), 100),
    "solo from 2 MiB, smaller grouped by requesting packages": (small_by_roots(2 << 20), 100),
    "solo from 1 MiB, smaller grouped by requesting packages": (small_by_roots(1 << 20), 100),
}


STRATEGIES: dict[str, Strategy] = {
    "builder.layers: biggest solo (ours)": ours,
    "size x popularity solo": size_times_popularity,
    "dominator fold, cheapest first": dominator_fold,
    "popularity then size (streamLayeredImage)": popularity_then_size,
    "Nixery dominator + merge rating": nixery,
    "one layer per image": one_layer,
}


FEWER_LAYERS["today: biggest solo, budget 100"] = (ours, 100)
FEWER_LAYERS["today's rule at budget 40"] = (ours, 40)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budgets", type=int, nargs="*", default=[100, 20, 5])
    parser.add_argument("--pull-model", action="store_true",
                        help="instead: rules for fewer layers, with layers per image and modelled pull times")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    universe, apps = generate_universe(rng)
    images = corpus(rng, apps, args.images)
    sizes = sorted(len(closure_of(universe, roots)) for roots in images)
    print(f"{len(universe)} store paths in the package set, {len(images)} images; "
          f"closure sizes: median {sizes[len(sizes) // 2]}, p90 {sizes[len(sizes) * 9 // 10]}, max {sizes[-1]} paths")
    print(f"path-level ideal: {ideal(universe, images):.1%} of bytes already stored")
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
