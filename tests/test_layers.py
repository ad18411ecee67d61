"""Layer planning on synthetic closures (pure logic)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from builder.layers import LayerPlan, customisation_key, layer_key, plan_layers

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast


@dataclass(frozen=True)
class StorePath:  # the shape of builder.nix.StorePath
    path: str
    nar_size: int
    references: tuple[str, ...]


def sp(name: str) -> str:
    return f"/nix/store/{name:0>4}-{name}"


def closure(graph: dict[str, list[str]], sizes: dict[str, int] | None = None) -> dict[str, StorePath]:
    """Store paths from {name: [referenced names]}, self references included as Nix reports them."""
    return {sp(n): StorePath(sp(n), (sizes or {}).get(n, 1000), tuple(sp(r) for r in [n, *refs]))
            for n, refs in graph.items()}


def restrict(universe: dict[str, StorePath], roots: list[str]) -> dict[str, StorePath]:
    """The closure of `roots` inside a bigger package set."""
    seen: dict[str, StorePath] = {}
    stack = list(roots)
    while stack:
        path = stack.pop()
        if path not in seen:
            seen[path] = universe[path]
            stack.extend(universe[path].references)
    return seen


def check_plan(paths: dict[str, StorePath], plan: list[LayerPlan], budget: int) -> None:
    assert 1 <= len(plan) <= budget
    flat = [p for layer in plan for p in layer.paths]
    assert sorted(flat) == sorted(paths) and len(flat) == len(set(flat))
    for layer in plan:
        assert list(layer.paths) == sorted(layer.paths)
        assert layer.key == layer_key(layer.paths)
        assert layer.size == sum(paths[p].nar_size for p in layer.paths)


def assert_dependencies_first(paths: dict[str, StorePath], plan: list[LayerPlan]) -> None:
    position = {p: i for i, layer in enumerate(plan) for p in layer.paths}
    for path, info in paths.items():
        for ref in info.references:
            assert position[ref] <= position[path], f"{path} comes before its dependency {ref}"


def assert_dependencies_first_unless_cyclic(paths: dict[str, StorePath], plan: list[LayerPlan]) -> None:
    """A layer comes after the layers it needs, except where merged layers need each other."""
    position = {p: i for i, layer in enumerate(plan) for p in layer.paths}
    needs: dict[int, set[int]] = {i: set() for i in range(len(plan))}
    for path, info in paths.items():
        needs[position[path]].update(position[r] for r in info.references if position[r] != position[path])

    def reaches(start: int, goal: int) -> bool:
        stack, seen = [start], {start}
        while stack:
            layer = stack.pop()
            if layer == goal:
                return True
            for n in needs[layer] - seen:
                seen.add(n)
                stack.append(n)
        return False

    for layer, deps in needs.items():
        for dep in deps:
            assert dep < layer or reaches(dep, layer), f"layer {layer} comes before layer {dep} it needs"


# A small package set: libc under everything, a few shared libraries, leaf apps.
PACKAGES = {
    "libc": [],
    "zlib": ["libc"],
    "openssl": ["libc"],
    "ncurses": ["libc"],
    "pcre": ["libc"],
    "curl": ["openssl", "zlib", "libc"],
    "git": ["curl", "pcre", "zlib", "perl", "libc"],
    "perl": ["libc"],
    "htop": ["ncurses", "libc"],
    "bash": ["ncurses", "libc"],
    "vim": ["ncurses", "libc", "vimdata"],
    "vimdata": [],
}


def test_under_budget_one_layer_per_path():
    paths = closure(PACKAGES)
    plan = plan_layers(paths, [sp("git"), sp("htop")], 100)
    check_plan(paths, plan, 100)
    assert all(len(layer.paths) == 1 for layer in plan)
    assert_dependencies_first(paths, plan)


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 11, 12])
def test_budget_honoured(budget):
    paths = closure(PACKAGES)
    roots = [sp("git"), sp("htop"), sp("vim"), sp("bash")]
    plan = plan_layers(paths, roots, budget)
    check_plan(paths, plan, budget)
    if budget == 1:
        assert plan[0].paths == tuple(sorted(paths))


def test_deterministic_whatever_the_input_order():
    paths = closure(PACKAGES)
    roots = [sp("git"), sp("htop"), sp("vim")]
    shuffled = list(paths.items())
    random.Random(1).shuffle(shuffled)
    for budget in (1, 2, 4, 100):
        assert plan_layers(paths, roots, budget) == plan_layers(dict(shuffled), list(reversed(roots)), budget)


def test_shared_packages_share_layer_keys():
    universe = closure(PACKAGES, {"libc": 30_000_000, "vimdata": 40_000_000})
    one = restrict(universe, [sp("git"), sp("htop")])
    two = restrict(universe, [sp("curl"), sp("vim"), sp("bash")])
    keys_one = {layer.key: layer.paths for layer in plan_layers(one, [sp("git"), sp("htop")], 100)}
    keys_two = {layer.key: layer.paths for layer in plan_layers(two, [sp("curl"), sp("vim"), sp("bash")], 100)}
    shared = set(one) & set(two)
    assert {paths[0] for key, paths in keys_one.items() if key in keys_two} == shared
    # Over budget, the big and popular paths keep their own layers in both images.
    for budget in (3, 4):
        tight_one = {layer.paths for layer in plan_layers(one, [sp("git"), sp("htop")], budget)}
        tight_two = {layer.paths for layer in plan_layers(two, [sp("curl"), sp("vim"), sp("bash")], budget)}
        assert (sp("libc"),) in tight_one and (sp("libc"),) in tight_two


def test_over_budget_biggest_paths_stay_solo():
    graph = {"libc": [], "app": ["libc", "h1", "h2"], "h1": ["libc"], "h2": ["h1"], "other": ["libc"]}
    sizes = {"libc": 10_000_000, "app": 5_000_000, "h1": 100, "h2": 200, "other": 4_000_000}
    paths = closure(graph, sizes)
    plan = plan_layers(paths, [sp("app"), sp("other")], 3)
    check_plan(paths, plan, 3)
    assert sorted(layer.paths for layer in plan) == sorted([
        (sp("libc"),), (sp("app"),), tuple(sorted([sp("h1"), sp("h2"), sp("other")]))])
    # The same package in a smaller image under the same pressure keeps the same solo layers.
    alone = restrict(paths, [sp("app")])
    assert {(sp("libc"),), (sp("app"),)} <= {layer.paths for layer in plan_layers(alone, [sp("app")], 3)}


def test_equal_sizes_prefer_popular_paths():
    graph = {"base": [], "a": ["base"], "b": ["base"], "c": ["base"]}
    paths = closure(graph)  # every path the same size
    plan = plan_layers(paths, [sp("a"), sp("b"), sp("c")], 2)
    assert plan[0].paths == (sp("base"),)


def test_order_puts_dependencies_first_over_budget():
    paths = closure(PACKAGES, {"libc": 50_000_000, "openssl": 5_000_000})
    roots = [sp("git"), sp("htop"), sp("vim"), sp("bash")]
    for budget in (2, 4, 6, 8, 100):
        plan = plan_layers(paths, roots, budget)
        assert plan[0].paths == (sp("libc"),) or budget < 3
        assert_dependencies_first_unless_cyclic(paths, plan)


def test_empty_closure_and_bad_budget():
    assert plan_layers({}, [], 5) == []
    with pytest.raises(ValueError):
        plan_layers(closure({"a": []}), [sp("a")], 0)


def random_closure(rng: random.Random, count: int) -> tuple[dict[str, StorePath], list[str]]:
    """A random DAG: each node refers to some earlier ones (store references never cycle)."""
    graph: dict[str, list[str]] = {}
    names = [f"p{i}" for i in range(count)]
    for i, name in enumerate(names):
        graph[name] = rng.sample(names[:i], k=min(i, rng.choice([0, 1, 1, 2, 3, 5])))
    sizes = {n: rng.choice([0, 10, 1000, 10**6, 10**8]) for n in names}
    roots = rng.sample(names, k=rng.randint(1, min(5, count)))
    return closure(graph, sizes), [sp(r) for r in roots]


@pytest.mark.parametrize("seed", range(40))
def test_random_graphs(seed):
    rng = random.Random(seed)
    paths, roots = random_closure(rng, rng.randint(1, 250))
    for budget in (1, 2, 3, rng.randint(1, 120), 100):
        plan = plan_layers(paths, roots, budget)
        check_plan(paths, plan, budget)
        assert plan == plan_layers(dict(reversed(list(paths.items()))), roots, budget)
        if len(paths) <= budget:
            assert len(plan) == len(paths)
            assert_dependencies_first(paths, plan)
        elif budget > 1:
            assert len(plan) == budget  # merging stops as soon as the closure fits
        assert_dependencies_first_unless_cyclic(paths, plan)


def test_random_subsets_share_layers():
    """Two images drawn from one package set share the solo layers of every common path."""
    rng = random.Random(7)
    universe, _ = random_closure(rng, 300)
    everything = sorted(universe)
    for _ in range(20):
        roots_a, roots_b = rng.sample(everything, 3), rng.sample(everything, 3)
        a, b = restrict(universe, roots_a), restrict(universe, roots_b)
        plan_a, plan_b = plan_layers(a, roots_a, 300), plan_layers(b, roots_b, 300)
        keys_b = {layer.key for layer in plan_b}
        assert {layer.paths[0] for layer in plan_a if layer.key in keys_b} == set(a) & set(b)


def test_customisation_key_names_the_user_and_the_linked_packages_in_order():
    roots = ["/nix/store/aaaa-bash", "/nix/store/bbbb-hello"]
    key = customisation_key(roots, "root")
    assert key == customisation_key(list(roots), "root") and len(key) == 64
    assert len({key, customisation_key(roots, "nonroot"), customisation_key(roots[:1], "root"),
                layer_key(roots)}) == 4
