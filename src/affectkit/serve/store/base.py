"""What every backend of the log shares: the records, the interface (:class:`LogStore`), the feature packing and
the one error a second writer gets (:class:`WriterConflict`).

A backend keeps three promises: ``(session, position)`` is the primary key (a position is written once, by one
writer), :meth:`LogStore.append` writes a batch in one transaction and returns only once it is committed (the
service answers after that), and :meth:`LogStore.records` replays a session in position order.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from affectkit.errors import AffectkitError

__all__ = ["LogStore", "Record", "SessionRow", "WriterConflict", "token_digest"]


def token_digest(token: str) -> str:
    """The SHA-256 hex digest kept in place of a session token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class WriterConflict(AffectkitError):
    """An append met a position already written (another replica holds the session) or a session that is gone;
    nothing of the batch was written.  ``sessions``: the sessions whose rows refused the batch."""

    def __init__(self, sessions: Iterable[str]) -> None:
        self.sessions = frozenset(sessions)
        super().__init__(f"session(s) {', '.join(sorted(self.sessions))} changed under this writer: a position is "
                         "written already (UNIQUE (session, position)) or the session is gone; nothing was written")


@dataclass
class Record:
    """One answered utterance: what came in (speaker name, raw text if any, the feature vectors the
    engine was pushed) and what went out (label, probabilities, latency)."""

    session: str
    position: int
    speaker: str
    text: str | None
    features: dict[str, np.ndarray]
    label: str
    probs: Sequence[float]
    latency_ms: float = 0.0
    created: float = field(default_factory=time.time)

    def public(self) -> dict[str, object]:
        """The transcript row a client sees (no feature vectors)."""
        return {"position": self.position, "speaker": self.speaker, "text": self.text, "label": self.label,
                "probs": list(self.probs), "latency_ms": round(self.latency_ms, 3), "time": self.created}


@dataclass(frozen=True)
class SessionRow:
    id: str
    token_sha256: str
    created: float
    model: str | None = None


def pack(features: dict[str, np.ndarray]) -> tuple[str, bytes]:
    """Feature vectors -> (JSON layout ``{modality: [dim, offset]}``, concatenated float32 bytes)."""
    layout, parts, offset = {}, [], 0
    for m, v in features.items():
        a = np.ascontiguousarray(v, dtype="<f4").reshape(-1)
        layout[m] = [int(a.size), offset]
        parts.append(a.tobytes())
        offset += a.size
    return json.dumps(layout), b"".join(parts)


def unpack(layout: str, blob: bytes) -> dict[str, np.ndarray]:
    flat = np.frombuffer(bytes(blob), dtype="<f4")
    return {m: flat[off:off + dim].copy() for m, (dim, off) in json.loads(layout).items()}


def row_of(r: Record) -> tuple:
    """A record as the ``utterances`` row both backends write (column order of the table)."""
    layout, blob = pack(r.features)
    return (r.session, int(r.position), r.speaker, r.text, layout, blob, r.label,
            json.dumps([float(p) for p in r.probs]), float(r.latency_ms), float(r.created))


def record_of(row: tuple) -> Record:
    s, pos, spk, text, layout, blob, label, probs, lat, created = row
    return Record(s, int(pos), spk, text, unpack(layout, blob), label, json.loads(probs), lat, created)


def audio_of(rows: list[tuple]) -> dict[int, dict[str, object]]:
    out: dict[int, dict[str, object]] = {}
    for pos, meta, blob, n_pcm in rows:
        d = json.loads(meta)
        d["prosody"] = [float(v) for v in np.frombuffer(bytes(blob), dtype="<f4")]
        d["audio_bytes"] = int(n_pcm or 0)
        out[int(pos)] = d
    return out


def identity_row(identity: dict[str, object]) -> tuple:
    return (identity["hash"], json.dumps(identity["dims"]), json.dumps(identity["labels"]),
            identity.get("text_encoder"), time.time())


def identity_of_row(r: tuple | None) -> dict[str, object] | None:
    return {"hash": r[0], "dims": json.loads(r[1]), "labels": json.loads(r[2]), "text_encoder": r[3]} if r else None


class LogStore(ABC):
    """The durable log of sessions and utterances, whatever holds it (SQLite file, PostgreSQL server).  Safe to
    call from several threads; the service appends from its one worker thread."""

    url: str  # where the log is, as the operator named it (a password never shown)
    #: whether other processes may write to this log (replicas): then a session held in memory can be stale
    shared: bool = False

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def register_model(self, identity: dict[str, object]) -> None:
        """Record a model (``hash``, ``dims``, ``labels``, ``text_encoder``) unless it is known already."""

    @abstractmethod
    def model(self, model_hash: str | None) -> dict[str, object] | None:
        """A recorded model's identity, or None."""

    @abstractmethod
    def sessions_of_other_models(self, model_hash: str) -> int:
        """How many sessions were logged through another model (or before models were recorded)."""

    @abstractmethod
    def create_session(self, session_id: str, token: str, model: str | None = None,
                       max_sessions: int | None = None) -> SessionRow | None:
        """Add a session answered by ``model``; None (nothing written) when ``max_sessions`` exist already."""

    @abstractmethod
    def session(self, session_id: str) -> SessionRow | None: ...

    @abstractmethod
    def transcript(self, session_id: str) -> tuple[SessionRow, list[Record], dict[int, dict[str, object]]] | None:
        """The session, its utterances and their speech data read in one transaction, or None."""

    @abstractmethod
    def expire(self, before: float) -> list[str]:
        """Delete the sessions created before ``before`` with no utterance since (and their logs); their ids."""

    @abstractmethod
    def size_bytes(self) -> int:
        """The log's size in bytes as the backend counts it."""

    @abstractmethod
    def delete_session(self, session_id: str) -> bool:
        """Delete a session and its utterances; False if there was none."""

    @abstractmethod
    def count_sessions(self) -> int: ...

    @abstractmethod
    def append(self, records: Sequence[Record]) -> None:
        """Write ``records`` in one transaction (all or none); returns once committed.  A position written
        already, or a session gone, raises :class:`WriterConflict` naming the sessions (nothing written)."""

    @abstractmethod
    def records(self, session_id: str) -> Iterator[Record]:
        """The session's utterances in position order (the replay log)."""

    @abstractmethod
    def next_position(self, session_id: str) -> int:
        """The position the session's next utterance takes (how many it has logged; 0 for none or no such
        session): one indexed read, to tell whether a session held in memory is behind the log."""

    @abstractmethod
    def append_audio(self, session_id: str, position: int, meta: dict[str, object], prosody: np.ndarray,
                     pcm: bytes | None = None) -> None:
        """Keep what speech adds to the utterance at ``position`` (written after the utterance itself)."""

    @abstractmethod
    def audio(self, session_id: str) -> dict[int, dict[str, object]]:
        """position -> {start, end, confidence, words, forced, prosody (list), audio_bytes}."""

    @abstractmethod
    def count_utterances(self) -> int: ...

    @abstractmethod
    def durability(self) -> dict[str, str]:
        """The backend's durability settings by name, as the server reports them."""

    @abstractmethod
    def integrity(self) -> str:
        """"ok" for a sound log."""
