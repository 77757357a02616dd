"""The log in one SQLite file (WAL mode): the default backend, nothing to start.

Order of a write: append the batch's utterances, commit (``synchronous=FULL``: survives a power loss,
not only a process crash), and only then answer the clients.  ``(session, position)`` is the primary
key, so a position is written once.  Each utterance keeps the exact feature vectors the engine was
pushed (float32 bytes, no pickle), so replaying a session's log through the engine rebuilds its state
bit for bit without re-running the sentence encoder.  Tokens are stored as SHA-256 digests only.

One connection, guarded by a lock: the service writes from its single inference thread and reads from
the request handlers (through a thread pool), which SQLite in WAL mode serves without blocking writers
for long.  :mod:`affectkit.serve.store.postgres` implements the same interface on a shared server.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from affectkit.errors import ConfigError
from affectkit.serve.store.base import (
    LogStore,
    Record,
    SessionRow,
    WriterConflict,
    audio_of,
    identity_of_row,
    identity_row,
    record_of,
    row_of,
    token_digest,
)

__all__ = ["SQLiteStore"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    model TEXT                -- models.hash of the model that answers it (NULL: logged before models were)
);
CREATE TABLE IF NOT EXISTS models (  -- every model that answered a session here
    hash TEXT PRIMARY KEY,    -- SHA-256 over the weights and the fields below (serve.service.model_identity)
    dims TEXT NOT NULL,       -- JSON {modality: dim}
    labels TEXT NOT NULL,     -- JSON list, class order
    text_encoder TEXT,
    first_seen REAL NOT NULL
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


class SQLiteStore(LogStore):
    """The SQLite log (the default backend).  ``path`` may be ``":memory:"`` for tests; ``synchronous`` is
    ``"FULL"`` (default: an acknowledged utterance survives a power loss) or ``"NORMAL"`` (survives a process
    crash only)."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigError(f"store synchronous must be FULL or NORMAL, got {synchronous!r}")
        self.path = self.url = str(path)
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
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(sessions)")}
            if "model" not in columns:  # a log written before sessions recorded their model
                self._db.execute("ALTER TABLE sessions ADD COLUMN model TEXT")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: not a usable SQLite store ({exc})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- sessions

    def register_model(self, identity: dict[str, object]) -> None:
        """Record a model (``hash``, ``dims``, ``labels``, ``text_encoder``) unless it is known already."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?)", identity_row(identity))

    def model(self, model_hash: str | None) -> dict[str, object] | None:
        """A recorded model's identity, or None."""
        with self._lock:
            r = self._db.execute("SELECT hash, dims, labels, text_encoder FROM models WHERE hash = ?",
                                 (model_hash,)).fetchone()
        return identity_of_row(r)

    def sessions_of_other_models(self, model_hash: str) -> int:
        """How many sessions were logged through another model (or before models were recorded)."""
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM sessions WHERE model IS NOT ?",
                                        (model_hash,)).fetchone()[0])

    def create_session(self, session_id: str, token: str, model: str | None = None,
                       max_sessions: int | None = None) -> SessionRow | None:
        """Add a session answered by ``model``; None (nothing written) when ``max_sessions`` exist already."""
        row = SessionRow(session_id, token_digest(token), time.time(), model)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if max_sessions is not None and \
                        self._db.execute("SELECT count(*) FROM sessions").fetchone()[0] >= max_sessions:
                    self._db.execute("ROLLBACK")
                    return None
                self._db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)",
                                 (row.id, row.token_sha256, row.created, row.model))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return row

    def session(self, session_id: str) -> SessionRow | None:
        with self._lock:
            r = self._db.execute("SELECT id, token_sha256, created, model FROM sessions WHERE id = ?",
                                 (session_id,)).fetchone()
        return SessionRow(*r) if r else None

    def transcript(self, session_id: str) -> tuple[SessionRow, list[Record], dict[int, dict[str, object]]] | None:
        """The session, its utterances and their speech data read in one transaction (a delete in between
        cannot leave half a transcript), or None if there is no such session."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                r = self._db.execute("SELECT id, token_sha256, created, model FROM sessions WHERE id = ?",
                                     (session_id,)).fetchone()
                rows = self._utterance_rows(session_id) if r else []
                audio = self._audio_rows(session_id) if r else []
            finally:
                self._db.execute("COMMIT")
        if r is None:
            return None
        return SessionRow(*r), [record_of(row) for row in rows], audio_of(audio)

    def expire(self, before: float) -> list[str]:
        """Delete the sessions created before ``before`` with no utterance since (and their logs); their ids."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [r[0] for r in self._db.execute(
                    "SELECT id FROM sessions s WHERE created < ? AND NOT EXISTS "
                    "(SELECT 1 FROM utterances u WHERE u.session = s.id AND u.created >= ?)", (before, before))]
                for sid in ids:
                    self._db.execute("DELETE FROM utterances WHERE session = ?", (sid,))
                    self._db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return ids

    def size_bytes(self) -> int:
        """The log's size as SQLite counts it (pages in use times page size)."""
        with self._lock:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
            size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

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
        """Write ``records`` in one transaction (all or none); returns once committed.  A position written
        already, or a session gone: :class:`WriterConflict` (nothing written)."""
        rows = [row_of(r) for r in records]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT INTO utterances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise WriterConflict(self._conflicts(rows)) from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _conflicts(self, rows: list[tuple]) -> set[str]:
        """The sessions of ``rows`` whose position is taken or whose session row is gone."""
        out = set()
        for sid, pos, *_ in rows:
            if self._db.execute("SELECT 1 FROM sessions WHERE id = ?", (sid,)).fetchone() is None or \
                    self._db.execute("SELECT 1 FROM utterances WHERE session = ? AND position = ?",
                                     (sid, pos)).fetchone() is not None:
                out.add(sid)
        return out

    def records(self, session_id: str) -> Iterator[Record]:
        """The session's utterances in position order (the replay log)."""
        with self._lock:
            rows = self._utterance_rows(session_id)
        for row in rows:
            yield record_of(row)

    def next_position(self, session_id: str) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM utterances WHERE session = ?",
                                        (session_id,)).fetchone()[0])

    def _utterance_rows(self, session_id: str) -> list[tuple]:
        return self._db.execute(
            "SELECT session, position, speaker, text, features, blob, label, probs, latency_ms, created "
            "FROM utterances WHERE session = ? ORDER BY position", (session_id,)).fetchall()

    def _audio_rows(self, session_id: str) -> list[tuple]:
        return self._db.execute("SELECT position, meta, prosody, length(pcm) FROM audio_utterances "
                                "WHERE session = ? ORDER BY position", (session_id,)).fetchall()

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
            rows = self._audio_rows(session_id)
        return audio_of(rows)

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
