"""Layer planning on synthetic closures (pure logic)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from builder import layers
from builder.config import Config
from builder.layers import LayerPlan, customisation_key, layer_key

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast

SOLO = Config.layer_solo_bytes  # the deployed default: 1 MiB
MiB = 1 << 20


def plan_layers(paths, roots, budget, solo_bytes=SOLO) -> list[LayerPlan]:
    return layers.plan_layers(paths, roots, budget, solo_bytes=solo_bytes)


def solo_paths(plan: list[LayerPlan]) -> set[str]:
    return {layer.paths[0] for layer in plan if len(layer.paths) == 1}


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


def test_solo_bytes_zero_gives_every_path_a_layer_of_its_own_under_budget():
    paths = closure(PACKAGES)
    plan = plan_layers(paths, [sp("git"), sp("htop")], 100, solo_bytes=0)
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
    keys_one = {layer.key: layer.paths for layer in plan_layers(one, [sp("git"), sp("htop")], 100, 0)}
    keys_two = {layer.key: layer.paths for layer in plan_layers(two, [sp("curl"), sp("vim"), sp("bash")], 100, 0)}
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
    for solo_bytes in (0, SOLO):
        groups = len(plan_layers(paths, roots, 10**6, solo_bytes))  # the layers with no budget pressure
        assert groups == len(paths) or solo_bytes
        for budget in (1, 2, 3, rng.randint(1, 120), 100):
            plan = plan_layers(paths, roots, budget, solo_bytes)
            check_plan(paths, plan, budget)
            assert plan == plan_layers(dict(reversed(list(paths.items()))), list(reversed(roots)), budget, solo_bytes)
            assert len(plan) == min(groups, budget)  # merging stops as soon as the closure fits
            if len(paths) <= budget and not solo_bytes:
                assert_dependencies_first(paths, plan)
            assert_dependencies_first_unless_cyclic(paths, plan)


def image_pairs(count: int = 20):
    """Pairs of images (closure, roots) of three packages each, drawn from one package set."""
    rng = random.Random(7)
    universe, _ = random_closure(rng, 300)
    everything = sorted(universe)
    for _ in range(count):
        roots_a, roots_b = rng.sample(everything, 3), rng.sample(everything, 3)
        yield restrict(universe, roots_a), roots_a, restrict(universe, roots_b), roots_b


def test_random_subsets_share_layers_with_solo_bytes_zero():
    """Two images drawn from one package set share the solo layers of every common path."""
    for a, roots_a, b, roots_b in image_pairs():
        plan_a, plan_b = plan_layers(a, roots_a, 300, 0), plan_layers(b, roots_b, 300, 0)
        keys_b = {layer.key for layer in plan_b}
        assert {layer.paths[0] for layer in plan_a if layer.key in keys_b} == set(a) & set(b)


def test_random_subsets_share_the_layer_of_every_common_anchor():
    """An anchor's layer depends on nothing but the path: any two images holding a path of
    `solo_bytes` or more, or requesting the same package, share its layer."""
    for a, roots_a, b, roots_b in image_pairs():
        keys_b = {layer.key for layer in plan_layers(b, roots_b, 300)}
        anchors = {p for p in set(a) & set(b) if a[p].nar_size >= SOLO} | (set(roots_a) & set(roots_b))
        assert anchors <= {p for layer in plan_layers(a, roots_a, 300) if layer.key in keys_b for p in layer.paths}
        assert anchors <= solo_paths(plan_layers(a, roots_a, 300))


# An app with small helpers, on a small language runtime's stack: sizes as nixpkgs reports them.
STACK = {
    "glibc": [], "libgcc": [], "zlib": ["glibc"], "libffi": ["glibc"], "expat": ["glibc"],
    "python": ["glibc", "zlib", "libffi", "expat"],
    "app": ["python", "glibc", "zlib", "app-data", "app-wrapper"], "app-data": [], "app-wrapper": ["app-data"],
    "tool": ["glibc", "zlib", "libgcc"],
}
STACK_SIZES = {"glibc": 30 * MiB, "libgcc": 140_000, "zlib": 130_000, "libffi": 60_000, "expat": 250_000,
               "python": 100 * MiB, "app": 3 * MiB, "app-data": 80_000, "app-wrapper": 2_000, "tool": 200_000}


def layers_of(roots: list[str], budget: int = 100) -> set[tuple[str, ...]]:
    universe = closure(STACK, STACK_SIZES)
    paths = restrict(universe, [sp(r) for r in roots])
    plan = plan_layers(paths, [sp(r) for r in roots], budget)
    check_plan(paths, plan, budget)
    return {layer.paths for layer in plan}


def names(*items: str) -> tuple[str, ...]:
    return tuple(sorted(sp(n) for n in items))


def test_big_paths_and_requested_packages_get_a_layer_of_their_own():
    assert {names("glibc"), names("python"), names("app"), names("tool")} <= layers_of(["app", "tool"])
    assert names("tool") in layers_of(["tool"])  # 200 kB, but asked for


def test_small_paths_share_one_layer_per_package_that_needs_them():
    # The app's data and wrapper travel together; python's small libraries travel together.
    assert layers_of(["app"]) == {names("glibc"), names("python"), names("app"), names("app-data", "app-wrapper", "zlib"),
                                  names("libffi", "expat")}


def test_a_small_path_reached_only_through_a_big_one_goes_with_the_big_one():
    # libffi and expat are reached through python alone: one layer in every image asking for the app.
    assert names("libffi", "expat") in layers_of(["app"]) & layers_of(["app", "tool"])
    # Where nothing else needs zlib, python owns it too: the grouping is per image (the price of fewer layers).
    assert names("libffi", "expat", "zlib") in layers_of(["python"])


def test_a_small_path_two_packages_need_goes_with_the_one_of_bigger_closure():
    # zlib is reached from app (closure of 9 paths) and tool (4): it goes with app; tool keeps libgcc.
    both = layers_of(["app", "tool"])
    assert names("app-data", "app-wrapper", "zlib") in both and names("libgcc") in both


def test_an_anchor_layer_is_the_same_whatever_it_owns():
    universe = closure(STACK, STACK_SIZES)
    keys = []
    for roots in (["app"], ["app", "tool"], ["tool"]):
        paths = restrict(universe, [sp(r) for r in roots])
        keys.append({layer.paths: layer.key for layer in plan_layers(paths, [sp(r) for r in roots], 100)})
    assert keys[0][names("glibc")] == keys[1][names("glibc")] == keys[2][names("glibc")] == layer_key([sp("glibc")])
    assert keys[0][names("app")] == keys[1][names("app")]


def test_over_budget_the_biggest_groups_keep_their_layer():
    assert layers_of(["app", "tool"], 4) == {names("glibc"), names("python"), names("app"), names(
        "tool", "libgcc", "zlib", "app-data", "app-wrapper", "libffi", "expat")}


def test_customisation_key_names_the_user_and_the_linked_packages_in_order():
    roots = ["/nix/store/aaaa-bash", "/nix/store/bbbb-hello"]
    key = customisation_key(roots, "root")
    assert key == customisation_key(list(roots), "root") and len(key) == 64
    assert len({key, customisation_key(roots, "nonroot"), customisation_key(roots[:1], "root"),
                layer_key(roots)}) == 4
