# The offline demo package set: a tiny stand-in for nixpkgs.
#
# Called like nixpkgs (`import ./nix/demo { system = "x86_64-linux"; }`), it
# returns an attribute set of packages built with `builtins.derivation` from the
# host's static busybox, so the registry can be developed and tested without a
# binary cache or a network. Outputs are shell scripts and busybox links with
# real runtime references between them, so images run in a chroot.
#
# Every derivation is built for `system`, so each platform has its own store
# paths (and `busybox` records the system in `share/busybox/system`). The
# builder is always the host's busybox: for a foreign system Nix runs it only
# with `extra-platforms` set (the registry's NIX_EXTRA_PLATFORMS), and the
# outputs of a foreign system hold host binaries: a stand-in, for tests that
# read files rather than run them. `cpuid` exists on x86_64-linux only.
{ system ? builtins.currentSystem, ... }:

let

  # The busybox binary must live in a directory: a store path that is the
  # binary itself is named `<hash>-busybox` and busybox then looks for an
  # applet of that name. /usr/bin rather than /bin: on merged-/usr systems
  # /bin is a symlink, and importing it stores the link.
  busyboxDir = builtins.path {
    path = /usr/bin;
    name = "busybox";
    filter = p: t: baseNameOf p == "busybox";
  };

  # Every builder is `busybox sh -e -c SCRIPT`; the preamble puts busybox's
  # applets on PATH so scripts read like ordinary shell.
  preamble = ''
    ${busyboxDir}/busybox mkdir -p "$TMPDIR/.bin"
    ${busyboxDir}/busybox --install -s "$TMPDIR/.bin"
    export PATH="$TMPDIR/.bin"
  '';

  mkDerivation = name: script: extra: derivation ({
    inherit name system;
    builder = "${busyboxDir}/busybox";
    args = [ "sh" "-e" "-c" (preamble + script) ];
  } // extra);

  # A package whose only content is one executable script.
  mkScript = name: file: text: mkDerivation name ''
    mkdir -p "$out/$(dirname ${file})"
    cat > "$out/${file}" <<'EOF'
    ${text}
    EOF
    chmod 555 "$out/${file}"
  '' { };

  # Deterministic, incompressible bytes from busybox alone. awk is slow
  # (~1 MB/s), so it makes one 1 MiB block from SEED (awk's srand) and every further
  # block is the previous one with each byte value rotated by one (`tr`).
  # Blocks repeat only every 256 MiB, far beyond gzip's 32 KiB window.
  # genBytes SEED COUNT DIR writes COUNT files of 1 MiB each into DIR.
  genBytes = ''
    genBytes() {
      seed=$1 count=$2 dir=$3
      mkdir -p "$dir"
      awk -v seed="$seed" 'BEGIN {
        srand(seed)
        for (i = 0; i < 131072; i++)
          printf "%04x%04x%04x%04x\n", int(rand() * 65536), int(rand() * 65536), int(rand() * 65536), int(rand() * 65536)
      }' | xxd -r -p > "$TMPDIR/block"
      i=0
      while [ "$i" -lt "$count" ]; do
        name=$(printf 'part-%04d.bin' "$i")
        cp "$TMPDIR/block" "$dir/$name"
        tr '\000-\377' '\001-\377\000' < "$TMPDIR/block" > "$TMPDIR/next"
        mv "$TMPDIR/next" "$TMPDIR/block"
        i=$((i + 1))
      done
    }
  '';

  mkBytes = name: seed: mebibytes: mkDerivation name (genBytes + ''
    genBytes ${toString seed} ${toString mebibytes} "$out/share/${name}"
  '') { };

  busybox = mkDerivation "busybox-1.35.0" ''
    mkdir -p "$out/bin"
    cp ${busyboxDir}/busybox "$out/bin/busybox"
    chmod 555 "$out/bin/busybox"
    mkdir -p "$out/share/busybox"
    echo ${system} > "$out/share/busybox/system"
    for applet in $(busybox --list); do
      [ "$applet" = busybox ] || ln -s busybox "$out/bin/$applet"
    done
  '' { };

  sh = "${busybox}/bin/sh";

  # nixpkgs' packages carry `pname`, `version` and `meta` next to the
  # derivation; the registry reads them for an image's labels, its default
  # command (`meta.mainProgram`) and its SBOM. Attributes added with `//` do
  # not change the derivation, so store paths stay as they are.
  described = pname: version: meta: drv: drv // { inherit pname version meta; };

  licenses = {
    gpl2Only = { spdxId = "GPL-2.0-only"; fullName = "GNU General Public License v2.0 only"; };
    gpl2Plus = { spdxId = "GPL-2.0-or-later"; fullName = "GNU General Public License v2.0 or later"; };
    gpl3Plus = { spdxId = "GPL-3.0-or-later"; fullName = "GNU General Public License v3.0 or later"; };
    lgpl21Plus = { spdxId = "LGPL-2.1-or-later"; fullName = "GNU Lesser General Public License v2.1 or later"; };
    mit = { spdxId = "MIT"; fullName = "MIT License"; };
    mpl20 = { spdxId = "MPL-2.0"; fullName = "Mozilla Public License 2.0"; };
  };

  libgreeting = mkDerivation "libgreeting-1.0" ''
    mkdir -p "$out/lib" "$out/share/libgreeting"
    cat > "$out/lib/greeting.sh" <<'EOF'
    # greet WORD: print "WORD, world!"
    greet() { ${busybox}/bin/printf '%s, world!\n' "$1"; }
    EOF
    echo "libgreeting 1.0: greetings for the whole world" > "$out/share/libgreeting/README"
  '' { };

  greeter = pname: version: word: mkScript "${pname}-${version}" "bin/${pname}" ''
    #!${sh}
    . ${libgreeting}/lib/greeting.sh
    greet '${word}'
  '';

  hello = described "hello" "2.12.1" {
    description = "A program that produces a familiar, friendly greeting";
    homepage = "https://www.gnu.org/software/hello/";
    license = licenses.gpl3Plus;
    mainProgram = "hello";
  } (greeter "hello" "2.12.1" "Hello");
  goodbye = described "goodbye" "1.0" {
    description = "Says goodbye to the world (demo)";
    license = licenses.mit;
    mainProgram = "goodbye";
  } (greeter "goodbye" "1.0" "Goodbye");

  coreutilsApplets = [
    "[" "basename" "cat" "chmod" "chown" "cp" "cut" "date" "dd" "df" "dirname" "du"
    "echo" "env" "expr" "false" "head" "id" "ln" "ls" "md5sum" "mkdir" "mktemp" "mv"
    "nproc" "printf" "pwd" "readlink" "realpath" "rm" "rmdir" "seq" "sha256sum" "sleep"
    "sort" "stat" "tail" "tee" "test" "touch" "tr" "true" "uname" "uniq" "wc" "whoami" "yes"
  ];

  coreutils = mkDerivation "coreutils-9.1" ''
    mkdir -p "$out/bin"
    for applet in ${toString (map (a: "'${a}'") coreutilsApplets)}; do
      ln -s ${busybox}/bin/busybox "$out/bin/$applet"
    done
  '' { };

  bashInteractive = mkDerivation "bash-interactive-5.2" ''
    mkdir -p "$out/bin"
    for name in bash sh; do
      cat > "$out/bin/$name" <<'EOF'
    #!${sh}
    exec ${busybox}/bin/busybox sh "$@"
    EOF
      chmod 555 "$out/bin/$name"
    done
  '' { };

  moreutils = mkDerivation "moreutils-0.67" ''
    mkdir -p "$out/bin"
    cat > "$out/bin/sponge" <<'EOF'
    #!${sh}
    # sponge [FILE]: soak up standard input, then write it to FILE (or stdout).
    tmp=$(${busybox}/bin/mktemp)
    ${busybox}/bin/cat > "$tmp"
    if [ -n "$1" ]; then ${busybox}/bin/cat "$tmp" > "$1"; else ${busybox}/bin/cat "$tmp"; fi
    ${busybox}/bin/rm -f "$tmp"
    EOF
    chmod 555 "$out/bin/sponge"
    ln -s ${busybox}/bin/busybox "$out/bin/ts"
  '' { };

  nano = mkScript "nano-7.2" "bin/nano" ''
    #!${sh}
    exec ${busybox}/bin/vi "$@"
  '';

  cacert = mkDerivation "nss-cacert-3.92" ''
    mkdir -p "$out/etc/ssl/certs"
    cat > "$out/etc/ssl/certs/ca-bundle.crt" <<'EOF'
    # Demo CA bundle: not a real certificate authority.
    -----BEGIN CERTIFICATE-----
    MIIBszCCAVmgAwIBAgIUZGVtby1jZXJ0aWZpY2F0ZS1ub3QtcmVhbDAKBggqhkjO
    PQQDAjAvMS0wKwYDVQQDDCROaXhlcnkgRGVtbyBSb290IChub3QgYSByZWFsIENB
    KTAeFw0yNDAxMDEwMDAwMDBaFw0zNDAxMDEwMDAwMDBaMC8xLTArBgNVBAMMJE5p
    eGVyeSBEZW1vIFJvb3QgKG5vdCBhIHJlYWwgQ0EpMFkwEwYHKoZIzj0CAQYIKoZI
    zj0DAQcDQgAEZGVtb2RlbW9kZW1vZGVtb2RlbW9kZW1vZGVtb2RlbW9kZW1vZGVt
    b2RlbW9kZW1vZGVtb2RlbW9kZW1vZGVtb2RlbW9kZW1vo1MwUTAdBgNVHQ4EFgQU
    -----END CERTIFICATE-----
    EOF
    ln -s ca-bundle.crt "$out/etc/ssl/certs/ca-certificates.crt"
  '' { };

  iana-etc = mkDerivation "iana-etc-20231227" ''
    mkdir -p "$out/etc"
    cat > "$out/etc/protocols" <<'EOF'
    ip	0	IP
    icmp	1	ICMP
    tcp	6	TCP
    udp	17	UDP
    ipv6-icmp	58	IPv6-ICMP
    EOF
    cat > "$out/etc/services" <<'EOF'
    ssh	22/tcp
    domain	53/tcp
    domain	53/udp
    http	80/tcp
    https	443/tcp
    EOF
  '' { };

  tools = mkScript "tools-0.1" "bin/tools" ''
    #!${sh}
    # tools: greet, then list what is installed next to us.
    . ${libgreeting}/lib/greeting.sh
    greet Tooling
    ${coreutils}/bin/ls ${coreutils}/bin
  '';

  helloWorld = mkScript "hello-world-1.0" "bin/hello-world" ''
    #!${sh}
    exec ${hello}/bin/hello
  '';

  _7zip = mkScript "7zip-23.01" "bin/7z" ''
    #!${sh}
    echo "7-Zip (demo) 23.01"
  '';

  demoPackages = {
    nested = mkScript "nested-1.0" "bin/nested" ''
      #!${sh}
      echo "nested package from demoPackages"
    '';
    deeper.leaf = mkScript "leaf-1.0" "bin/leaf" ''
      #!${sh}
      echo "leaf of demoPackages.deeper"
    '';
  };

  bigPackage = mkBytes "big-package" 1 50;

  # ~1 GiB in eight store paths, tied together by one package that references
  # them all. Benchmarks only: tests never build it.
  benchGiantParts = builtins.genList (i: mkBytes "bench-giant-part-${toString i}" (100 + i) 128) 8;
  benchGiant = mkDerivation "bench-giant" ''
    mkdir -p "$out/share"
    ${builtins.concatStringsSep "\n" (map (p: ''ln -s ${p} "$out/share/${p.name}"'') benchGiantParts)}
  '' { };

  # Like nixpkgs for a package whose meta.platforms leave this system out:
  # evaluating it throws.
  onlyOn = platforms: drv:
    if builtins.elem system platforms then drv
    else throw "Package '${drv.name}' is not available on the requested hostPlatform ${system} (meta.platforms: ${builtins.concatStringsSep ", " platforms})";

  cpuid = onlyOn [ "x86_64-linux" ] (mkScript "cpuid-20230505" "bin/cpuid" ''
    #!${sh}
    echo "cpuid (demo): GenuineIntel"
  '');

  failsToBuild = mkDerivation "fails-to-build" ''
    echo "failsToBuild: this package is broken on purpose (demo)" >&2
    exit 1
  '' { };

  # The marker in the sleep arguments lets tests find a builder left running.
  neverFinishes = mkDerivation "never-finishes" ''
    echo "neverFinishes: sleeping forever" >&2
    exec sleep 99999999
  '' { };

