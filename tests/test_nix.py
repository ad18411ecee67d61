"""builder.nix against real Nix and the demo package set (nix/demo)."""
from __future__ import annotations

import concurrent.futures

import fcntl
import gzip
import json
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from builder import nix, sources
from builder.nix import NixSettings, PackageFailed, UnknownPackages
from builder.sources import PackageSource

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "nix" / "demo"
SYSTEM = "x86_64-linux"

pytestmark = pytest.mark.timeout(600)


def path_source(directory: Path) -> PackageSource:
    return sources.resolve("latest", channel=None, pkgs_repo=None, pkgs_path=str(directory))


def fresh_demo(tmp_path: Path) -> tuple[PackageSource, str]:
    """A copy of the demo set whose every derivation is new (never built before),
    with a marker exported into each builder's environment."""
    marker = f"DEMO_NONCE_{uuid.uuid4().hex}"
    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy)
    default = copy / "default.nix"
    text = default.read_text()
    anchor = 'export PATH="$TMPDIR/.bin"'
    assert anchor in text
    default.write_text(text.replace(anchor, f'{anchor} {marker}=1', 1))
    return path_source(copy), marker


@pytest.fixture
def settings() -> NixSettings:
    return NixSettings(timeout=300)


@pytest.fixture
def demo() -> PackageSource:
    return path_source(DEMO)


def realise(names, source, settings, tmp_path):
    return nix.realise(names, source, SYSTEM, settings, str(tmp_path / "work"))


