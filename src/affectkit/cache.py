"""A bounded least-recently-used map with its own counters, for caches a long-running process keeps.

A service that runs for weeks must not keep every key it has seen: each cache it holds is an
:class:`LRUCache` with a stated limit (entries), and reports its size, limit, hits, misses and evictions
(:meth:`LRUCache.stats`) so ``/metrics`` shows it staying under the limit.  ``limit=None`` is an
unbounded map (offline jobs that must keep everything, e.g. building a feature file), counted the same way.
Thread-safe: one lock around each operation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["CacheStats", "LRUCache", "lru_stats"]

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    """A cache's figures: entries now, its limit (None: unbounded), and counts since it was made."""

    size: int
    limit: int | None
    hits: int
    misses: int
    evictions: int


class LRUCache(Generic[K, V]):
    """At most ``limit`` entries (None: no limit); a ``put`` beyond it evicts the least recently used."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"cache limit must be an integer >= 0 or None, got {limit!r}")
        self.limit = limit
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._data))

    def get(self, key: K, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), counted as a hit; ``default`` and a miss if absent."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return default

    def put(self, key: K, value: V) -> None:
        """Store ``key`` as the most recently used, evicting the least recently used beyond the limit."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while self.limit is not None and len(self._data) > self.limit:
                self._data.popitem(last=False)
                self.evictions += 1

    def update(self, items: Any) -> None:
        """``put`` every ``(key, value)`` of a mapping or iterable of pairs, in order."""
        pairs = items.items() if hasattr(items, "items") else items
        for k, v in pairs:
            self.put(k, v)

    def pop(self, key: K, default: Any = None) -> Any:
        with self._lock:
            return self._data.pop(key, default)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the entries, least recently used first."""
        with self._lock:
            return list(self._data.items())

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def stats(self) -> CacheStats:
        return CacheStats(len(self._data), self.limit, self.hits, self.misses, self.evictions)


def lru_stats(fn: Callable[..., Any]) -> CacheStats:
    """The same figures for a ``functools.lru_cache`` function (evictions = misses that no longer fit)."""
    info = fn.cache_info()  # type: ignore[attr-defined]
    return CacheStats(info.currsize, info.maxsize, info.hits, info.misses, max(0, info.misses - info.currsize))
