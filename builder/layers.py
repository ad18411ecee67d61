"""Grouping a runtime closure into at most `budget` layers.

Anchors (store paths of `solo_bytes` or more, requested packages) get a layer of their own; each
smaller path shares a layer with the other small paths of one anchor reaching it (`_anchored`).
Over budget the `budget - 1` biggest groups keep their layer, the rest share one. Layers come
base-most first. Why, and what it was measured against: docs/design.md, "Layering".
"""
from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

# Part of every layer key: bump one when the bytes its layers hold change (tar format, file
# order; the customisation layer's links and users), so stale cached layers are never reused.
LAYER_FORMAT = "store-layer-v1"
CUSTOMISATION_FORMAT = "customisation-v2"  # v2: users, groups, nsswitch.conf


class StorePathInfo(Protocol):
    """The fields of `builder.nix.StorePath` this module reads."""

    path: str
    nar_size: int
    references: tuple[str, ...]


@dataclass(frozen=True)
class LayerPlan:
    paths: tuple[str, ...]  # sorted store paths in this layer
    key: str  # sha256 hex over the format version and the sorted paths
    size: int  # sum of nar sizes


def layer_key(paths: Sequence[str]) -> str:
    """A store-path layer's key: its format and its sorted paths."""
    return _key(LAYER_FORMAT, *sorted(paths))


def customisation_key(roots: Sequence[str], user: str) -> str:
    """The customisation layer's key: its format, the image's user and the packages it links."""
    return _key(CUSTOMISATION_FORMAT, user, *roots)


def _key(*lines: str) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def plan_layers(paths: Mapping[str, StorePathInfo], roots: Sequence[str], budget: int, *,
                solo_bytes: int) -> list[LayerPlan]:
    """The layers of the closure `paths` of the requested `roots`, base-most first (see the module)."""
    if budget < 1:
        raise ValueError("layer budget must be at least 1")
    if not paths:
        return []
    graph = _Graph(paths, roots)
    groups = _anchored(graph, solo_bytes)
    if len(groups) > budget:
        groups = _biggest_kept(graph, groups, budget)
    return [
        LayerPlan(tuple(sorted(graph.nodes[i] for i in group)), layer_key([graph.nodes[i] for i in group]),
                  sum(graph.sizes[i] for i in group))
        for group in _order(graph, groups)
    ]


class _Graph:
    """The closure as integer-indexed adjacency lists, with depth and popularity."""

    def __init__(self, paths: Mapping[str, StorePathInfo], roots: Sequence[str]):
        self.nodes = sorted(paths)
        index = {p: i for i, p in enumerate(self.nodes)}
        self.sizes = [paths[p].nar_size for p in self.nodes]
        # References outside the closure (should not happen) and self references are dropped.
        self.refs = [sorted({index[r] for r in paths[p].references if r in index and r != p}) for p in self.nodes]
        self.referrers: list[list[int]] = [[] for _ in self.nodes]
        for i, refs in enumerate(self.refs):
            for r in refs:
                self.referrers[r].append(i)
        root_set = {index[r] for r in roots if r in index}
        # Anything nobody in the closure refers to is a root as well, so every path is reachable.
        root_set.update(i for i, rs in enumerate(self.referrers) if not rs)
        self.roots = sorted(root_set)
        self.order = self._postorder()  # dependencies before dependents
        self.depth = self._depth()
        self.popularity = self._popularity()
        self.closure_size = self._closure_size()

    def _postorder(self) -> list[int]:
        seen = [False] * len(self.nodes)
        order: list[int] = []
        starts = self.roots + list(range(len(self.nodes)))  # the tail catches cycles unreachable from roots
        for start in starts:
            if seen[start]:
                continue
            seen[start] = True
            stack = [(start, iter(self.refs[start]))]
            while stack:
                node, children = stack[-1]
                for child in children:
                    if not seen[child]:
                        seen[child] = True
                        stack.append((child, iter(self.refs[child])))
                        break
                else:
                    stack.pop()
                    order.append(node)
        return order

    def _depth(self) -> list[int]:
        depth = [0] * len(self.nodes)
        for node in self.order:
            depth[node] = 1 + max((depth[r] for r in self.refs[node]), default=-1)
        return depth

    def _popularity(self) -> list[int]:
        """How many paths of the closure (itself included) have this path in their closure."""
        above = [0] * len(self.nodes)  # bitset of transitive referrers
        for node in reversed(self.order):
            bits = 1 << node
            for referrer in self.referrers[node]:
                bits |= above[referrer]
            above[node] = bits
        return [bits.bit_count() for bits in above]

    def _closure_size(self) -> list[int]:
        """How many paths (itself included) this path's closure holds: the same in every image."""
        below = [0] * len(self.nodes)
        for node in self.order:
            bits = 1 << node
            for r in self.refs[node]:
                bits |= below[r]
            below[node] = bits
        return [bits.bit_count() for bits in below]


