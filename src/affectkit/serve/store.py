"""A durable log of sessions and utterances in one SQLite file (WAL mode), and its replay.

Order of a write: append the batch's utterances, commit (``synchronous=FULL``: survives a power loss,
not only a process crash), and only then answer the clients.  ``(session, position)`` is the primary
key, so a position is written once.  Each utterance keeps the exact feature vectors the engine was
pushed (float32 bytes, no pickle), so replaying a session's log through the engine rebuilds its state
bit for bit without re-running the sentence encoder.  Tokens are stored as SHA-256 digests only.

One connection, guarded by a lock: the service writes from its single inference thread and reads from
the request handlers (through a thread pool), which SQLite in WAL mode serves without blocking writers
for long.  The interface (:class:`Store`) is what a shared database would implement to scale out.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from affectkit.errors import ConfigError

__all__ = ["Record", "SessionRow", "Store", "token_digest"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS utterances (
    session TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    speaker TEXT NOT NULL,
    text TEXT,
    features TEXT NOT NULL,   -- JSON {modality: [dim, offset]} into blob
    blob BLOB NOT NULL,       -- the float32 feature vectors the engine was pushed, concatenated
    label TEXT NOT NULL,
    probs TEXT NOT NULL,      -- JSON list, class order
    latency_ms REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (session, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audio_utterances (  -- what speech adds to an utterance (affectkit.serve.audio_ws)
    session TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    meta TEXT NOT NULL,       -- JSON: start, end (s in the track), confidence, words, forced
    prosody BLOB NOT NULL,    -- the 88 eGeMAPS numbers, float32
    pcm BLOB,                 -- the utterance's s16le audio, only when the service was asked to keep it
    PRIMARY KEY (session, position)
) WITHOUT ROWID;
"""


def token_digest(token: str) -> str:
    """The SHA-256 hex digest kept in place of a session token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


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


def _pack(features: dict[str, np.ndarray]) -> tuple[str, bytes]:
    layout, parts, offset = {}, [], 0
    for m, v in features.items():
        a = np.ascontiguousarray(v, dtype="<f4").reshape(-1)
        layout[m] = [int(a.size), offset]
        parts.append(a.tobytes())
        offset += a.size
    return json.dumps(layout), b"".join(parts)


def _unpack(layout: str, blob: bytes) -> dict[str, np.ndarray]:
    flat = np.frombuffer(blob, dtype="<f4")
    return {m: flat[off:off + dim].copy() for m, (dim, off) in json.loads(layout).items()}


class Store:
    """The SQLite log.  ``path`` may be ``":memory:"`` for tests; ``synchronous`` is ``"FULL"`` (default:
    an acknowledged utterance survives a power loss) or ``"NORMAL"`` (survives a process crash only)."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"store synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = str(path)
        if self.path != ":memory:":
            parent = Path(self.path).parent
            if not parent.is_dir():
                raise ConfigError(f"{self.path}: store folder {parent} does not exist")
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: not a usable SQLite store ({exc})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- sessions

    def create_session(self, session_id: str, token: str) -> SessionRow:
        row = SessionRow(session_id, token_digest(token), time.time())
        with self._lock:
            self._db.execute("INSERT INTO sessions VALUES (?, ?, ?)", (row.id, row.token_sha256, row.created))
        return row

    def session(self, session_id: str) -> SessionRow | None:
        with self._lock:
            r = self._db.execute("SELECT id, token_sha256, created FROM sessions WHERE id = ?",
                                 (session_id,)).fetchone()
        return SessionRow(*r) if r else None

    def delete_session(self, session_id: str) -> bool:
        """Delete a session and its utterances; False if there was none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM utterances WHERE session = ?", (session_id,))
                gone = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return gone > 0

    def count_sessions(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM sessions").fetchone()[0])

    # -- utterances

    def append(self, records: Sequence[Record]) -> None:
        """Write ``records`` in one transaction (all or none); returns once committed."""
        rows = []
        for r in records:
            layout, blob = _pack(r.features)
            rows.append((r.session, r.position, r.speaker, r.text, layout, blob, r.label,
                         json.dumps([float(p) for p in r.probs]), float(r.latency_ms), r.created))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO utterances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def records(self, session_id: str) -> Iterator[Record]:
        """The session's utterances in position order (the replay log)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT session, position, speaker, text, features, blob, label, probs, latency_ms, created "
                "FROM utterances WHERE session = ? ORDER BY position", (session_id,)).fetchall()
        for s, pos, spk, text, layout, blob, label, probs, lat, created in rows:
            yield Record(s, pos, spk, text, _unpack(layout, blob), label, json.loads(probs), lat, created)

    def append_audio(self, session_id: str, position: int, meta: dict[str, object], prosody: np.ndarray,
                     pcm: bytes | None = None) -> None:
        """Keep what speech adds to the utterance at ``position`` (written after the utterance itself)."""
        blob = np.ascontiguousarray(prosody, dtype="<f4").tobytes()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO audio_utterances VALUES (?, ?, ?, ?, ?)",
                             (session_id, int(position), json.dumps(meta), blob, pcm))

    def audio(self, session_id: str) -> dict[int, dict[str, object]]:
        """position -> {start, end, confidence, words, forced, prosody (list), audio_bytes} of a session's
        spoken utterances."""
        with self._lock:
            rows = self._db.execute("SELECT position, meta, prosody, length(pcm) FROM audio_utterances "
                                    "WHERE session = ? ORDER BY position", (session_id,)).fetchall()
        out: dict[int, dict[str, object]] = {}
        for pos, meta, blob, n_pcm in rows:
            d = json.loads(meta)
            d["prosody"] = [float(v) for v in np.frombuffer(blob, dtype="<f4")]
            d["audio_bytes"] = int(n_pcm or 0)
            out[int(pos)] = d
        return out

    def count_utterances(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM utterances").fetchone()[0])

    def durability(self) -> dict[str, str]:
        """The write connection's ``journal_mode`` and ``synchronous`` as SQLite reports them (``synchronous``
        by name: OFF, NORMAL, FULL, EXTRA), so tests and operators can check the promised setting."""
        names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        with self._lock:
            journal = str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            sync = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
        return {"journal_mode": journal, "synchronous": names.get(sync, str(sync))}

    def integrity(self) -> str:
        """``PRAGMA integrity_check``: "ok" for a sound file."""
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])
