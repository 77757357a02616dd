"""What the service keeps per key, bounded, and the ``/metrics`` view of every cache it holds.

* The rate limits' token buckets (:class:`affectkit.serve.access.TokenBucket`) are bounded where they live.
* :class:`BoundsCollector`: a Prometheus collector that reads each cache's own figures when scraped:
  ``affectkit_cache_entries``, ``affectkit_cache_limit`` (+Inf: bounded by something else, said in the
  README), ``affectkit_cache_hits_total``, ``affectkit_cache_misses_total``, ``affectkit_cache_evictions_total``,
  labelled ``cache``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from affectkit.cache import CacheStats

__all__ = ["BoundsCollector", "service_caches"]

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

    out = {"sessions_live": svc.pool.stats(), "rate_buckets": svc.frames.stats(),
           "create_buckets": svc.creations.stats(), "connect_buckets": svc.connects.stats(),
           "connections": CacheStats(len(svc.connections), None, 0, 0, 0), "session_rows": svc.rows.stats(),
           "graph_edges": lru_stats(_newest_edges), "graph_slots": lru_stats(_slot_tables)}
    text = svc.base.engine.text_cache()
    if text is not None:
        out["text_vectors"] = text.stats()
    return out
