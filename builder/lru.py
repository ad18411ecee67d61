"""A thread-safe map that forgets its least recently used entries beyond a total weight.

The weight of an entry is 1 by default (a bound on entries) or what `weight` says (bytes).
An entry heavier than the whole limit is not kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, TypeVar

V = TypeVar("V")


class Lru(Generic[V]):
    def __init__(self, limit: int, weight: Callable[[V], int] = lambda value: 1):
        self._limit = limit
        self._weight = weight
        self._total = 0
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def get_or_load(self, key: str, load: Callable[[], V | None],
                    fresh: Callable[[V], bool] = lambda value: True) -> V | None:
        """The value held for `key` while it is `fresh`, else what `load()` finds (kept when not None)."""
        value = self.get(key)
        if value is not None:
            if fresh(value):
                return value
            self.drop(key)
        value = load()
        if value is not None:
            self.put(key, value)
        return value

    def put(self, key: str, value: V) -> None:
        weight = self._weight(value)
        if weight > self._limit:
            return
        with self._lock:
            self._drop(key)
            self._items[key] = value
            self._total += weight
            while self._total > self._limit:
                self._drop(next(iter(self._items)))

    def drop(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def drop_where(self, test: Callable[[V], bool]) -> list[str]:
        """Drop every entry whose value passes `test`; returns their keys."""
        with self._lock:
            keys = [key for key, value in self._items.items() if test(value)]
            for key in keys:
                self._drop(key)
        return keys

    def _drop(self, key: str) -> None:
        if key in self._items:
            self._total -= self._weight(self._items.pop(key))

    def __len__(self) -> int:
        return len(self._items)
