# Resolve the package names of one image against a package set.
#
# Everything a client sent arrives as JSON strings (`--argstr`) and is only
# ever parsed with `builtins.fromJSON`: no client text becomes Nix code.
#
#   nix-instantiate --eval --strict --json --read-write-mode nix/image.nix \
#     --argstr packagesJson '["git", "htop"]' \
#     --argstr sourceJson '{"kind": "path", "path": "/abs/nix/demo"}' \
#     --argstr system x86_64-linux
#
# The answer is data, never an evaluation error, for names that do not exist
# or fail to evaluate with `throw`/`assert` (how nixpkgs marks broken, unfree
# or insecure packages):
#
#   { packages = { "<name>" = { attr; drvPath; path; outputName; info; sourceTime; }; };
#     unknown = [ "<name>" ... ];   # no such attribute, or not a package
#     failed = [ "<name>" ... ]; }  # evaluating the package threw
#
# With `strict = true` evaluation is not guarded, so that evaluating one failed
# name alone shows the error message Nix gives for it.
{ packagesJson
, sourceJson
, system ? builtins.currentSystem
, strict ? false
}:

let
  names = builtins.fromJSON packagesJson;
  source = builtins.fromJSON sourceJson;

  src =
    if source.kind == "path" then
      # An absolute path string; `/. + path` turns it into a path value.
      /. + source.path
    else if source.kind == "git" then
      builtins.fetchGit ({ url = source.url; rev = source.rev; }
        // (if source.ref or null != null then { ref = source.ref; } else { allRefs = true; }))
    else if source.kind == "channel" then
      builtins.fetchTarball ({ url = source.url; }
        // (if source.sha256 or null != null then { sha256 = source.sha256; } else { }))
    else
      throw "unknown package source kind '${source.kind}'";

  imported = import src;

  # nixpkgs takes `config` and `overlays`; pass them empty so the host's
  # ~/.config/nixpkgs cannot change what an image contains. Smaller sets
  # (like the demo set) may not accept them.
  accepted = builtins.functionArgs imported;
  callArgs = { inherit system; }
    // (if accepted ? config then { config = { }; } else { })
    // (if accepted ? overlays then { overlays = [ ]; } else { });
  pkgs = if builtins.isFunction imported then imported callArgs else imported;

  lower = builtins.replaceStrings
    [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ]
    [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];

  isDigit = c: builtins.elem c [ "0" "1" "2" "3" "4" "5" "6" "7" "8" "9" ];

  # Attribute names are never valid Nix identifiers when they start with a
  # digit, so nixpkgs spells them with a leading underscore (`_7zz`).
  candidates = name:
    [ name ] ++ (if name != "" && isDigit (builtins.substring 0 1 name) then [ "_${name}" ] else [ ]);

  # The attribute of `set` that `name` means: exact first, then with a digit
  # prefix fixed, then ignoring case. Only names with upper-case letters go
  # into the case map, which keeps it small even for nixpkgs.
  findAttr = set: name:
    let
      wanted = map lower (candidates name);
      exact = builtins.filter (c: builtins.hasAttr c set) (candidates name ++ wanted);
      folded = builtins.filter (a: a != lower a && builtins.elem (lower a) wanted) (builtins.attrNames set);
    in
    if exact != [ ] then builtins.head exact
    else if folded != [ ] then builtins.head folded
    else null;

  splitDots = s: builtins.filter builtins.isString (builtins.split "\\." s);

  # Walk a dotted attribute path; { attr, value } or null.
  resolve = name:
    let
      step = acc: part:
        if acc == null then null
        else
          let
            value = acc.value;
            isSet = builtins.tryEval (builtins.isAttrs value);
            attr = if isSet.success && isSet.value then findAttr value part else null;
          in
          if attr == null then null
          else { path = acc.path ++ [ attr ]; value = value.${attr}; };
      found = builtins.foldl' step { path = [ ]; value = pkgs; } (splitDots name);
    in
    if found == null || found.path == [ ] then null
    else { attr = builtins.concatStringsSep "." found.path; inherit (found) value; };

  isPackage = v: builtins.isAttrs v && (v.type or null) == "derivation";

  describe = attr: v: {
    inherit attr;
    drvPath = v.drvPath;
    # Not `outPath`: builtins.toJSON would print such a set as that string.
    path = v.outPath;
    outputName = v.outputName or "out";
    info = packageInfo v;
    inherit sourceTime;
  };

  # When the package set's commit was made (unix seconds), where the fetcher
  # knows it (fetchGit's lastModified); null for paths and tarballs.
  sourceTime = if builtins.isAttrs src then src.lastModified or null else null;

  # What the image's labels, default command and SBOM say about a package, from
  # the attributes nixpkgs gives it: pname, version, meta.{mainProgram, license,
  # description, homepage}. Every field may be missing or odd (a license given
  # as a string, a homepage as a list), and reading meta must never fail a
  # build: anything unreadable is null.
  orNull = check: v: if check v then v else null;
  str = orNull builtins.isString;
  firstStr = v: if builtins.isList v then (if v == [ ] then null else str (builtins.head v)) else str v;
  license = l:
    if builtins.isAttrs l then { spdxId = str (l.spdxId or null); name = str (l.fullName or l.shortName or null); }
    else if builtins.isString l then { spdxId = null; name = l; }
    else null;
  licenses = l: builtins.filter (x: x != null) (map license (if builtins.isList l then l else [ l ]));
  guarded = value: let r = builtins.tryEval (builtins.deepSeq value value); in if r.success then r.value else null;
  packageInfo = v:
    let
      isSet = builtins.tryEval (builtins.isAttrs (v.meta or null));
      m = if isSet.success && isSet.value then v.meta else { };
    in {
      pname = guarded (str (v.pname or null));
      version = guarded (str (v.version or null));
      mainProgram = guarded (str (m.mainProgram or null));
      description = guarded (str (m.description or null));
      homepage = guarded (firstStr (m.homepage or null));
      licenses = let l = guarded (licenses (m.license or [ ])); in if l == null then [ ] else l;
    };

  classify = name:
    let
      found = resolve name;
      described = describe found.attr found.value;
      # Forcing the paths evaluates the derivation, where nixpkgs throws for
      # broken, unfree or insecure packages.
      forced = builtins.deepSeq [ described.drvPath described.path ] described;
      pkg = builtins.tryEval (isPackage found.value);
      info = builtins.tryEval forced;
    in
    if found == null then { kind = "unknown"; }
    else if strict then
      (if isPackage found.value then { kind = "package"; value = forced; } else { kind = "unknown"; })
    else if !pkg.success then { kind = "failed"; }
    else if !pkg.value then { kind = "unknown"; }
    else if !info.success then { kind = "failed"; }
    else { kind = "package"; value = info.value; };

  results = map (name: { inherit name; result = classify name; }) names;
  pick = kind: builtins.filter (r: r.result.kind == kind) results;
in
{
  # Forces loading the package set even for no names: a set that does not
  # load fails here, whatever was asked.
  loaded = builtins.isAttrs pkgs;
  packages = builtins.listToAttrs (map (r: { inherit (r) name; value = r.result.value; }) (pick "package"));
  unknown = map (r: r.name) (pick "unknown");
  failed = map (r: r.name) (pick "failed");
}
