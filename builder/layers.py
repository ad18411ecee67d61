"""Grouping a runtime closure into at most `budget` layers.

Under budget every store path is a layer of its own; over budget the `budget - 1` biggest
paths keep their own layer and the rest share one remainder layer, so a path's layer depends
as little as possible on the rest of the image. Layers come base-most first. Why size ranking,
and what it was measured against: docs/design.md, "Layering".
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


def plan_layers(paths: Mapping[str, StorePathInfo], roots: Sequence[str], budget: int) -> list[LayerPlan]:
    if budget < 1:
        raise ValueError("layer budget must be at least 1")
    if not paths:
        return []
    graph = _Graph(paths, roots)
    if len(graph.nodes) <= budget:
        groups = [[i] for i in range(len(graph.nodes))]
    else:
        groups = _biggest_solo(graph, budget)
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


def _biggest_solo(graph: _Graph, budget: int) -> list[list[int]]:
    ranked = sorted(range(len(graph.nodes)), key=lambda i: (-graph.sizes[i], -graph.popularity[i], graph.nodes[i]))
    return [[i] for i in ranked[: budget - 1]] + [ranked[budget - 1:]]


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
