"""What the service keeps per key, bounded, and the ``/metrics`` view of every cache it holds.

* :class:`TokenBuckets`: a token bucket per key (a session now; a client address for a per-client limit).
  A bucket that has refilled to its burst is the same as no bucket, so :meth:`TokenBuckets.prune` (run by
  the service's sweeper) drops those: what stays is the keys that sent in the last ``burst / rate``
  seconds, and never more than ``limit`` (the least recently used leave first; such a key starts again
  with a full bucket, which only ever errs on the lenient side).
* :class:`BoundsCollector`: a Prometheus collector that reads each cache's own figures when scraped:
  ``affectkit_cache_entries``, ``affectkit_cache_limit`` (+Inf: bounded by something else, said in the
  README), ``affectkit_cache_hits_total``, ``affectkit_cache_misses_total``, ``affectkit_cache_evictions_total``,
  labelled ``cache``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from affectkit.cache import CacheStats

__all__ = ["MAX_BUCKETS", "BoundsCollector", "TokenBuckets"]

#: Token buckets kept at most (about 200 bytes each: ~13 MB at the limit).
MAX_BUCKETS = 65536


class TokenBuckets:
    """Per-key token buckets of ``rate`` tokens a second up to ``burst``, at most ``limit`` keys kept."""

    def __init__(self, rate: float, burst: float, limit: int = MAX_BUCKETS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.limit, self.clock = rate, burst, limit, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def _level(self, tokens: float, at: float, now: float) -> float:
        return min(self.burst, tokens + (now - at) * self.rate)

    def allow(self, key: str) -> bool:
        """Take a token from ``key``'s bucket: False (and nothing taken) when it is empty."""
        now = self.clock()
        with self._lock:
            old = self._buckets.pop(key, None)
            if old is None:
                self.misses += 1
                tokens = self.burst
            else:
                self.hits += 1
                tokens = self._level(*old, now)
            ok = tokens >= 1
            self._buckets[key] = (tokens - 1 if ok else tokens, now)
            while len(self._buckets) > self.limit:
                self._buckets.popitem(last=False)
                self.evictions += 1
        return ok

    def pop(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._buckets.pop(key, default)

    def prune(self, now: float | None = None) -> int:
        """Drop the buckets that have refilled (the same as having none); returns how many."""
        now = self.clock() if now is None else now
        with self._lock:
            full = [k for k, (tokens, at) in self._buckets.items() if self._level(tokens, at, now) >= self.burst]
            for k in full:
                del self._buckets[k]
        return len(full)

    def stats(self) -> CacheStats:
        return CacheStats(len(self._buckets), self.limit, self.hits, self.misses, self.evictions)


class BoundsCollector(Collector):
    """Reports ``sources()`` (cache name -> :class:`CacheStats`) at each scrape."""

    def __init__(self, sources: Callable[[], dict[str, CacheStats]]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Any]:
        stats = self.sources()
        size = GaugeMetricFamily("affectkit_cache_entries", "entries a cache holds now", labels=["cache"])
        limit = GaugeMetricFamily("affectkit_cache_limit", "a cache's entry limit (+Inf: bounded otherwise, "
                                  "see README)", labels=["cache"])
        hits = CounterMetricFamily("affectkit_cache_hits", "lookups a cache answered", labels=["cache"])
        misses = CounterMetricFamily("affectkit_cache_misses", "lookups a cache did not answer", labels=["cache"])
        evicted = CounterMetricFamily("affectkit_cache_evictions", "entries dropped to stay within the limit",
                                      labels=["cache"])
        for name, s in sorted(stats.items()):
            size.add_metric([name], s.size)
            limit.add_metric([name], float("inf") if s.limit is None else s.limit)
            hits.add_metric([name], s.hits)
            misses.add_metric([name], s.misses)
            evicted.add_metric([name], s.evictions)
        yield from (size, limit, hits, misses, evicted)


def service_caches(svc: Any) -> dict[str, CacheStats]:
    """Every cache and per-key record a running service holds, by name (what ``/metrics`` reports)."""
    from affectkit.cache import lru_stats
    from affectkit.graph import _slot_tables
    from affectkit.models.corect import _newest_edges

    out = {"sessions_live": svc.pool.stats(), "rate_buckets": svc.buckets.stats(),
           "connections": CacheStats(len(svc.connections), None, 0, 0, 0),
           "graph_edges": lru_stats(_newest_edges), "graph_slots": lru_stats(_slot_tables)}
    text = svc.base.engine.text_cache()
    if text is not None:
        out["text_vectors"] = text.stats()
    return out