def processes_with(marker: str) -> list[int]:
    """Processes whose command line or environment mentions `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for name in ("cmdline", "environ"):
            try:
                if marker.encode() in Path(f"/proc/{entry}/{name}").read_bytes():
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return found


def test_hello_closure_has_references_and_roots(demo, settings, tmp_path):
    closure = realise(["hello"], demo, settings, tmp_path)
    hello = closure.roots["hello"]
    assert hello.startswith("/nix/store/") and hello.endswith("-hello-2.12.1")
    assert closure.attrs == {"hello": "hello"}
    # What the package set says of it, as nixpkgs has it: pname, version, meta.
    assert closure.info["hello"] == {
        "pname": "hello", "version": "2.12.1", "mainProgram": "hello",
        "description": "A program that produces a familiar, friendly greeting",
        "homepage": "https://www.gnu.org/software/hello/",
        "licenses": [{"spdxId": "GPL-3.0-or-later", "name": "GNU General Public License v3.0 or later"}],
    }

    # /nix/store/<32 hash chars>-<name>
    by_name = {p[len("/nix/store/") + 33 :]: p for p in closure.paths}
    assert set(by_name) == {"hello-2.12.1", "libgreeting-1.0", "busybox-1.35.0"}
    lib, busybox = by_name["libgreeting-1.0"], by_name["busybox-1.35.0"]
    assert closure.paths[hello].references == tuple(sorted((lib, busybox)))
    assert closure.paths[lib].references == (busybox,)
    assert closure.paths[busybox].references == ()
    assert closure.paths[busybox].nar_size > 1_000_000
    assert all(p.nar_size > 0 for p in closure.paths.values())

    # The GC root keeps the output alive while the caller uses it.
    roots = [os.path.realpath(e.path) for e in os.scandir(closure.gc_root_dir)]
    assert roots == [hello]

    on_disk = nix.store_path_on_disk(hello, settings.store)
    out = subprocess.run([f"{on_disk}/bin/hello"], capture_output=True, text=True, check=True)
    assert out.stdout == "Hello, world!\n"


def test_several_packages_share_store_paths(demo, settings, tmp_path):
    closure = realise(["hello", "goodbye", "tools", "coreutils", "bashInteractive"], demo, settings, tmp_path)
    assert len(closure.roots) == 5
    shared = [p for p in closure.paths if p.endswith("-libgreeting-1.0")]
    assert len(shared) == 1
    env = nix.store_path_on_disk(closure.roots["coreutils"], settings.store) + "/bin/env"
    assert os.path.islink(env)


def test_nested_attribute(demo, settings, tmp_path):
    closure = realise(["demoPackages.nested", "demoPackages.deeper.leaf"], demo, settings, tmp_path)
    assert closure.attrs == {"demoPackages.nested": "demoPackages.nested", "demoPackages.deeper.leaf": "demoPackages.deeper.leaf"}
    assert os.path.exists(closure.roots["demoPackages.nested"] + "/bin/nested")


def test_case_insensitive_names(demo, settings, tmp_path):
    closure = realise(["helloworld", "HELLO", "demoPackages.Nested"], demo, settings, tmp_path)
    assert closure.attrs == {"helloworld": "helloWorld", "HELLO": "hello", "demoPackages.Nested": "demoPackages.nested"}
    out = subprocess.run([closure.roots["helloworld"] + "/bin/hello-world"], capture_output=True, text=True, check=True)
    assert out.stdout == "Hello, world!\n"


def test_digit_prefix(demo, settings, tmp_path):
    closure = realise(["7zip"], demo, settings, tmp_path)
    assert closure.attrs == {"7zip": "_7zip"}
    assert os.path.exists(closure.roots["7zip"] + "/bin/7z")


def test_unknown_names_are_all_listed(demo, settings, tmp_path):
    with pytest.raises(UnknownPackages) as caught:
        realise(["hello", "nope", "alsoNope", "demoPackages", "demoPackages.missing"], demo, settings, tmp_path)
    assert caught.value.names == ["nope", "alsoNope", "demoPackages", "demoPackages.missing"]
    assert "nope" in caught.value.message


def test_names_never_become_nix_code(demo, settings, tmp_path):
    hostile = ['${builtins.abort "x"}', '"; builtins.abort "x"; "', "hello; rm -rf /", "../..", ""]
    with pytest.raises(UnknownPackages) as caught:
        realise(hostile, demo, settings, tmp_path)
    assert caught.value.names == hostile


def test_fails_to_evaluate(demo, settings, tmp_path):
    with pytest.raises(PackageFailed) as caught:
        realise(["hello", "failsToEvaluate"], demo, settings, tmp_path)
    assert caught.value.names == ["failsToEvaluate"]
    assert "this package cannot be evaluated" in caught.value.message
    assert str(REPO) not in caught.value.message


def test_fails_to_build(demo, settings, tmp_path):
    with pytest.raises(PackageFailed) as caught:
        realise(["hello", "failsToBuild"], demo, settings, tmp_path)
    assert caught.value.names == ["failsToBuild"]
    message = caught.value.message
    assert "failed with exit code 1" in message
    assert "broken on purpose" in message
    assert "\x00" not in message and "\x1b" not in message
    # Nothing stays rooted for a failed image.
    assert os.listdir(tmp_path / "work") == []


def test_timeout_stops_the_builder(settings, tmp_path):
    source, marker = fresh_demo(tmp_path)
    quick = NixSettings(timeout=3)
    with pytest.raises(nix.NixTimeout) as caught:
        realise(["neverFinishes"], source, quick, tmp_path)
    assert "timed out" in caught.value.message
    assert processes_with(marker) == []


def test_deadline_stops_nix_when_its_own_timeout_does_not(settings, tmp_path):
    source, marker = fresh_demo(tmp_path)
    # Nix's own timeouts switched off: only the Python deadline is left.
    quick = NixSettings(timeout=2, extra_options=(("timeout", "0"), ("max-silent-time", "0")))
    with pytest.raises(nix.NixTimeout):
        realise(["neverFinishes"], source, quick, tmp_path)
    assert processes_with(marker) == []


def test_concurrent_builds_of_the_same_paths(settings, tmp_path):
    source, _ = fresh_demo(tmp_path)
    results: dict[int, object] = {}

    def build(i: int) -> None:
        try:
            results[i] = realise(["hello", "tools"], source, settings, tmp_path / str(i))
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(r, nix.Closure) for r in results.values()), results
    assert results[0].roots == results[1].roots
    assert results[0].paths == results[1].paths


def test_a_new_chroot_store_opened_first_takes_builds_at_once(tmp_path):
    # As on a fresh function instance: an empty store, two builds (an index's platforms) at once.
    # Nix creating a new store's database in two processes together fails now and then.
    for attempt in range(3):
        store = NixSettings(timeout=300, store=str(tmp_path / f"store{attempt}"))
        nix.init_store(store)
        assert (tmp_path / f"store{attempt}" / "nix" / "var" / "nix" / "db" / "db.sqlite").is_file()
        source, _ = fresh_demo(tmp_path / f"demo{attempt}")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            closures = list(pool.map(lambda i: realise(["hello"], source, store, tmp_path / f"{attempt}-{i}"),
                                     range(2)))
        assert closures[0].roots == closures[1].roots


def test_big_package(demo, settings, tmp_path):
    closure = realise(["bigPackage"], demo, settings, tmp_path)
    info = closure.paths[closure.roots["bigPackage"]]
    assert 45_000_000 < info.nar_size < 60_000_000
    part = Path(closure.roots["bigPackage"]) / "share" / "big-package" / "part-0007.bin"
    data = part.read_bytes()
    assert len(data) == 1 << 20
    assert len(gzip.compress(data, 1)) > 0.95 * len(data)


def test_missing_nix_is_unavailable(demo, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(nix.NixUnavailable):
        realise(["hello"], demo, NixSettings(bin_dir=str(empty)), tmp_path)


def test_missing_package_set_is_unavailable(settings, tmp_path):
    with pytest.raises(nix.NixUnavailable) as caught:
        realise(["hello"], path_source(tmp_path / "nowhere"), settings, tmp_path)
    assert "cannot load the package set" in caught.value.message


# Pure logic


def test_parse_path_info_accepts_both_formats():
    old = json.dumps([
        {"path": "/nix/store/a-x", "narSize": 10, "references": ["/nix/store/a-x", "/nix/store/b-y"]},
        {"path": "/nix/store/b-y", "narSize": 5, "references": []},
    ])
    new = json.dumps({
        "/nix/store/a-x": {"narSize": 10, "references": ["/nix/store/b-y", "/nix/store/a-x"]},
        "/nix/store/b-y": {"narSize": 5, "references": []},
    })
    assert nix.parse_path_info(old) == nix.parse_path_info(new)
    assert nix.parse_path_info(old)["/nix/store/a-x"].references == ("/nix/store/b-y",)


def test_error_message_is_cleaned_and_bounded():
    stderr = (
        "this derivation will be built:\n  /nix/store/x-a.drv\nbuilding '/nix/store/x-a.drv'...\n"
        "\x1b[31;1merror:\x1b[0m builder for '/nix/store/x-a.drv' failed with exit code 1;\n"
        "       last 2 log lines:\n       > one\x00\n       > two\n"
        "       For full logs, run 'nix log /nix/store/x-a.drv'.\n"
    )
    assert nix.error_message(stderr) == (
        "error: builder for '/nix/store/x-a.drv' failed with exit code 1;\nlast 2 log lines:\n> one\n> two"
    )
    long = "error: " + "x" * 5000
    assert len(nix.error_message(long)) <= nix.MESSAGE_MAX_CHARS
    assert nix.error_message("") == "Nix failed"


def test_chroot_store(demo, tmp_path):
    store = tmp_path / "store"
    settings = NixSettings(timeout=300, store=str(store))
    closure = realise(["hello"], demo, settings, tmp_path)
    hello = closure.roots["hello"]
    assert hello.startswith("/nix/store/")  # logical names stay
    on_disk = nix.store_path_on_disk(hello, settings.store)
    assert on_disk == f"{store}{hello}"
    assert "/nix/store/" in Path(on_disk, "bin", "hello").read_text()
    assert len(closure.paths) == 3


def test_uncatchable_evaluation_error(settings, tmp_path):
    # `abort` escapes builtins.tryEval: the names are then evaluated one by one.
    copy = tmp_path / "demo"
    shutil.copytree(DEMO, copy)
    default = copy / "default.nix"
    default.write_text(default.read_text().rstrip() + '\n  // { aborts = abort "aborts on purpose"; }\n')
    with pytest.raises(PackageFailed) as caught:
        realise(["hello", "aborts"], path_source(copy), settings, tmp_path)
    assert caught.value.names == ["aborts"]
    assert "aborts on purpose" in caught.value.message
    # Unknown names still come first, as with catchable errors.
    with pytest.raises(UnknownPackages) as unknown:
        realise(["aborts", "nope"], path_source(copy), settings, tmp_path)
    assert unknown.value.names == ["nope"]


def test_garbage_collection_keeps_what_builds_hold_and_waits_for_running_ones(demo, tmp_path):
    store = tmp_path / "store"
    settings = NixSettings(timeout=300, store=str(store), store_lock=str(tmp_path / "store.lock"))
    held = nix.realise(["hello"], demo, SYSTEM, settings, str(tmp_path / "held"))
    done = nix.realise(["goodbye"], demo, SYSTEM, settings, str(tmp_path / "done"))
    shutil.rmtree(done.gc_root_dir)  # that build is over: its closure is garbage now
    only_goodbye = set(done.paths) - set(held.paths)
    assert only_goodbye

    with open(settings.store_lock, "a") as lock:  # a build running in another process
        fcntl.flock(lock, fcntl.LOCK_SH)
        assert nix.collect_garbage(settings) is False
    assert all(Path(nix.store_path_on_disk(p, settings.store)).exists() for p in only_goodbye)

    assert nix.collect_garbage(settings) is True
    assert not any(Path(nix.store_path_on_disk(p, settings.store)).exists() for p in only_goodbye)
    assert all(Path(nix.store_path_on_disk(p, settings.store)).exists() for p in held.paths)
    again = nix.realise(["goodbye"], demo, SYSTEM, settings, str(tmp_path / "again"))
    assert set(again.paths) == set(done.paths)