def _anchored(graph: _Graph, solo_bytes: int) -> list[list[int]]:
    """Anchors alone; every other path grouped by its owner: of the anchors reaching it through
    non-anchors only, the one with the biggest closure (usually the requested package needing it).

    An anchor's own layer never depends on what it owns, so big paths are shared as before; which
    anchor owns a small path can differ between images (docs/design.md says what that costs).
    `solo_bytes=0` makes every path an anchor: the earlier rule.
    """
    anchor = [size >= solo_bytes for size in graph.sizes]
    for root in graph.roots:
        anchor[root] = True
    owner = [-1] * len(graph.nodes)
    for node in reversed(graph.order):  # referrers before what they refer to
        if anchor[node]:
            continue
        for referrer in graph.referrers[node]:
            candidate = referrer if anchor[referrer] else owner[referrer]
            if candidate >= 0 and (owner[node] < 0 or (graph.closure_size[candidate], candidate)
                                   > (graph.closure_size[owner[node]], owner[node])):
                owner[node] = candidate
        if owner[node] < 0:  # only inside a reference cycle nothing else reaches
            anchor[node] = True
    owned: dict[int, list[int]] = {}
    for node in range(len(graph.nodes)):
        if not anchor[node]:
            owned.setdefault(owner[node], []).append(node)
    return [[node] for node in range(len(graph.nodes)) if anchor[node]] + [owned[a] for a in sorted(owned)]


def _biggest_kept(graph: _Graph, groups: list[list[int]], budget: int) -> list[list[int]]:
    """The `budget - 1` biggest groups (ties: the more popular, then the first name) and one remainder."""
    ranked = sorted(groups, key=lambda g: (-sum(graph.sizes[i] for i in g), -max(graph.popularity[i] for i in g),
                                           min(g)))
    return ranked[: budget - 1] + [sorted(i for g in ranked[budget - 1:] for i in g)]


def _order(graph: _Graph, groups: list[list[int]]) -> list[list[int]]:
    """Groups in dependency order (base-most first), deterministically.

    Groups that need each other (a cycle through the remainder layer) are
    condensed into one unit; units go in topological order, the shallowest
    ready unit first, and the groups of a unit by depth.
    """
    group_of = [0] * len(graph.nodes)
    for g, members in enumerate(groups):
        for node in members:
            group_of[node] = g
    deps: list[list[int]] = [[] for _ in groups]
    for node, refs in enumerate(graph.refs):
        for r in refs:
            if group_of[r] != group_of[node]:
                deps[group_of[node]].append(group_of[r])
    deps = [sorted(set(ds)) for ds in deps]
    rank = [(max(graph.depth[n] for n in members), min(graph.nodes[n] for n in members)) for members in groups]

    unit_of, units = _strongly_connected(deps)
    unit_deps: list[set[int]] = [set() for _ in units]
    dependents: list[set[int]] = [set() for _ in units]
    for g, ds in enumerate(deps):
        for d in ds:
            if unit_of[d] != unit_of[g]:
                unit_deps[unit_of[g]].add(unit_of[d])
                dependents[unit_of[d]].add(unit_of[g])
    unit_rank = [min(rank[g] for g in members) for members in units]
    waiting = [len(ds) for ds in unit_deps]
    ready = [(unit_rank[u], u) for u in range(len(units)) if not waiting[u]]
    heapq.heapify(ready)
    result: list[list[int]] = []
    while ready:
        _, u = heapq.heappop(ready)
        result.extend(groups[g] for g in sorted(units[u], key=lambda g: rank[g]))
        for dependent in dependents[u]:
            waiting[dependent] -= 1
            if not waiting[dependent]:
                heapq.heappush(ready, (unit_rank[dependent], dependent))
    return result


def _strongly_connected(edges: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Tarjan's algorithm, iterative: (component of each vertex, members of each component)."""
    index = [-1] * len(edges)
    low = [0] * len(edges)
    on_stack = [False] * len(edges)
    stack: list[int] = []
    component = [-1] * len(edges)
    components: list[list[int]] = []
    counter = 0
    for start in range(len(edges)):
        if index[start] != -1:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            recurse = False
            for j in range(i, len(edges[v])):
                w = edges[v][j]
                if index[w] == -1:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    recurse = True
                    break
                if on_stack[w]:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                members = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    component[w] = len(components)
                    members.append(w)
                    if w == v:
                        break
                components.append(members)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return component, components
