"""The service's Prometheus metrics, in a registry of their own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    """Counters, gauges and histograms of one service; ``errors`` is labelled by error kind (every refusal:
    auth, rate_limited, too_many_sessions, session_full, store_full, bad_host, bad_origin, ...)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions_live = Gauge("affectkit_sessions_live", "sessions held in memory", registry=r)
        self.connections = Gauge("affectkit_connections_open", "open WebSocket connections", registry=r)
        self.sessions_created = Counter("affectkit_sessions_created", "sessions created", registry=r)
        self.sessions_expired = Counter("affectkit_sessions_expired", "sessions deleted by retention", registry=r)
        self.utterances = Counter("affectkit_utterances", "utterances answered", registry=r)
        self.errors = Counter("affectkit_errors", "error frames and refusals by kind", ["kind"], registry=r)
        self.latency = Histogram("affectkit_latency_seconds", "frame received to answer sent", registry=r,
                                 buckets=(.005, .01, .025, .05, .075, .1, .15, .25, .5, 1, 2.5, 5))
        self.batch = Histogram("affectkit_batch_size", "utterances per batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("affectkit_batch_seconds", "time to run one batch", registry=r)
        self.queue = Gauge("affectkit_queue_depth", "utterances waiting for the worker", registry=r)
        self.rebuilt = Gauge("affectkit_sessions_rebuilt", "sessions rebuilt from the log", registry=r)
        self.rebuilds_waiting = Gauge("affectkit_rebuilds_waiting", "reconnects waiting for their session's rebuild",
                                      registry=r)
        self.rebuilds_dropped = Gauge("affectkit_rebuilds_dropped", "rebuilds dropped: their client left", registry=r)
        self.store_bytes = Gauge("affectkit_store_bytes", "size of the session log", registry=r)
