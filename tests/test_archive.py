"""Tar layers: byte-for-byte determinism, one-pass digests, and readers that agree (GNU tar, gzip, Python, Nix)."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import threading

import pytest

from builder import archive
from builder.archive import Entry

NIX_ENV = {**os.environ, "NIX_CONFIG": "build-users-group =\nsubstituters =\nsandbox = false"}


class WriteOnly:
    """An upload-like sink: `write` and nothing else."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()

    def write(self, data) -> int:
        return self._buffer.write(data)

    def getvalue(self) -> bytes:
        return self._buffer.getvalue()


def make_store(root, files: dict[str, bytes | str], modes: dict[str, int] | None = None) -> None:
    """Create files (bytes) and symlinks (str targets) under root; directories as needed."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.symlink_to(content)
        else:
            path.write_bytes(content)
            path.chmod((modes or {}).get(rel, 0o444))


@pytest.fixture
def fake_store(tmp_path):
    root = tmp_path / "root"
    make_store(root, {
        "nix/store/aaaa-hello/bin/hello": b"#!/bin/sh\necho hello\n",
        "nix/store/aaaa-hello/bin/hi": "hello",
        "nix/store/aaaa-hello/share/man/man1/hello.1": b"manual",
        "nix/store/bbbb-libfoo/lib/libfoo.so.1": os.urandom(300_000),
        "nix/store/bbbb-libfoo/lib/libfoo.so": "libfoo.so.1",
        "nix/store/bbbb-libfoo/lib/" + "n" * 150 + ".so": b"a long name",
        "nix/store/cccc-data/big.bin": os.urandom(3 << 20),
        "nix/store/cccc-data/empty": b"",
    }, {"nix/store/aaaa-hello/bin/hello": 0o555})
    (root / "nix/store/aaaa-hello/share/empty-dir").mkdir()
    paths = ["/nix/store/cccc-data", "/nix/store/aaaa-hello", "/nix/store/bbbb-libfoo"]
    return root, paths


def gnu_tar_list(data: bytes, tmp_path, gzipped: bool) -> list[str]:
    blob = tmp_path / "layer.tar"
    blob.write_bytes(data)
    args = ["tar", "-tvz" if gzipped else "-tv", "--numeric-owner", "-f", str(blob)]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()


def uncompress(data: bytes, compression: str) -> bytes:
    """Through the reference command-line tools, not the libraries that wrote it."""
    if compression == "none":
        return data
    tool = {"gzip": ["gzip", "-dc"], "zstd": ["zstd", "-dc"]}[compression]
    return subprocess.run(tool, input=data, check=True, capture_output=True).stdout


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.fast
def test_store_paths_deterministic_and_digests_match(fake_store, compression):
    root, paths = fake_store
    first, second = WriteOnly(), WriteOnly()
    blob = archive.pack_store_paths(paths, first, compression, str(root))
    again = archive.pack_store_paths(list(reversed(paths)), second, compression, str(root))
    data = first.getvalue()
    assert data == second.getvalue() and blob == again
    assert blob.size == len(data)
    assert blob.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert blob.md5 == hashlib.md5(data).hexdigest()
    tar_bytes = uncompress(data, compression)
    assert blob.diff_id == "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    assert len(tar_bytes) % tarfile.RECORDSIZE == 0


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.fast
def test_compressed_bytes_do_not_depend_on_the_number_of_threads(fake_store, compression):
    root, paths = fake_store  # several 1 MiB blocks
    plain = WriteOnly()
    reference = archive.pack_store_paths(paths, plain, "none", str(root))
    packed = {}
    for threads in (1, 2, 5):
        out = WriteOnly()
        packed[threads] = archive.pack_store_paths(paths, out, compression, str(root), threads=threads)
        assert uncompress(out.getvalue(), compression) == plain.getvalue()
    assert packed[1] == packed[2] == packed[5]
    assert packed[1].diff_id == reference.digest


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.fast
def test_a_failing_upload_fails_the_pack_and_stops_its_threads(fake_store, compression):
    root, paths = fake_store

    class Broken:
        def write(self, data):
            raise OSError("upload went away")

    before = threading.active_count()
    with pytest.raises(OSError, match="upload went away"):
        archive.pack_store_paths(paths, Broken(), compression, str(root), threads=3)
    assert threading.active_count() == before


@pytest.mark.fast
def test_gnu_tar_lists_members_modes_and_links(fake_store, tmp_path):
    root, paths = fake_store
    out = WriteOnly()
    archive.pack_store_paths(paths, out, "gzip", str(root))
    lines = gnu_tar_list(out.getvalue(), tmp_path, gzipped=True)
    listing = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in lines}
    names = [line.split()[5] for line in lines]
    assert names[:2] == ["nix/", "nix/store/"]
    assert names.count("nix/") == 1 and names.count("nix/store/") == 1
    assert names == sorted(names, key=lambda n: n.rstrip("/").split("/"))  # parents first, siblings sorted
    assert listing["nix/store/aaaa-hello/bin/hello"].startswith("-r-xr-xr-x 0/0")
    assert listing["nix/store/bbbb-libfoo/lib/libfoo.so.1"].startswith("-r--r--r-- 0/0")
    assert "nix/store/aaaa-hello/bin/hi -> hello" in listing["nix/store/aaaa-hello/bin/hi"]
    assert "nix/store/aaaa-hello/share/empty-dir/" in listing
    assert f"nix/store/bbbb-libfoo/lib/{'n' * 150}.so" in listing
    assert all(" 1970-01-01 00:00 " in line for line in lines)


@pytest.mark.fast
def test_gzip_and_python_tarfile_read_it(fake_store, tmp_path):
    root, paths = fake_store
    out = WriteOnly()
    archive.pack_store_paths(paths, out, "gzip", str(root))
    (tmp_path / "layer.tar.gz").write_bytes(out.getvalue())
    subprocess.run(["gzip", "-t", str(tmp_path / "layer.tar.gz")], check=True)
    unzipped = subprocess.run(["gzip", "-dc", str(tmp_path / "layer.tar.gz")], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(unzipped)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        big = tar.extractfile("nix/store/cccc-data/big.bin").read()
    assert big == (root / "nix/store/cccc-data/big.bin").read_bytes()
    assert members["nix/store/aaaa-hello/bin/hi"].linkname == "hello"
    assert members["nix/store/aaaa-hello/bin/hello"].mode == 0o555
    assert all(m.mtime == 1 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members.values())


def test_extracted_tree_has_the_same_nar_hash(fake_store, tmp_path):
    """What GNU tar unpacks is, to Nix, the same store path (contents, modes, links)."""
    if shutil.which("nix-hash") is None:
        pytest.skip("nix-hash is not installed")
    root, paths = fake_store
    out = WriteOnly()
    archive.pack_store_paths(paths, out, "none", str(root))
    (tmp_path / "layer.tar").write_bytes(out.getvalue())
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "layer.tar"), "-C", str(unpacked)], check=True)
    for path in paths:
        hashes = [subprocess.run(["nix-hash", "--type", "sha256", str(base) + path], check=True,
                                 capture_output=True, text=True).stdout for base in (root, unpacked)]
        assert hashes[0] == hashes[1]


def test_real_nix_store_paths_in_a_chroot_store(tmp_path):
    """Paths added by Nix itself (canonical 0444/0555 modes, mtime 1) under a chroot store."""
    if shutil.which("nix-store") is None:
        pytest.skip("nix is not installed")
    source = tmp_path / "src"
    make_store(source, {"tool/bin/tool": b"#!/bin/sh\n", "tool/bin/alias": "tool", "tool/README": b"doc"},
               {"tool/bin/tool": 0o755})
    store = tmp_path / "store"
    added = subprocess.run(["nix-store", "--store", str(store), "--add", str(source / "tool")],
                           check=True, capture_output=True, text=True, env=NIX_ENV).stdout.strip()
    assert added.startswith("/nix/store/")
    blobs = []
    for _ in range(2):
        out = WriteOnly()
        blobs.append((archive.pack_store_paths([added], out, "gzip", str(store)), out.getvalue()))
    assert blobs[0] == blobs[1]
    lines = gnu_tar_list(blobs[0][1], tmp_path, gzipped=True)
    name = added.lstrip("/")
    assert any(line.startswith("-r-xr-xr-x 0/0") and line.endswith(f"{name}/bin/tool") for line in lines)
    assert any(line.startswith("-r--r--r-- 0/0") and line.endswith(f"{name}/README") for line in lines)
    assert any(line.endswith(f"{name}/bin/alias -> tool") for line in lines)
    assert any(line.startswith("dr-xr-xr-x 0/0") and line.endswith(f"{name}/") for line in lines)


def test_host_nix_store_paths():
    """Real store paths of this machine, when it has any."""
    try:
        candidates = sorted(e for e in os.listdir("/nix/store") if not e.startswith(".") and "-" in e)
    except FileNotFoundError:
        pytest.skip("no /nix/store on this machine")
    if not candidates:
        pytest.skip("/nix/store is empty")
    # Only paths Nix has registered: a path being built right now may still change.
    listed = ["/nix/store/" + e for e in candidates if not e.endswith(".lock")]
    invalid = set(subprocess.run(["nix-store", "--check-validity", "--print-invalid", *listed], env=NIX_ENV,
                                 capture_output=True, text=True).stdout.split()) if shutil.which("nix-store") else set()
    paths = [p for p in listed if p not in invalid][:5]
    if not paths:
        pytest.skip("no valid paths in /nix/store")
    outs = [WriteOnly(), WriteOnly()]
    blobs = [archive.pack_store_paths(paths, out, "gzip", "/") for out in outs]
    assert blobs[0] == blobs[1] and outs[0].getvalue() == outs[1].getvalue()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(outs[0].getvalue()))) as tar:
        names = set(tar.getnames())
    assert {p.lstrip("/") for p in paths} <= names


def test_rejects_non_store_paths(fake_store):
    root, _ = fake_store
    with pytest.raises(ValueError):
        archive.pack_store_paths(["/etc/passwd"], WriteOnly(), "none", str(root))
    with pytest.raises(ValueError):
        archive.pack_store_paths(["/nix/store/aaaa-hello"], WriteOnly(), "brotli", str(root))


@pytest.fixture
def two_packages(tmp_path):
    root = tmp_path / "root"
    make_store(root, {
        "nix/store/1111-coreutils/bin/env": b"env",
        "nix/store/1111-coreutils/bin/ls": b"ls",
        "nix/store/1111-coreutils/share/man/man1/ls.1": b"ls(1)",
        "nix/store/2222-git/bin/git": b"git",
        "nix/store/2222-git/bin/ls": b"not ls",  # conflict: the first package wins
        "nix/store/2222-git/share/man/man1/git.1": b"git(1)",
        "nix/store/2222-git/etc/gitconfig": b"[core]",
        "nix/store/2222-git/lib": "/nix/store/3333-libs/lib",  # a symlinked directory stays a link
        "nix/store/4444-script": b"#!/bin/sh\n",  # a single-file package
    })
    return root


def test_customisation_entries_merge_two_packages(two_packages):
    packages = ["/nix/store/1111-coreutils", "/nix/store/2222-git", "/nix/store/4444-script"]
    entries = {e.name: e for e in archive.customisation_entries(packages, str(two_packages))}
    assert entries["tmp"] == Entry("tmp", "dir", mode=0o1777)
    for name in ("bin", "share", "share/man", "share/man/man1", "etc", "usr", "usr/bin"):
        assert entries[name].kind == "dir", name
    links = {name: e.target for name, e in entries.items() if e.kind == "symlink"}
    assert links == {
        "bin/env": "/nix/store/1111-coreutils/bin/env",
        "bin/ls": "/nix/store/1111-coreutils/bin/ls",
        "bin/git": "/nix/store/2222-git/bin/git",
        "share/man/man1/ls.1": "/nix/store/1111-coreutils/share/man/man1/ls.1",
        "share/man/man1/git.1": "/nix/store/2222-git/share/man/man1/git.1",
        "etc/gitconfig": "/nix/store/2222-git/etc/gitconfig",
        "lib": "/nix/store/2222-git/lib",
        "usr/bin/env": "/nix/store/1111-coreutils/bin/env",
    }
    reordered = {e.name: e for e in archive.customisation_entries(list(reversed(packages)), str(two_packages))}
    assert reordered["bin/ls"].target == "/nix/store/2222-git/bin/ls"


def test_customisation_without_env_has_no_usr(two_packages):
    entries = {e.name for e in archive.customisation_entries(["/nix/store/2222-git"], str(two_packages))}
    assert "usr/bin/env" not in entries and "usr" not in entries and "tmp" in entries


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_pack_entries_with_gnu_tar(two_packages, tmp_path, compression):
    packages = ["/nix/store/1111-coreutils", "/nix/store/2222-git"]
    entries = archive.customisation_entries(packages, str(two_packages))
    entries.append(Entry("etc/motd", "file", mode=0o644, data=b"welcome\n"))
    entries.append(Entry("var/empty/nested", "dir"))  # parents are added
    outs = [WriteOnly(), WriteOnly()]
    blobs = [archive.pack_entries(entries, outs[0], compression),
             archive.pack_entries(list(reversed(entries)), outs[1], compression)]
    assert blobs[0] == blobs[1] and outs[0].getvalue() == outs[1].getvalue()
    data = outs[0].getvalue()
    assert blobs[0].digest == "sha256:" + hashlib.sha256(data).hexdigest() and blobs[0].size == len(data)
    lines = gnu_tar_list(data, tmp_path, gzipped=compression == "gzip")
    text = "\n".join(lines)
    assert "drwxrwxrwt 0/0" in next(line for line in lines if line.endswith(" tmp/"))
    assert "bin/git -> /nix/store/2222-git/bin/git" in text
    assert "usr/bin/env -> /nix/store/1111-coreutils/bin/env" in text
    assert any(line.startswith("-rw-r--r-- 0/0") and line.endswith(" etc/motd") for line in lines)
    assert any(line.endswith(" var/") for line in lines) and any(line.endswith(" var/empty/") for line in lines)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-x", "-f", str(tmp_path / "layer.tar"), "-C", str(unpacked)], check=True)
    assert (unpacked / "etc/motd").read_bytes() == b"welcome\n"
    assert os.readlink(unpacked / "bin/ls") == "/nix/store/1111-coreutils/bin/ls"


def test_pack_entries_rejects_duplicates():
    with pytest.raises(ValueError):
        archive.pack_entries([Entry("bin", "dir"), Entry("bin/", "dir")], WriteOnly(), "none")


def test_the_images_own_entries_win_over_a_packages_files(two_packages, tmp_path):
    (two_packages / "nix/store/2222-git/etc/passwd").write_bytes(b"git:x:1:1::/:/bin/sh\n")
    own = [Entry("etc/passwd", "file", mode=0o644, data=b"root:x:0:0:root:/root:/bin/sh\n"),
           Entry("home/nonroot", "dir", uid=65532, gid=65532)]
    entries = {e.name: e for e in archive.customisation_entries(["/nix/store/2222-git"], str(two_packages), own)}
    assert entries["etc/passwd"].data.startswith(b"root:")
    assert entries["etc/gitconfig"].target == "/nix/store/2222-git/etc/gitconfig"  # the rest of etc/ still merges
    assert entries["home"].kind == "dir"
    out = WriteOnly()
    archive.pack_entries(list(entries.values()), out, "none")
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(out.getvalue()))}
    assert (members["home/nonroot"].uid, members["home/nonroot"].gid) == (65532, 65532)
    assert (members["etc/passwd"].uid, members["home"].uid) == (0, 0)
