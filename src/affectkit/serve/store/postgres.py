"""The log on a PostgreSQL server, shared by several replicas of the service (``--store postgresql://...``).

The same tables, key and promises as the SQLite backend: ``(session, position)`` is the primary key, a batch
is one transaction, and :meth:`PostgresStore.append` returns only once PostgreSQL has committed it with
``synchronous_commit = on`` (set on every connection: the commit is flushed to the server's WAL before it
returns; a standby's confirmation is the operator's choice of ``synchronous_standby_names``).  The key is
also what keeps two replicas from both writing one session: the second writer's insert of a position that is
taken fails, and :class:`~affectkit.serve.store.base.WriterConflict` tells it which sessions to let go.

psycopg 3, used directly: the SQL is a dozen statements that differ from SQLite's only in placeholders and
upserts, and ``executemany`` sends a batch in one round trip (pipeline mode).  Two connections, each behind a
lock: one for writes (the service's worker thread, session creation), one for reads (request handlers), so a
handler's read never waits for a commit.  A connection found broken is opened again on the next call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

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

__all__ = ["PostgresStore", "display_url"]

T = TypeVar("T")
SCHEMA_LOCK = 0x61666B74  # "afkt": creating the tables is serialised across replicas starting together
SESSIONS_LOCK = 0x61666B73  # the session cap's count-then-insert, across replicas

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    model TEXT
);
CREATE TABLE IF NOT EXISTS models (
    hash TEXT PRIMARY KEY,
    dims TEXT NOT NULL,
    labels TEXT NOT NULL,
    text_encoder TEXT,
    first_seen DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS utterances (
    session TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    speaker TEXT NOT NULL,
    text TEXT,
    features TEXT NOT NULL,
    blob BYTEA NOT NULL,
    label TEXT NOT NULL,
    probs TEXT NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (session, position)
);
CREATE TABLE IF NOT EXISTS audio_utterances (
    session TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    meta TEXT NOT NULL,
    prosody BYTEA NOT NULL,
    pcm BYTEA,
    PRIMARY KEY (session, position)
);
"""
UTTERANCE_COLUMNS = "session, position, speaker, text, features, blob, label, probs, latency_ms, created"


