"""A generated package set with nixpkgs' shape, for benchmarks: many files, a deep import graph, a shared base.

`generate(folder, files)` writes a set called like nixpkgs (`import ./. { system; config; overlays; }`):
- `lib/`: a library of a few hundred modules, imported as one attribute set (as nixpkgs' lib);
- `pkgs/stdenv/`: a shared base that every package forces, built in stages that import the
  previous stage (a deep import graph, like stdenv's bootstrap), each stage computing with lib;
- `pkgs/by-name/`: `files` small package files, listed in `pkgs/top-level/all-packages.nix`
  (evaluated lazily, as nixpkgs' are: only requested ones are read);
- the demo set's packages (nix/demo, copied in) as the real outputs, each behind the base, so
  their store paths are those of the demo set (and of a binary cache made from it).
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "nix" / "demo"
DEMO_PACKAGES = ("hello", "goodbye", "coreutils", "bashInteractive", "moreutils", "nano", "cacert", "iana-etc",
                 "busybox", "tools", "bigPackage")


def generate(folder: Path, files: int = 40000, stages: int = 40, stage_width: int = 40, lib_modules: int = 300,
             work: int = 60, seed: int = 1) -> Path:
    """Write the set into `folder` (created); returns it. `work` scales each base file's computation."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    shutil.copytree(DEMO, folder / "demo")

    lib = folder / "lib"
    lib.mkdir()
    for m in range(lib_modules):
        (lib / f"m{m:03d}.nix").write_text(
            f"# lib module {m}\n{{ prev }}: {{\n"
            f"  add{m} = a: b: a + b + {m};\n"
            f"  join{m} = sep: xs: builtins.concatStringsSep sep (map toString xs);\n"
            f"  range{m} = n: builtins.genList (i: i + {m}) n;\n"
            f"  fold{m} = f: z: xs: builtins.foldl' f z xs;\n"
            f"}}\n")
    (lib / "default.nix").write_text(
        "# the library: every module merged, each seeing the ones before\n"
        "builtins.foldl' (prev: m: prev // import m { inherit prev; }) { } [\n"
        + "".join(f"  ./m{m:03d}.nix\n" for m in range(lib_modules)) + "]\n")

    stdenv = folder / "pkgs" / "stdenv"
    stdenv.mkdir(parents=True)
    for s in range(stages):
        stage = stdenv / f"stage{s:02d}"
        stage.mkdir()
        for w in range(stage_width):
            m = rng.randrange(lib_modules)
            (stage / f"f{w:02d}.nix").write_text(
                f"{{ lib, prev }}:\nlet xs = lib.range{m} {work}; in {{\n"
                f"  v{s}_{w} = lib.fold{m} (a: x: lib.add{m} a x) (prev.seed or 0) xs;\n"
                f"  s{s}_{w} = builtins.substring 0 16 (builtins.hashString \"sha256\" (lib.join{m} \"-\" xs));\n"
                f"}}\n")
        previous = f"import ../stage{s - 1:02d} {{ inherit lib; }}" if s else "{ seed = 1; }"
        (stage / "default.nix").write_text(
            f"# stage {s}: built from the stage before\n{{ lib }}:\nlet prev = {previous}; in\n"
            "builtins.foldl' (acc: f: acc // import f { inherit lib; prev = acc; }) prev [\n"
            + "".join(f"  ./f{w:02d}.nix\n" for w in range(stage_width)) + "]\n")
    (stdenv / "default.nix").write_text(
        f"{{ lib }}:\nlet final = import ./stage{stages - 1:02d} {{ inherit lib; }}; in\n"
        "{ ready = builtins.deepSeq final true; attrs = builtins.length (builtins.attrNames final); }\n")

    by_name = folder / "pkgs" / "by-name"
    listing = []
    for n in range(files):
        name = f"p{n}"
        shard = f"{n % 256:02x}"
        package = by_name / shard / name / "package.nix"
        package.parent.mkdir(parents=True, exist_ok=True)
        deps = " ".join(f"p{rng.randrange(files)}" for _ in range(3))
        package.write_text(
            f"{{ base, demo, lib, ... }}:\n# generated package {n}; depends on {deps}\n"
            f"builtins.seq base.ready (demo.hello // {{ pname = \"{name}\"; version = \"1.{n % 10}\"; }})\n")
        listing.append(f"  {name} = callPackage ../by-name/{shard}/{name}/package.nix {{ }};\n")
    top = folder / "pkgs" / "top-level"
    top.mkdir(parents=True)
    (top / "all-packages.nix").write_text("{ callPackage }:\n{\n" + "".join(listing) + "}\n")

    real = "".join(f"    {attr} = builtins.seq base.ready demo.{attr};\n" for attr in DEMO_PACKAGES)
    (folder / "default.nix").write_text(
        "# called like nixpkgs\n{ system ? builtins.currentSystem, config ? { }, overlays ? [ ] }:\n"
        "let\n  lib = import ./lib;\n  base = import ./pkgs/stdenv { inherit lib; };\n"
        "  demo = import ./demo { inherit system; };\n"
        "  callPackage = path: args: import path ({ inherit lib base demo; } // args);\n"
        "  all = import ./pkgs/top-level/all-packages.nix { inherit callPackage; };\nin\n"
        "all // {\n" + real + "  }\n")
    return folder
