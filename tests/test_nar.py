"""The NAR reader (builder/nar.py) against NARs that `nix-store --dump` writes, and hostile ones."""
from __future__ import annotations

import io
import os
import struct
import subprocess
from pathlib import Path

import pytest

from builder import nar
from tests.fixtures_nixcache import require_tools


def dump(path: Path) -> bytes:
    require_tools("nix-store")
    return subprocess.run(["nix-store", "--dump", str(path)], capture_output=True, check=True).stdout


# A NAR writer for hostile archives (`nix-store --dump` never writes them); checked against Nix below.
def s(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data + b"\0" * (-len(data) % 8)


def regular(data: bytes, executable: bool = False) -> bytes:
    flag = s(b"executable") + s(b"") if executable else b""
    return s(b"(") + s(b"type") + s(b"regular") + flag + s(b"contents") + s(data) + s(b")")


def symlink(target: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(target) + s(b")")


def directory(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")
                    for name, node in entries)
    return s(b"(") + s(b"type") + s(b"directory") + body + s(b")")


def archive(node: bytes) -> bytes:
    return s(nar.MAGIC) + node


def make_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "alias").symlink_to("tool")
    (root / "lib" / "deep" / "er").mkdir(parents=True)
    (root / "lib" / "deep" / "er" / "big").write_bytes(os.urandom(3 * nar.CHUNK + 5))  # more than one chunk
    (root / "lib" / "empty-file").write_bytes(b"")
    (root / "lib" / "seven").write_bytes(b"1234567")  # padding
    (root / "share" / "empty-dir").mkdir(parents=True)
    (root / "share" / "naïve name with spaces").write_text("x")
    (root / "abs-link").symlink_to("/nix/store/00000000000000000000000000000000-elsewhere/bin/x")
    (root / "dangling").symlink_to("does/not/exist")


def test_a_tree_unpacks_to_one_whose_dump_is_byte_for_byte_the_same(tmp_path):
    make_tree(tmp_path / "tree")
    original = dump(tmp_path / "tree")

    assert nar.unpack(io.BytesIO(original), str(tmp_path / "out")) == "directory"

    assert dump(tmp_path / "out") == original
    assert os.access(tmp_path / "out" / "bin" / "tool", os.X_OK)
    assert not os.access(tmp_path / "out" / "lib" / "seven", os.X_OK)
    assert os.readlink(tmp_path / "out" / "abs-link").startswith("/nix/store/")


def test_the_writer_used_for_hostile_archives_writes_what_nix_writes(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a").write_bytes(b"hello")
    (tmp_path / "t" / "b").symlink_to("a")
    assert archive(directory((b"a", regular(b"hello")), (b"b", symlink(b"a")))) == dump(tmp_path / "t")


@pytest.mark.parametrize("kind", ["regular", "executable", "symlink"])
def test_a_root_that_is_not_a_directory_unpacks_as_nix_dumps_it(tmp_path, kind):
    source = tmp_path / "source"
    if kind == "symlink":
        source.symlink_to("/somewhere")
    else:
        source.write_bytes(b"\x7fELF not really")
        source.chmod(0o755 if kind == "executable" else 0o644)
    data = dump(source)
    assert nar.unpack(io.BytesIO(data), str(tmp_path / "out")) == ("symlink" if kind == "symlink" else "regular")
    assert dump(tmp_path / "out") == data


def test_reading_stops_at_the_end_of_the_archive(tmp_path):
    stream = io.BytesIO(archive(regular(b"x")) + b"trailing")
    nar.unpack(stream, str(tmp_path / "out"))
    assert stream.read() == b"trailing"


ESCAPES = {
    "parent": archive(directory((b"..", regular(b"x")))),
    "dot": archive(directory((b".", regular(b"x")))),
    "absolute name": archive(directory((b"/tmp/escape", regular(b"x")))),
    "slash in name": archive(directory((b"sub/../../escape", regular(b"x")))),
    "empty name": archive(directory((b"", regular(b"x")))),
    "NUL in name": archive(directory((b"a\0b", regular(b"x")))),
    # A link to the outside, then a directory of the same name that would write through it.
    "write through a symlink": archive(directory(
        (b"link", symlink(b"../../outside")), (b"link", directory((b"escape", regular(b"x")))))),
    "unsorted": archive(directory((b"b", regular(b"x")), (b"a", regular(b"x")))),
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_entries_that_would_leave_the_target_are_refused(tmp_path, name):
    target = tmp_path / "deep" / "target"
    target.parent.mkdir()
    with pytest.raises(nar.NarError, match="escape|order"):
        nar.unpack(io.BytesIO(ESCAPES[name]), str(target))
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(target) and p != target.parent]
    assert outside == []
    assert not (tmp_path / "outside").exists() and not Path("/tmp/escape").exists()


MALFORMED = {
    "no magic": s(b"nix-archive-2") + regular(b"x"),
    "truncated": archive(regular(b"0123456789"))[:-20],
    "non-zero padding": archive(regular(b"x"))[:-16] + b"\0\0\0\0\0\0\0\x01" + s(b")"),
    "unknown type": archive(s(b"(") + s(b"type") + s(b"fifo") + s(b")")),
    "huge name": archive(directory((b"n" * 300, regular(b"x")))),
    "junk where an entry belongs": archive(s(b"(") + s(b"type") + s(b"directory") + s(b"junk") + s(b")")),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_archives_are_refused(tmp_path, name):
    with pytest.raises(nar.NarError):
        nar.unpack(io.BytesIO(MALFORMED[name]), str(tmp_path / "out"))