in
{
  inherit busybox bashInteractive coreutils moreutils nano cacert iana-etc;
  inherit libgreeting hello goodbye tools helloWorld _7zip demoPackages;
  inherit bigPackage benchGiant cpuid failsToBuild neverFinishes;
  failsToEvaluate = throw "failsToEvaluate: this package cannot be evaluated (demo)";
  # Its message holds markup, for the front page's escaping tests.
  failsWithMarkup = throw "failsWithMarkup: <script>document.title='injected'</script> <b>not bold</b> & <i>done</i>";
}
# pname, version and meta as nixpkgs has them (hello and goodbye have theirs
# above). bigPackage and the nested demoPackages have none, like a package
# written in a hurry.
// {
  busybox = described "busybox" "1.35.0" {
    description = "Tiny versions of common UNIX utilities in a single small executable";
    homepage = "https://busybox.net/";
    license = licenses.gpl2Only;
  } busybox;
  bashInteractive = described "bash-interactive" "5.2" {
    description = "GNU Bourne-Again Shell, the de facto standard shell on Linux (for interactive use)";
    homepage = "https://www.gnu.org/software/bash/";
    license = licenses.gpl3Plus;
    mainProgram = "bash";
  } bashInteractive;
  coreutils = described "coreutils" "9.1" {
    description = "The GNU Core Utilities";
    homepage = "https://www.gnu.org/software/coreutils/";
    license = licenses.gpl3Plus;
  } coreutils;
  moreutils = described "moreutils" "0.67" {
    description = "Growing collection of the unix tools that nobody thought to write long ago when unix was young";
    homepage = "https://joeyh.name/code/moreutils/";
    license = licenses.gpl2Plus;
  } moreutils;
  nano = described "nano" "7.2" {
    description = "Small, user-friendly console text editor";
    homepage = "https://www.nano-editor.org/";
    license = licenses.gpl3Plus;
    mainProgram = "nano";
  } nano;
  cacert = described "nss-cacert" "3.92" {
    description = "A bundle of X.509 certificates of public Certificate Authorities (CA)";
    homepage = "https://curl.haxx.se/docs/caextract.html";
    license = licenses.mpl20;
  } cacert;
  iana-etc = described "iana-etc" "20231227" {
    description = "IANA protocol and port number assignments (/etc/protocols and /etc/services)";
    homepage = "https://www.iana.org/protocols";
    license = licenses.mit;
  } iana-etc;
  libgreeting = described "libgreeting" "1.0" {
    description = "Greetings for the whole world (demo library)";
    license = licenses.mit;
  } libgreeting;
  tools = described "tools" "0.1" {
    description = "Greets, then lists the tools next to it (demo)";
    license = licenses.mit;
    mainProgram = "tools";
  } tools;
  helloWorld = described "hello-world" "1.0" {
    description = "Runs hello (demo)";
    license = licenses.mit;
    mainProgram = "hello-world";
  } helloWorld;
  _7zip = described "7zip" "23.01" {
    description = "Command line version of the 7-Zip file archiver (demo)";
    homepage = "https://www.7-zip.org";
    license = [ licenses.lgpl21Plus { shortName = "unRAR"; fullName = "unRAR restriction"; } ];
    mainProgram = "7z";
  } _7zip;
}
