"""The live sessions of the service: one :class:`~affectkit.stream.Stream` per session, kept in memory
while in use, evicted when idle (or when too many are live) and rebuilt from the store's log by a
prefill through the same engine (:meth:`~affectkit.stream.Stream.prefill_steps`: a few batched forwards
over the log's tail, not one per logged utterance), so a rebuilt session answers exactly as one that
never left.  Reconnecting clients' sessions are rebuilt together by a job of the batcher's rebuild lane
(:meth:`SessionPool.rebuild`, a piece at a time between live batches); a live utterance for a session not in
memory rebuilds it at once (:meth:`SessionPool.get`), and a rebuild job never replaces a session that was
stepped or deleted meanwhile.

Every method runs on the batcher's single worker thread (the one owner of model state and of the
store's writes), so nothing here needs a lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from affectkit.cache import CacheStats
from affectkit.errors import AffectkitError, DataError
from affectkit.serve.store import LogStore, Record, WriterConflict
from affectkit.stream import Prediction, Stream, TooManySpeakers, push_batch

__all__ = ["Item", "Live", "LogFull", "OtherModel", "SessionPool", "TooManySpeakers", "UnknownSession"]


class UnknownSession(AffectkitError):
    """The session was deleted (or never existed)."""


class OtherModel(AffectkitError):
    """The session was logged through another model (or its log disagrees with this model's labels)."""


class LogFull(AffectkitError):
    """A cap on the log is reached (``kind``: ``session_full`` or ``store_full``); nothing was written."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass
class Item:
    """One utterance to classify: ``text`` (raw sentence, embedded in the batch) and/or ``features``
    (modality -> float32 vector), ``received`` (perf_counter when the frame arrived)."""

    session: str
    speaker: str
    text: str | None
    features: dict[str, np.ndarray]
    received: float = field(default_factory=time.perf_counter)


@dataclass
class Live:
    """A session in memory: its stream (state, participants by arrival, recent text turns) and last use."""

    stream: Stream
    used: float


@dataclass
class _Rebuild:
    """A session being rebuilt: its empty Live and its logged utterances (the prefill's input: participant
    names, features and the raw sentences a fine-tuned encoder reads with later turns)."""

    live: Live
    log: list[dict[str, Any]]
    error: Exception | None = None
    last: Record | None = None  # the log's last utterance, whose logged answer the prefill must give again


def other_model_message(session_id: str, logged: str | None, serving: str) -> str:
    """The one-line refusal for a session logged through another model."""
    if logged is None:
        return (f"session {session_id} was logged before the log recorded its model, so it cannot be checked "
                "against this one: its transcript is readable, it cannot be continued")
    return (f"session {session_id} was logged through model {logged[:12]}, this server runs {serving[:12]}: "
            "serve that checkpoint to continue it (its transcript stays readable)")


def _check_replay(session_id: str, job: _Rebuild) -> None:
    """OtherModel unless the prefill gives the log's last utterance the answer that was logged for it (same
    label, probabilities within 1e-3): a log replayed through other weights is an error, never silence."""
    got, want = job.live.stream.replayed, job.last
    if got is None or want is None:
        return
    if got.label != want.label or max(abs(a - b) for a, b in zip(got.probs, want.probs)) > 1e-3:
        raise OtherModel(f"session {session_id}: replaying its log gives utterance {want.position} the label "
                         f"{got.label!r} (p={max(got.probs):.3f}) where the log says {want.label!r}: the log does "
                         "not belong to this model")


class SessionPool:
    """Live sessions over one shared engine (``base``, an empty :class:`Stream` mapping names by arrival),
    backed by ``store``.  Participant names go to the stream as they are: it maps them to speaker slots.

    ``embed``: sentences -> (N, D) text features;
    ``idle_s``: evict a session unused that long; ``max_live``: evict the least recently used beyond;
    ``model``: the hash of the model (only sessions logged through it are rebuilt; None: any);
    ``max_utterances`` per session and ``max_store_bytes`` of log (beyond: :class:`LogFull`, nothing written);
    ``engine_batch``: step the sessions of a wave in one forward (False: one push each, the bench's baseline).
    """

    def __init__(self, base: Stream, store: LogStore, embed: Callable[[list[str]], Any] | None,
                 idle_s: float = 600.0, max_live: int = 1024,
                 model: str | None = None, max_utterances: int | None = None, max_store_bytes: int | None = None,
                 engine_batch: bool = True) -> None:
        if not base.maps_names:
            raise DataError("SessionPool: the base stream must map participant names by arrival "
                            "(Stream(..., by_arrival=True))")
        self.base, self.store, self.embed = base, store, embed
        self.idle_s, self.max_live = idle_s, max_live
        self.model, self.max_utterances, self.max_store_bytes = model, max_utterances, max_store_bytes
        self.engine_batch = engine_batch
        self.live: OrderedDict[str, Live] = OrderedDict()
        self.rebuilt = 0
        self.hits = self.evicted = 0  # lookups that found the session live; sessions evicted (idle or over max_live)
        self._rebuilds_running = 0
        self._changed: set[str] = set()  # sessions appended to or dropped while a rebuild ran
        self._fresh: OrderedDict[str, None] = OrderedDict()  # created here, never opened: their log is empty
        self._fresh_lock = threading.Lock()  # noted by the create route's thread, read by the event loop

    # -- state

    def note_created(self, session_id: str) -> None:
        """Remember a session this process just created (its log is empty), so opening it needs no rebuild
        and never waits in the rebuild lane (:meth:`is_fresh`); the last ``max_live`` are remembered.
        Safe from any thread."""
        with self._fresh_lock:
            self._fresh[session_id] = None
            while len(self._fresh) > self.max_live:
                self._fresh.popitem(last=False)

    def is_fresh(self, session_id: str) -> bool:
        """Whether opening the session is cheap: it is live, or was created here and never opened.  Safe
        from any thread (a stale answer only costs a rebuild on the worker thread)."""
        with self._fresh_lock:
            return session_id in self.live or session_id in self._fresh

    def get(self, session_id: str) -> Live:
        """The live session, rebuilt from the log at once (one prefill) if it is not in memory."""
        live = self.live.get(session_id)
        if live is None:
            job = self._begin(session_id)
            job.live.stream.prefill(job.log)
            _check_replay(session_id, job)
            live = self._install(session_id, job)
        else:
            self.hits += 1
        self.live.move_to_end(session_id)
        live.used = time.monotonic()
        return live

    def rebuild(self, session_ids: Sequence[str],
                alive: Callable[[int], bool] = lambda i: True) -> Generator[None, None, list[Any]]:
        """Rebuild sessions from their logs together (a job of the batcher's rebuild lane), a piece at a
        time: read one log, or run one session's prefill (one chunk), yielding between pieces; then all of
        them go live at once, so their clients' next utterances meet in one live batch.  Returns, per
        session, (next position, participants) or its exception.  ``alive(i)``: whether the caller of
        ``session_ids[i]`` still waits; sessions nobody waits for any more are skipped (result None).

        A session already live is left as it is; one stepped or deleted while this ran (``get`` rebuilt it
        at once, from a log this read may have missed) is not replaced by this rebuild."""
        wanted = lambda sid: any(alive(i) for i, s in enumerate(session_ids) if s == sid)  # noqa: E731
        out: list[Any] = [None] * len(session_ids)
        jobs: dict[str, _Rebuild] = {}
        self._rebuilds_running += 1
        try:
            for i, sid in enumerate(session_ids):
                if sid in self.live or sid in jobs or not alive(i):
                    continue
                if jobs:
                    yield
                try:
                    jobs[sid] = self._begin(sid)
                except AffectkitError as exc:
                    out[i] = exc
            for sid, job in jobs.items():
                yield
                if not wanted(sid):
                    continue
                try:
                    yield from job.live.stream.prefill_steps(job.log)
                    _check_replay(sid, job)
                except AffectkitError as exc:
                    job.error = exc
            for sid, job in jobs.items():
                if job.error is None and len(job.live.stream) == len(job.log) and sid not in self.live \
                        and sid not in self._changed:
                    self._install(sid, job)
            for i, sid in enumerate(session_ids):
                if out[i] is not None or not alive(i):
                    continue
                job = jobs.get(sid)
                if job is not None and job.error is not None:
                    out[i] = job.error
                    continue
                try:
                    out[i] = self.position(sid)
                except AffectkitError as exc:
                    out[i] = exc
            return out
        finally:
            self._rebuilds_running -= 1
            if not self._rebuilds_running:
                self._changed.clear()

    def _begin(self, session_id: str) -> _Rebuild:
        """Read a session's log and set up its rebuild (nothing runs yet)."""
        row = self.store.session(session_id)
        if row is None:
            raise UnknownSession(f"session {session_id} does not exist (deleted?)")
        if self.model is not None and row.model != self.model:
            raise OtherModel(other_model_message(session_id, row.model, self.model))
        live = Live(self.base.new_session(), time.monotonic())
        log: list[dict[str, Any]] = []
        labels = list(self.base.label_names)
        for rec in self.store.records(session_id):
            if rec.label not in labels or len(rec.probs) != len(labels):
                raise OtherModel(f"session {session_id}: utterance {rec.position} was logged with label "
                                 f"{rec.label!r} over {len(rec.probs)} classes; this model's labels are "
                                 f"{', '.join(labels)}: the log does not belong to this model")
            log.append({"speaker": rec.speaker, "sentence": rec.text, **rec.features})
        return _Rebuild(live, log, last=rec if log else None)

    def _install(self, session_id: str, job: _Rebuild) -> Live:
        """A finished rebuild becomes the live session."""
        with self._fresh_lock:
            self._fresh.pop(session_id, None)
        self.live[session_id] = job.live
        self.rebuilt += 1
        self._cap()
        return job.live

    def drop(self, session_id: str) -> None:
        self.live.pop(session_id, None)
        if self._rebuilds_running:
            self._changed.add(session_id)

    def sweep(self, now: float | None = None) -> int:
        """Evict sessions idle for ``idle_s`` or more; returns how many."""
        now = time.monotonic() if now is None else now
        old = [k for k, v in self.live.items() if now - v.used >= self.idle_s]
        for k in old:
            del self.live[k]
        self.evicted += len(old)
        return len(old)

    def _cap(self) -> None:
        while len(self.live) > self.max_live:
            self.live.popitem(last=False)
            self.evicted += 1

    def stats(self) -> CacheStats:
        """The live sessions as a cache: held, limit, lookups found live, rebuilds, evictions."""
        return CacheStats(len(self.live), self.max_live, self.hits, self.rebuilt, self.evicted)

    def position(self, session_id: str) -> tuple[int, list[str]]:
        """(next position, participants) of a session, rebuilding it if needed.  On a shared log a session
        held in memory is checked against the log first (one indexed read): if another replica wrote to it
        meanwhile it is rebuilt now, so the client is told the true position, not one its first utterance
        would find taken (``moved``, a reconnect)."""
        live = self.get(session_id)
        if self.store.shared and self.store.next_position(session_id) != len(live.stream):
            self.drop(session_id)
            live = self.get(session_id)
        return len(live.stream), [str(p) for p in live.stream.participants]

    # -- the batch step

    def step(self, items: list[Item]) -> list[tuple[Prediction, Record] | Exception]:
        """Classify a batch: one encoder call for the raw sentences of every session's next utterance, then
        each pushed into its session; a session with several utterances in the batch goes on in the next
        wave (its later turns' encoder inputs read the earlier ones). Then every success is written to the
        store in one transaction before anything is returned.  A failed item gets its exception and changes
        no state; if the write fails, the touched sessions are dropped from memory (they rebuild from the log).
        A :class:`WriterConflict` (another replica wrote to a session this one holds) drops only the sessions it
        names, whose items get it, and writes the rest of the batch in a second transaction."""
        out: list[Any] = [None] * len(items)
        if self.max_store_bytes is not None and self.store.size_bytes() >= self.max_store_bytes:
            full = LogFull("store_full", f"the session log is full ({self.max_store_bytes / 2**20:g} MiB); "
                                         "nothing new is stored until the operator makes room")
            return [full] * len(items)
        records: list[Record] = []
        touched: list[str] = []
        pending = list(range(len(items)))
        while pending:
            wave: list[int] = []
            later: list[int] = []
            in_wave: set[str] = set()
            for i in pending:  # arrival order within each session
                (later if items[i].session in in_wave else wave).append(i)
                in_wave.add(items[i].session)
            self._step_wave(items, wave, out, records, touched)
            pending = later
        while records:
            try:
                self.store.append(records)
            except WriterConflict as exc:  # another writer holds these sessions: let them go, write the rest
                for s in exc.sessions:
                    self.drop(s)
                out = [exc if isinstance(o, tuple) and o[1].session in exc.sessions else o for o in out]
                left = [r for r in records if r.session not in exc.sessions]
                if len(left) == len(records):  # the conflict names none of ours: nothing can be written
                    return [exc if isinstance(o, tuple) else o for o in out]
                records, touched = left, [t for t in touched if t not in exc.sessions]
                continue
            except Exception as exc:  # noqa: BLE001 - nothing was acknowledged: forget, rebuild from the log
                for s in set(touched):
                    self.drop(s)
                return [exc if isinstance(o, tuple) else o for o in out]
            if self._rebuilds_running:
                self._changed.update(touched)
            break
        return out

    def _step_wave(self, items: list[Item], wave: list[int], out: list[Any], records: list[Record],
                   touched: list[str]) -> None:
        """Embed and push items of distinct sessions (``wave``), filling ``out``, ``records``, ``touched``."""
        lives: dict[int, Live] = {}
        for i in wave:
            try:
                lives[i] = self.get(items[i].session)
            except AffectkitError as exc:
                out[i] = exc
                continue
            if self.max_utterances is not None and len(lives[i].stream) >= self.max_utterances:
                del lives[i]
                out[i] = LogFull("session_full", f"this session holds {self.max_utterances} utterances, the most "
                                                 "one session may; open a new session")
        texts = [i for i in lives if items[i].text is not None]
        vectors: dict[int, np.ndarray] = {}
        if texts and self.embed is None:
            err = DataError("this model cannot embed raw text; send features")
            for i in texts:
                out[i] = err
        elif texts:
            try:
                inputs = [lives[i].stream.text_input(items[i].speaker, items[i].text) for i in texts]
                emb = np.asarray(self.embed(inputs), dtype=np.float32)
                vectors = dict(zip(texts, emb))
            except Exception as exc:  # noqa: BLE001 - reported to each caller of the batch
                for i in texts:
                    out[i] = exc
        ready: dict[int, dict[str, Any]] = {}  # push_batch's utterances: name, features, raw sentence
        for i in lives:
            if out[i] is None:
                it = items[i]
                ready[i] = {"speaker": it.speaker, "sentence": it.text, **it.features,
                            **({"text": vectors[i]} if i in vectors else {})}
        preds: dict[int, Prediction] = {}
        # one forward for the wave's sessions; on any bad input, one by one (its own error)
        if len(ready) > 1 and self.engine_batch:
            try:
                preds = dict(zip(ready, push_batch([lives[i].stream for i in ready], list(ready.values()))))
            except (AffectkitError, ValueError):
                preds = {}
        for i, u in ready.items():
            it = items[i]
            try:
                pred = preds[i] if i in preds else push_batch([lives[i].stream], [u])[0]
            except (AffectkitError, ValueError) as exc:
                out[i] = exc
                continue
            latency = (time.perf_counter() - it.received) * 1000
            rec = Record(it.session, pred.position, it.speaker, it.text,
                         {m: np.asarray(u[m], dtype=np.float32) for m in self.base.modalities},
                         pred.label, pred.probs, latency)
            records.append(rec)
            touched.append(it.session)
            out[i] = (pred, rec)
