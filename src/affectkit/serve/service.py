"""The service container: settings, the loaded model and its identity, the store, the session pool, the
batcher, metrics and rate limiters.  Routes, the WebSocket protocol and access checks import this module,
never the reverse (see ``serve/__init__.py`` for the layout)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from affectkit.cache import LRUCache
from affectkit.errors import ConfigError
from affectkit.serve.access import TokenBucket
from affectkit.serve.batcher import Batcher
from affectkit.serve.bounded import BoundsCollector, service_caches
from affectkit.serve.metrics import Metrics
from affectkit.serve.sessions import Item, SessionPool
from affectkit.serve.store import SessionRow, open_store
from affectkit.stream import Stream

__all__ = ["FLAGS", "ServeSettings", "Service", "identity_of", "model_identity"]

log = logging.getLogger(__name__)


#: Session rows kept in memory for the WebSocket upgrade's token check (a row is ~200 bytes).
ROW_CACHE_ENTRIES = 4096
#: Refusals held back at once per client address (:meth:`Service.refuse_slowly`); beyond, answered at once.
HELD_PER_CLIENT = 16

@dataclass
class ServeSettings:
    """Limits and knobs of the service (``affectkit serve --help`` lists the same); checked when made
    (ConfigError naming the command-line option)."""

    max_batch: int = 32            # utterances per batch (1: no cross-session batching)
    max_wait_ms: float = 2.0       # how long the worker waits to fill a batch
    max_queue: int = 256           # utterances waiting beyond which new ones are refused (overload)
    idle_evict_s: float = 600.0    # a session unused this long leaves memory (rebuilt from the log)
    max_live_sessions: int = 1024  # sessions kept in memory at most (least recently used leave first)
    idle_timeout_s: float = 300.0  # a WebSocket silent this long is closed
    max_message_bytes: int = 256 * 1024
    max_text_chars: int = 2000
    max_speaker_chars: int = 64
    rate_per_s: float = 20.0       # frames per second per session, valid or not (token bucket) ...
    rate_burst: float = 40.0       # ... with this burst; a connection refused this many frames in a row is closed
    connect_per_min: float = 60.0  # WebSocket connects per minute per session ...
    connect_burst: float = 10.0    # ... with this burst (a reconnect loop is refused with 429, never served)
    refusal_delay_s: float = 1.0   # a rate-limit refusal is answered after its Retry-After, at most this long
    sweep_every_s: float = 10.0    # how often idle sessions are looked for (and retention runs)
    max_rebuilds: int = 64         # sessions waiting to be rebuilt from the log beyond which reconnects are refused
    engine_batch: bool = True      # step the sessions of a batch in one forward (False: one push per session)
    api_key: str | None = None     # operator key required to create sessions (None: anyone who reaches it)
    create_per_min: float = 30.0   # session creations per minute per client address ...
    create_burst: float = 10.0     # ... with this burst
    max_sessions: int = 10_000     # sessions in the log at most (creation beyond: 429)
    max_utterances: int = 10_000   # utterances per session at most (beyond: session_full)
    max_store_mb: float = 4096.0   # the log's size beyond which nothing new is written (store_full)
    retain_days: float | None = None  # sessions unused this long are deleted with their log (None: kept)
    allowed_hosts: tuple[str, ...] | None = None    # Host header values served (None: any; the CLI sets loopback)
    allowed_origins: tuple[str, ...] | None = None  # browser origins besides the page's own that may connect
    text_runtime: str = "onnx"     # what runs the sentence encoder: onnx (same vectors as torch), torch, onnx-int8

    def __post_init__(self) -> None:
        at_least = {"max_batch": 1, "max_queue": 1, "max_live_sessions": 1, "max_message_bytes": 64,
                    "max_text_chars": 1, "max_speaker_chars": 1, "max_rebuilds": 1, "max_sessions": 1,
                    "max_utterances": 1}
        positive = ("idle_timeout_s", "rate_per_s", "rate_burst", "sweep_every_s",
                    "create_per_min", "create_burst", "max_store_mb", "connect_per_min", "connect_burst")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in at_least or f.name in positive or f.name in NON_NEGATIVE:
                if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v in (float("inf"),):
                    raise ConfigError(f"{FLAGS.get(f.name, f.name)} must be a finite number, got {v!r}")
            if f.name in at_least and (int(v) != v or v < at_least[f.name]):
                raise ConfigError(f"{FLAGS.get(f.name, f.name)} must be a whole number >= {at_least[f.name]}, got {v}")
            if f.name in positive and v <= 0:
                raise ConfigError(f"{FLAGS.get(f.name, f.name)} must be > 0, got {v}")
        for name in NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(f"{FLAGS.get(name, name)} must be >= 0, got {getattr(self, name)}")
        from affectkit.features.fast_encoder import check_runtime

        check_runtime(self.text_runtime)
        if self.rate_burst < 1 or self.create_burst < 1:
            raise ConfigError("--rate-burst and --create-burst must be >= 1 (one frame or session at least)")
        if self.retain_days is not None and not (0 < self.retain_days < float("inf")):
            raise ConfigError(f"--retain must be a number of days > 0, got {self.retain_days}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ConfigError("--api-key must be at least 16 characters (e.g. python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))')")
        for name in ("allowed_hosts", "allowed_origins"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(v))
                if not v or any(not isinstance(h, str) or not h.strip() for h in v):
                    raise ConfigError(f"{FLAGS[name]}: give one or more non-empty names")


NON_NEGATIVE = ("max_wait_ms", "idle_evict_s", "refusal_delay_s")
FLAGS = {"max_batch": "--max-batch", "max_wait_ms": "--batch-wait-ms", "max_queue": "--max-queue",
         "idle_evict_s": "--idle-evict", "max_live_sessions": "--max-live", "idle_timeout_s": "--idle-timeout",
         "max_message_bytes": "--max-message-bytes", "max_text_chars": "--max-text-chars",
         "rate_per_s": "--rate", "rate_burst": "--rate-burst", "max_rebuilds": "--max-rebuilds",
         "api_key": "--api-key", "create_per_min": "--create-rate", "create_burst": "--create-burst",
         "max_sessions": "--max-sessions", "connect_per_min": "--connect-rate",
         "connect_burst": "--connect-burst", "max_utterances": "--max-utterances", "max_store_mb": "--max-store-mb",
         "retain_days": "--retain", "allowed_hosts": "--allowed-host", "allowed_origins": "--allowed-origin",
         "text_runtime": "--text-runtime", "refusal_delay_s": "--refusal-delay"}


def model_identity(model: Any, info: dict[str, Any], text_encoder: str | None) -> dict[str, Any]:
    """What the log records about the model that answered it: a SHA-256 over the weights (names, dtypes,
    shapes, bytes) and the model's dims, labels, speakers and text encoder, so a session is never replayed
    through another model (same dims would silently give other answers)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    meta = {"dims": {m: int(d) for m, d in sorted(info["dims"].items())},
            "labels": list(info.get("label_names") or []), "speakers": [str(s) for s in info.get("speakers") or []],
            "text_encoder": text_encoder}
    h.update(json.dumps(meta, sort_keys=True).encode())
    return {"hash": h.hexdigest(), **meta}