def display_url(url: str) -> str:
    """``url`` without its password (or only its scheme when it cannot be parsed), for logs and error messages."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        d = conninfo_to_dict(url)
    except Exception:  # noqa: BLE001 - a malformed URL is shown as the scheme only
        return url.split("://", 1)[0] + "://..."
    user = d.get("user")
    host = d.get("host") or "localhost"
    at = f"{user}@" if user else ""
    return f"postgresql://{at}{host}:{d.get('port') or 5432}/{d.get('dbname') or ''}"


class _Conn:
    """One connection behind a lock, opened again when found broken."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self.url, self.timeout = url, connect_timeout
        self.lock = threading.Lock()
        self.db: Any = None

    def open(self) -> Any:
        import psycopg

        if self.db is None or self.db.closed or self.db.broken:
            if self.db is not None:
                self.db.close()
            self.db = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.timeout)))
            self.db.execute("SET synchronous_commit = on")
        return self.db

    def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(connection)`` in one transaction."""
        with self.lock:
            db = self.open()
            with db.transaction():
                return fn(db)

    def close(self) -> None:
        with self.lock:
            if self.db is not None:
                self.db.close()


class PostgresStore(LogStore):
    """The log in the PostgreSQL database at ``url`` (``postgresql://user[:password]@host[:port]/dbname``);
    the tables are created if missing.  ConfigError (one line) when the URL is malformed or the server
    cannot be reached within ``connect_timeout`` seconds."""

    shared = True  # replicas write to it

    def __init__(self, url: str, connect_timeout: float = 5.0) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigError("--store postgresql://... needs psycopg: pip install 'psycopg[binary]>=3.1'") from None
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"--store: not a PostgreSQL URL ({str(exc).splitlines()[0]})") from None
        self.url = display_url(url)
        self._write, self._read = _Conn(url, connect_timeout), _Conn(url, connect_timeout)
        try:
            self._write.run(_create_schema)
            self._read.open()
        except psycopg.Error as exc:
            self.close()
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
            raise ConfigError(f"--store {self.url}: cannot use this PostgreSQL database ({reason})") from None

    def close(self) -> None:
        self._write.close()
        self._read.close()

    # -- sessions

    def register_model(self, identity: dict[str, object]) -> None:
        self._write.run(lambda db: db.execute(
            "INSERT INTO models VALUES (%s, %s, %s, %s, %s) ON CONFLICT (hash) DO NOTHING", identity_row(identity)))

    def model(self, model_hash: str | None) -> dict[str, object] | None:
        return identity_of_row(self._read.run(lambda db: db.execute(
            "SELECT hash, dims, labels, text_encoder FROM models WHERE hash = %s", (model_hash,)).fetchone()))

    def sessions_of_other_models(self, model_hash: str) -> int:
        return int(self._read.run(lambda db: db.execute(
            "SELECT count(*) FROM sessions WHERE model IS DISTINCT FROM %s", (model_hash,)).fetchone()[0]))

    def create_session(self, session_id: str, token: str, model: str | None = None,
                       max_sessions: int | None = None) -> SessionRow | None:
        row = SessionRow(session_id, token_digest(token), time.time(), model)

        def create(db: Any) -> SessionRow | None:
            if max_sessions is not None:
                db.execute("SELECT pg_advisory_xact_lock(%s)", (SESSIONS_LOCK,))
                if db.execute("SELECT count(*) FROM sessions").fetchone()[0] >= max_sessions:
                    return None
            db.execute("INSERT INTO sessions VALUES (%s, %s, %s, %s)", (row.id, row.token_sha256, row.created,
                                                                        row.model))
            return row

        return self._write.run(create)

    def session(self, session_id: str) -> SessionRow | None:
        r = self._read.run(lambda db: db.execute(
            "SELECT id, token_sha256, created, model FROM sessions WHERE id = %s", (session_id,)).fetchone())
        return SessionRow(*r) if r else None

    def transcript(self, session_id: str) -> tuple[SessionRow, list[Record], dict[int, dict[str, object]]] | None:
        def read(db: Any) -> tuple[Any, list[tuple], list[tuple]]:
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one snapshot for the three reads
            r = db.execute("SELECT id, token_sha256, created, model FROM sessions WHERE id = %s",
                           (session_id,)).fetchone()
            if r is None:
                return None, [], []
            return r, _utterance_rows(db, session_id), _audio_rows(db, session_id)

        r, rows, audio = self._read.run(read)
        if r is None:
            return None
        return SessionRow(*r), [record_of(row) for row in rows], audio_of(audio)

    def expire(self, before: float) -> list[str]:
        def expire(db: Any) -> list[str]:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM sessions s WHERE created < %s AND NOT EXISTS "
                "(SELECT 1 FROM utterances u WHERE u.session = s.id AND u.created >= %s)", (before, before))]
            if ids:
                db.execute("DELETE FROM sessions WHERE id = ANY(%s)", (ids,))  # utterances and audio cascade
            return ids

        return self._write.run(expire)

    def size_bytes(self) -> int:
        """The four tables with their indexes and TOAST, as PostgreSQL counts them (dead rows included
        until vacuumed)."""
        return int(self._read.run(lambda db: db.execute(
            "SELECT coalesce(sum(pg_total_relation_size(t::regclass)), 0) FROM unnest(%s::text[]) t",
            (["sessions", "models", "utterances", "audio_utterances"],)).fetchone()[0]))

    def delete_session(self, session_id: str) -> bool:
        return bool(self._write.run(lambda db: db.execute(
            "DELETE FROM sessions WHERE id = %s", (session_id,)).rowcount))

    def count_sessions(self) -> int:
        return int(self._read.run(lambda db: db.execute("SELECT count(*) FROM sessions").fetchone()[0]))

    # -- utterances

    def append(self, records: Sequence[Record]) -> None:
        import psycopg

        rows = [row_of(r) for r in records]
        try:
            self._write.run(lambda db: db.cursor().executemany(
                f"INSERT INTO utterances ({UTTERANCE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows))
        except psycopg.errors.IntegrityError:  # rolled back: find whose rows refused the batch
            raise WriterConflict(self._write.run(lambda db: _conflicts(db, rows))) from None

    def records(self, session_id: str) -> Iterator[Record]:
        rows = self._read.run(lambda db: _utterance_rows(db, session_id))
        for row in rows:
            yield record_of(row)

    def next_position(self, session_id: str) -> int:
        return int(self._read.run(lambda db: db.execute(
            "SELECT COALESCE(MAX(position) + 1, 0) FROM utterances WHERE session = %s", (session_id,)).fetchone()[0]))

    def append_audio(self, session_id: str, position: int, meta: dict[str, object], prosody: np.ndarray,
                     pcm: bytes | None = None) -> None:
        import json

        blob = np.ascontiguousarray(prosody, dtype="<f4").tobytes()
        self._write.run(lambda db: db.execute(
            "INSERT INTO audio_utterances VALUES (%s, %s, %s, %s, %s) ON CONFLICT (session, position) DO UPDATE "
            "SET meta = EXCLUDED.meta, prosody = EXCLUDED.prosody, pcm = EXCLUDED.pcm",
            (session_id, int(position), json.dumps(meta), blob, pcm)))

    def audio(self, session_id: str) -> dict[int, dict[str, object]]:
        return audio_of(self._read.run(lambda db: _audio_rows(db, session_id)))

    def count_utterances(self) -> int:
        return int(self._read.run(lambda db: db.execute("SELECT count(*) FROM utterances").fetchone()[0]))

    def durability(self) -> dict[str, str]:
        """``synchronous_commit`` of the write connection and the server's ``fsync``, as PostgreSQL reports them."""
        return self._write.run(lambda db: {
            "synchronous_commit": str(db.execute("SHOW synchronous_commit").fetchone()[0]),
            "fsync": str(db.execute("SHOW fsync").fetchone()[0])})

    def integrity(self) -> str:
        """"ok" when every utterance belongs to a session and positions are the primary key (the server checks
        its own pages)."""
        bad = self._read.run(lambda db: db.execute(
            "SELECT count(*) FROM utterances u WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = u.session)"
        ).fetchone()[0])
        return "ok" if bad == 0 else f"{bad} utterance(s) without a session"


def _create_schema(db: Any) -> None:
    db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    db.execute(SCHEMA)


def _utterance_rows(db: Any, session_id: str) -> list[tuple]:
    return db.execute(f"SELECT {UTTERANCE_COLUMNS} FROM utterances WHERE session = %s ORDER BY position",
                      (session_id,)).fetchall()


def _audio_rows(db: Any, session_id: str) -> list[tuple]:
    return db.execute("SELECT position, meta, prosody, octet_length(pcm) FROM audio_utterances "
                      "WHERE session = %s ORDER BY position", (session_id,)).fetchall()


def _conflicts(db: Any, rows: list[tuple]) -> set[str]:
    """The sessions of ``rows`` whose position is taken or whose session row is gone."""
    keys = [(r[0], r[1]) for r in rows]
    sessions = sorted({k[0] for k in keys})
    live = {r[0] for r in db.execute("SELECT id FROM sessions WHERE id = ANY(%s)", (sessions,))}
    taken = {r[0] for r in db.execute(
        "SELECT u.session FROM utterances u JOIN unnest(%s::text[], %s::int[]) AS k(s, p) "
        "ON u.session = k.s AND u.position = k.p", ([k[0] for k in keys], [k[1] for k in keys]))}
    return {s for s in sessions if s not in live or s in taken}
