"""What package names resolved to, shared through the cache so later builds need no evaluation.

Facts keyed by content that never changes: "package" (per source revision, system and name: the
evaluation's answer, its runtime closure, its output tree) and "path" (per store path: NAR size,
hash, references). Bump FORMAT when their shape or nix/image.nix's answer changes. docs/design.md.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from .nix import StorePath, store_path_on_disk
from .sources import PackageSource

FORMAT = "resolution-v1"
PACKAGE = "package"
PATH = "path"

# A tree larger than this (in JSON bytes) is not recorded: such a package's output is
# realised when an image with it needs a new customisation layer.
MAX_TREE_BYTES = 256 * 1024


def package_key(source: PackageSource, system: str, name: str) -> str | None:
    """The fact key of requested `name` under `source` and `system`; None: nothing is recorded."""
    if source.revision is None:
        return None
    return json.dumps([FORMAT, source.revision, system, name], separators=(",", ":"))


def package_fact(resolved: dict, closure: Sequence[str], tree: dict | None) -> dict:
    return {"resolved": resolved, "closure": sorted(closure), "tree": tree}


def readable_package(fact: Mapping) -> bool:
    """Whether a package fact has the shape this code reads (a foreign or damaged one is ignored)."""
    resolved, closure, tree = fact.get("resolved"), fact.get("closure"), fact.get("tree")
    return (isinstance(resolved, dict) and isinstance(resolved.get("path"), str)
            and isinstance(resolved.get("attr"), str) and isinstance(closure, list)
            and resolved["path"] in closure and all(isinstance(p, str) for p in closure)
            and (tree is None or (isinstance(tree, dict) and isinstance(tree.get("entries", []), list))))


def path_fact(path: StorePath) -> dict:
    return {"narSize": path.nar_size, "narHash": path.nar_hash, "references": list(path.references)}


def store_path(path: str, fact: Mapping) -> StorePath:
    """The recorded facts of `path`; raises KeyError, TypeError or ValueError for a damaged fact."""
    return StorePath(path=path, nar_size=int(fact["narSize"]), nar_hash=str(fact.get("narHash") or ""),
                     references=tuple(sorted(str(r) for r in fact["references"] if r != path)))


# -- output trees: what the customisation layer reads of a package ---------------------


def closure_of(paths: Mapping[str, StorePath], root: str) -> list[str]:
    """`root` and every path it references, directly or not, among `paths`."""
    seen, todo = {root}, [root]
    while todo:
        for ref in paths[todo.pop()].references:
            if ref not in seen and ref in paths:
                seen.add(ref)
                todo.append(ref)
    return sorted(seen)


def tree_of(disk_root: str, max_bytes: int | None = MAX_TREE_BYTES) -> dict | None:
    """The names under a package output, as archive.customisation_entries walks them.

    {"dir": False} for a single-file output; else {"dir": True, "entries": [...]} with
    directories (real ones, not links to them) ending in "/". None when over `max_bytes` of JSON.
    """
    if not os.path.isdir(disk_root) or os.path.islink(disk_root):
        return {"dir": False}
    entries: list[str] = []

    def walk(disk: str, prefix: str) -> None:
        for child in sorted(os.listdir(disk)):
            full = os.path.join(disk, child)
            if os.path.isdir(full) and not os.path.islink(full):
                entries.append(prefix + child + "/")
                walk(full, prefix + child + "/")
            else:
                entries.append(prefix + child)

    walk(disk_root, "")
    tree = {"dir": True, "entries": entries}
    return tree if max_bytes is None or len(json.dumps(tree)) <= max_bytes else None


def make_skeleton(root: str, trees: Mapping[str, dict]) -> str:
    """A stand-in store under `root` holding each output's recorded tree, files empty.

    archive.customisation_entries reads only names and kinds, so over this skeleton it
    gives the same entries as over the real outputs, which need not be here. Returns
    `root`, to be passed as the store root.
    """
    for path, tree in trees.items():
        disk = store_path_on_disk(path, root)
        os.makedirs(os.path.dirname(disk), exist_ok=True)
        if not tree.get("dir"):
            open(disk, "wb").close()
            continue
        os.makedirs(disk, exist_ok=True)
        for entry in tree.get("entries", ()):
            name = os.path.normpath(entry)
            if name.startswith("..") or os.path.isabs(name):
                raise ValueError(f"bad tree entry {entry!r}")
            target = os.path.join(disk, name)
            if entry.endswith("/"):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "wb").close()
    return root