def identity_of(source: Any, embed: Any = None, text_runtime: str = "torch") -> dict[str, Any]:
    """The identity a :class:`Service` over ``source`` (checkpoint path or ``(model, info)``) with ``embed``
    records, for tools that write a log it will continue (tests, benches)."""
    model, info = _load(source)
    labels = info.get("label_names") or [str(k) for k in range(int(info["n_classes"]))]
    dims = {m: int(d) for m, d in info["dims"].items()}
    return model_identity(model, {**info, "label_names": [str(n) for n in labels]},
                          _encoder_name(info, embed, dims, text_runtime))


class Service:
    """What the routes share: engine, model identity, store, pool, batcher, metrics, limiters, settings."""

    def __init__(self, source: Any, store_path: str | Path, settings: ServeSettings,
                 embed: Any = None) -> None:
        self.settings = settings
        model, info = _load(source)
        self.base = Stream((model, info), embed=embed, by_arrival=True, text_runtime=settings.text_runtime)
        self.info = info
        self.modalities = list(self.base.modalities)
        self.dims = {m: int(info["dims"][m]) for m in self.modalities}
        self.labels = list(self.base.label_names)
        self.max_speakers = self.base.engine.n_speakers  # participants a session can have
        self.embed = _text_embedder(self.dims, embed, self.base.engine)
        encoder = _encoder_name(info, embed, {m: int(d) for m, d in info["dims"].items()}, settings.text_runtime)
        self.identity = model_identity(model, {**info, "label_names": self.labels}, encoder)
        self.store = open_store(store_path)
        self.store.register_model(self.identity)
        others = self.store.sessions_of_other_models(self.identity["hash"])
        if others:
            log.warning("%d session(s) in %s were logged through another model (or before the log recorded "
                        "models); they cannot be continued here (their transcripts stay readable)",
                        others, self.store.url)
        self.other_sessions = others
        self.pool = SessionPool(self.base, self.store, self.embed, settings.idle_evict_s,
                                settings.max_live_sessions, model=self.identity["hash"],
                                max_utterances=settings.max_utterances,
                                max_store_bytes=int(settings.max_store_mb * 2**20),
                                engine_batch=settings.engine_batch)
        self.metrics = Metrics()
        self.batcher: Batcher[Item] = Batcher(self.pool.step, settings.max_batch, settings.max_wait_ms,
                                              settings.max_queue, on_batch=self._on_batch,
                                              jobs=self.pool.rebuild, max_jobs=settings.max_rebuilds)
        self.frames = TokenBucket(settings.rate_per_s, settings.rate_burst)
        self.creations = TokenBucket(settings.create_per_min / 60, settings.create_burst)
        self.connects = TokenBucket(settings.connect_per_min / 60, settings.connect_burst)
        self.connections: dict[str, set[Any]] = {}  # open ones only: emptied sets are removed
        self.held: dict[str, int] = {}  # client address -> refusals held back now (refuse_slowly)
        #: sessions' rows (token digest, model) as read or created here, so an upgrade is checked without a
        #: store read (a reconnect flood costs no thread-pool hop); dropped when the session is deleted here.
        self.rows: LRUCache[str, SessionRow] = LRUCache(ROW_CACHE_ENTRIES)
        self.metrics.registry.register(BoundsCollector(lambda: service_caches(self)))

    def _on_batch(self, size: int, seconds: float) -> None:
        m = self.metrics
        m.batch.observe(size)
        m.batch_seconds.observe(seconds)
        m.sessions_live.set(len(self.pool.live))
        m.rebuilt.set(self.pool.rebuilt)

    async def session_row(self, session_id: str) -> SessionRow | None:
        """The session's row: from :attr:`rows`, else read from the store off the event loop (and kept)."""
        row = self.rows.get(session_id)
        if row is None:
            row = await asyncio.get_running_loop().run_in_executor(None, self.store.session, session_id)
            if row is not None:
                self.rows.put(session_id, row)
        return row

    def forget(self, session_id: str) -> None:
        """Drop what this process keeps about a deleted session beside the pool (its row, its frame bucket)."""
        self.rows.pop(session_id)
        self.frames.forget(session_id)

    def allow(self, session_id: str) -> bool:
        """Token bucket per session: False when the session sends frames faster than the limit."""
        return self.frames.allow(session_id)

    async def refuse_slowly(self, client: str, wait: float) -> float:
        """Hold a rate-limit refusal back for its ``wait`` (the Retry-After it announces), at most
        ``refusal_delay_s``: a client that loops on refusals gets a few answers a second instead of hundreds,
        and each costs the event loop one timer.  At most :data:`HELD_PER_CLIENT` are held per address at
        once (more are answered at once: a held one costs a socket).  Returns the seconds held."""
        delay = min(wait, self.settings.refusal_delay_s)
        if delay <= 0 or self.held.get(client, 0) >= HELD_PER_CLIENT:
            return 0.0
        self.held[client] = self.held.get(client, 0) + 1
        try:
            await asyncio.sleep(delay)
        finally:
            left = self.held.pop(client) - 1
            if left:
                self.held[client] = left
        return delay

    def expire(self) -> int:
        """Delete the sessions unused for ``retain_days`` (on the worker: no live state left behind)."""
        days = self.settings.retain_days
        if days is None:
            return 0
        gone = self.store.expire(time.time() - days * 86400)
        for sid in gone:
            self.pool.drop(sid)
            self.forget(sid)
        return len(gone)

    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_every_s)
            await self.batcher.run_sync(self.pool.sweep)
            for buckets in (self.frames, self.creations, self.connects):
                buckets.prune()  # a refilled bucket is the same as none
            await self.retention()
            self.metrics.sessions_live.set(len(self.pool.live))

    async def retention(self) -> int:
        """Run retention on the worker thread, closing the expired sessions' connections."""
        if self.settings.retain_days is None:
            return 0
        n = await self.batcher.run_sync(self.expire)
        if n:
            self.metrics.sessions_expired.inc(n)
            log.info("retention: %d session(s) unused for %g days deleted", n, self.settings.retain_days)
        return int(n)


