"""The instance memories' one LRU map: bounded by entries (cache records) or bytes (manifests)."""
from __future__ import annotations

import pytest

from builder.lru import Lru

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast


def test_the_least_recently_used_entry_goes_first():
    lru: Lru[str] = Lru(2)
    lru.put("a", "A")
    lru.put("b", "B")
    assert lru.get("a") == "A"  # now b is the oldest
    lru.put("c", "C")
    assert (lru.get("a"), lru.get("b"), lru.get("c"), len(lru)) == ("A", None, "C", 2)


def test_a_weight_bounds_the_total_and_replacing_an_entry_counts_it_once():
    lru: Lru[bytes] = Lru(10, weight=len)
    lru.put("a", b"12345")
    lru.put("a", b"1234")  # replaced: 4 bytes held, not 9
    lru.put("b", b"123456")
    assert (lru.get("a"), lru.get("b")) == (b"1234", b"123456")
    lru.put("c", b"1")
    assert lru.get("a") is None and len(lru) == 2  # 11 > 10: the oldest went


def test_an_entry_heavier_than_the_limit_is_not_kept_nor_evicts_others():
    lru: Lru[bytes] = Lru(4, weight=len)
    lru.put("small", b"12")
    lru.put("big", b"12345")
    assert lru.get("big") is None and lru.get("small") == b"12"
    empty: Lru[str] = Lru(0)
    empty.put("x", "y")
    assert len(empty) == 0


def test_dropped_entries_free_their_weight():
    lru: Lru[bytes] = Lru(4, weight=len)
    lru.put("a", b"1234")
    lru.drop("a")
    lru.put("b", b"1234")
    assert lru.get("b") == b"1234" and lru.get("a") is None


def test_drop_where_drops_the_matching_entries_and_names_them():
    lru: Lru[bytes] = Lru(10, weight=len)
    for key, value in {"a": b"1", "b": b"22", "c": b"333"}.items():
        lru.put(key, value)
    assert sorted(lru.drop_where(lambda value: len(value) > 1)) == ["b", "c"]
    lru.put("d", b"123456789")  # the dropped entries' weight was freed
    assert (lru.get("a"), lru.get("d")) == (b"1", b"123456789")


def test_get_or_load_loads_what_is_missing_or_stale_and_keeps_it():
    lru: Lru[tuple[int, str]] = Lru(10)
    loads = []

    def load(value):
        loads.append(value)
        return value

    assert lru.get_or_load("a", lambda: load((1, "old"))) == (1, "old")
    assert lru.get_or_load("a", lambda: load((2, "unused"))) == (1, "old")  # held: not loaded again
    fresh = lambda value: value[0] >= 2  # noqa: E731
    assert lru.get_or_load("a", lambda: load((2, "new")), fresh) == (2, "new")  # stale: loaded
    assert lru.get_or_load("b", lambda: load(None)) is None and len(lru) == 1  # nothing found: nothing kept
    assert loads == [(1, "old"), (2, "new"), None]