def _load(source: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(source, tuple):
        return source
    from affectkit.checkpoint import load_model

    model, _cfg, info = load_model(source)
    return model, info


def _encoder_name(info: dict[str, Any], embed: Any, dims: dict[str, int], runtime: str = "torch") -> str | None:
    """Which encoder turns raw text into this model's text features (part of the model's identity). The
    float runtimes (``torch``, ``onnx``) give the same vectors and the same name; ``onnx-int8`` moves them, so
    it is named: a session begun on one is not continued on the other."""
    if "text" not in dims:
        return None
    if embed is not None:
        return "custom:" + getattr(embed, "__qualname__", type(embed).__name__)
    suffix = " (onnx-int8)" if runtime == "onnx-int8" else ""
    if info.get("encoder") is not None:
        return "fine-tuned:" + json.dumps(info["encoder"], sort_keys=True, default=str) + suffix
    return "all-MiniLM-L6-v2" + suffix


def _text_embedder(dims: dict[str, int], embed: Any, engine: Any = None) -> Any:
    """The embedder of encoder inputs (one string per turn, :meth:`Stream.text_input`), or None when the
    model cannot take raw text. A checkpoint trained on a fine-tuned encoder's features gets that encoder
    (verified when the engine was built); its inputs carry the speaker and past turns when it reads them."""
    if "text" not in dims:
        return None
    if embed is not None:
        return embed
    if engine is not None and engine.text_encoder() is not None:
        return engine.embed_inputs
    try:
        from affectkit.features import text as text_features
    except ImportError:
        return None
    if dims["text"] != text_features.DIM:
        return None
    from affectkit.stream import embed_text

    return engine.embed_inputs if engine is not None else embed_text  # the engine's runtime
