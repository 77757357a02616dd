"""The durable log (``affectkit.serve.store``) on its own, on both backends (SQLite file; PostgreSQL on a
throw-away server, skipped where none can be started): sessions, utterances and their speech data round trip
exactly; caps, deletes and retention leave nothing behind; models are recorded once; a position is written
once, by one writer."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from affectkit.errors import ConfigError
from affectkit.serve.store import LogStore, Record, SessionRow, Store, WriterConflict, open_store, token_digest

IDENTITY = {"hash": "h1", "dims": {"text": 3}, "labels": ["a", "b"], "text_encoder": "minilm"}


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path) -> str:
    """Where a fresh log is: a SQLite file, or a new database on the throw-away PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "log.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(target) -> LogStore:
    s = open_store(target)
    yield s
    s.close()


def _rec(sid: str, pos: int, created: float | None = None, **kw) -> Record:
    feats = {"text": np.array([pos, 0.5, -1.25], np.float32), "audio": np.arange(4, dtype=np.float32) + pos}
    return Record(sid, pos, kw.get("speaker", "Ann"), kw.get("text", f"line {pos}"), feats, "b", [0.25, 0.75],
                  12.3456, time.time() if created is None else created)


def test_a_session_round_trips(store):
    row = store.create_session("sess-0001", "tok", "h1")
    assert row == store.session("sess-0001")
    assert (row.id, row.token_sha256, row.model) == ("sess-0001", token_digest("tok"), "h1")
    assert token_digest("tok") == hashlib.sha256(b"tok").hexdigest() and len(token_digest("tok")) == 64
    assert store.session("nope") is None and store.count_sessions() == 1


def test_the_session_cap_writes_nothing(store):
    assert store.create_session("s1", "t", max_sessions=2) is not None
    assert store.create_session("s2", "t", max_sessions=2) is not None
    assert store.create_session("s3", "t", max_sessions=2) is None
    assert store.session("s3") is None and store.count_sessions() == 2
    assert store.create_session("s3", "t") is not None  # no cap: accepted


def test_utterances_and_speech_round_trip_exactly(store):
    store.create_session("s1", "t")
    recs = [_rec("s1", 0), _rec("s1", 1, speaker="Bob", text=None)]
    store.append(recs)
    back = list(store.records("s1"))
    assert len(back) == 2 and store.count_utterances() == 2
    for a, b in zip(recs, back):
        assert (a.session, a.position, a.speaker, a.text, a.label, list(a.probs), a.latency_ms, a.created) == \
               (b.session, b.position, b.speaker, b.text, b.label, list(b.probs), b.latency_ms, b.created)
        assert set(b.features) == {"text", "audio"}
        for m in a.features:
            assert b.features[m].dtype == np.float32 and np.array_equal(a.features[m], b.features[m])
    assert back[1].public() == {"position": 1, "speaker": "Bob", "text": None, "label": "b", "probs": [0.25, 0.75],
                                "latency_ms": 12.346, "time": recs[1].created}
    prosody = np.linspace(-1, 1, 88, dtype=np.float32)
    store.append_audio("s1", 1, {"start": 1.5, "end": 2.25, "confidence": 0.9}, prosody, pcm=b"\x00\x01" * 10)
    store.append_audio("s1", 0, {"start": 0.0, "end": 1.0}, prosody * 2)
    audio = store.audio("s1")
    assert list(audio) == [0, 1]
    assert audio[1]["start"] == 1.5 and audio[1]["end"] == 2.25 and audio[1]["confidence"] == 0.9
    assert audio[1]["audio_bytes"] == 20 and audio[0]["audio_bytes"] == 0
    assert np.array_equal(np.array(audio[1]["prosody"], np.float32), prosody)
    assert np.array_equal(np.array(audio[0]["prosody"], np.float32), prosody * 2)
    row, t_recs, t_audio = store.transcript("s1")
    assert row == store.session("s1") and [r.position for r in t_recs] == [0, 1] and t_audio == audio
    assert store.transcript("nope") is None


def test_next_position_counts_the_sessions_own_log(store, target):
    store.create_session("s1", "t")
    store.create_session("s2", "t")
    assert store.next_position("s1") == 0 and store.next_position("nope") == 0
    store.append([_rec("s1", 0), _rec("s1", 1), _rec("s1", 2), _rec("s2", 0)])
    assert store.next_position("s1") == 3 and store.next_position("s2") == 1
    assert store.shared is target.startswith("postgresql")  # only a server's log has other writers


def test_delete_takes_the_log_and_the_speech_with_it(store):
    for sid in ("s1", "s2"):
        store.create_session(sid, "t")
        store.append([_rec(sid, 0), _rec(sid, 1)])
        store.append_audio(sid, 0, {"start": 0.0}, np.zeros(88, np.float32))
    assert store.delete_session("s1") is True and store.delete_session("s1") is False
    assert store.session("s1") is None and list(store.records("s1")) == [] and store.audio("s1") == {}
    assert store.count_sessions() == 1 and store.count_utterances() == 2 and len(store.audio("s2")) == 1
    assert store.integrity() == "ok"


def test_retention_deletes_only_sessions_idle_since_the_cutoff(store):
    now = time.time()
    store.create_session("idle", "t")
    store.append([_rec("idle", 0, created=now - 100)])
    store.create_session("busy", "t")
    store.append([_rec("busy", 0, created=now - 100), _rec("busy", 1, created=now + 100)])
    store.create_session("empty", "t")
    store.append_audio("idle", 0, {"start": 0.0}, np.zeros(88, np.float32))
    assert sorted(store.expire(now + 50)) == ["empty", "idle"]
    assert store.session("busy") is not None and store.session("idle") is None and store.audio("idle") == {}
    assert store.count_utterances() == 2 and store.expire(now + 50) == []
    assert store.expire(now - 1e6) == []  # nothing created that long ago


def test_models_are_recorded_once_and_sessions_counted_by_model(store):
    assert store.model("h1") is None
    store.register_model(IDENTITY)
    store.register_model({**IDENTITY, "labels": ["x"]})  # known already: kept as first recorded
    assert store.model("h1") == IDENTITY
    store.create_session("s1", "t", "h1")
    store.create_session("s2", "t", "h2")
    store.create_session("s3", "t")  # logged before models were recorded
    assert store.sessions_of_other_models("h1") == 2 and store.sessions_of_other_models("h2") == 2
    assert store.model(None) is None


def test_size_grows_with_the_log_and_the_file_is_sound(store):
    before = store.size_bytes()
    assert before > 0
    store.create_session("s1", "t")
    store.append([_rec("s1", p) for p in range(200)])
    assert store.size_bytes() > before + 200 * 12
    want = {"journal_mode": "wal", "synchronous": "FULL"} if isinstance(store, Store) else \
        {"synchronous_commit": "on", "fsync": store.durability()["fsync"]}
    assert store.durability() == want
    assert isinstance(store.session("s1"), SessionRow) and store.integrity() == "ok"


def test_durability_names_every_setting(tmp_path):
    """What ``durability()`` reports is SQLite's own reading, by name (OFF and EXTRA set behind its back)."""
    store = Store(tmp_path / "log.db")
    for value, name in ((0, "OFF"), (1, "NORMAL"), (2, "FULL"), (3, "EXTRA")):
        store._db.execute(f"PRAGMA synchronous={value}")
        assert store.durability() == {"journal_mode": "wal", "synchronous": name}
    store._db.execute("PRAGMA synchronous=4")  # SQLite keeps a number it has no name for: shown as the number
    assert store.durability() == {"journal_mode": "wal", "synchronous": "4"}
    store.close()


def test_postgres_commits_synchronously_whatever_the_server_default(postgres_url):
    """``synchronous_commit = on`` on the store's own connection, even where the database's default is off: an
    acknowledged utterance is in the server's WAL."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute(f"ALTER DATABASE {postgres_url.rsplit('/', 1)[1]} SET synchronous_commit = off")
        fsync = db.execute("SHOW fsync").fetchone()[0]
    store = open_store(postgres_url)
    assert store.durability() == {"synchronous_commit": "on", "fsync": fsync}  # the server's own setting
    store.close()


def test_a_position_is_written_once_and_the_second_writer_is_named(target):
    """Two writers (two replicas) on one log: the second append of a position fails as a whole, naming only the
    session whose position was taken (and one whose session is gone); the other writer's rows stay."""
    a, b = open_store(target), open_store(target)
    try:
        for sid in ("s1", "s2", "s3"):
            a.create_session(sid, "t")
        a.append([_rec("s1", 0), _rec("s2", 0)])
        b.delete_session("s3")
        with pytest.raises(WriterConflict, match="UNIQUE") as err:
            b.append([_rec("s2", 1), _rec("s1", 0, speaker="Bob"), _rec("s3", 0)])
        assert err.value.sessions == {"s1", "s3"}
        assert [r.position for r in a.records("s2")] == [0]  # all or none: s2's row of that batch is not there
        assert [r.speaker for r in a.records("s1")] == ["Ann"]
        b.append([_rec("s2", 1)])
        assert [r.position for r in a.records("s2")] == [0, 1] and a.count_utterances() == 3
    finally:
        a.close()
        b.close()


def test_the_kind_of_store_is_read_from_the_target(tmp_path):
    assert isinstance(open_store(tmp_path / "x.db"), Store)
    with pytest.raises(ConfigError, match="unknown kind of store"):
        open_store("mysql://u@h/db")
    with pytest.raises(ConfigError, match=r"not a PostgreSQL URL \(end of string reached when looking for "):
        open_store("postgresql://u@[::1/db")


def test_an_unreachable_postgres_is_one_line_that_hides_the_password():
    """The line names the store (without its password) and the server's first line of reason."""
    from affectkit.serve.throwaway import free_port

    pytest.importorskip("psycopg")
    port = free_port()
    with pytest.raises(ConfigError) as err:
        open_store(f"postgresql://u:secret@127.0.0.1:{port}/db")
    text = str(err.value)
    assert text.startswith(f"--store postgresql://u@127.0.0.1:{port}/db: cannot use this PostgreSQL database (")
    assert "refused" in text.lower() and "secret" not in text and "\n" not in text and "None" not in text


def test_a_reason_without_words_is_named_by_its_kind(postgres_url, monkeypatch):
    """A database error with an empty message still says what it was (its class), never an empty ``()``."""
    psycopg = pytest.importorskip("psycopg")
    from affectkit.serve.store import postgres

    def fail(db):
        raise psycopg.errors.InsufficientPrivilege("")

    monkeypatch.setattr(postgres, "_create_schema", fail)
    with pytest.raises(ConfigError, match=r"cannot use this PostgreSQL database \(InsufficientPrivilege\)$"):
        open_store(postgres_url)


def test_a_server_that_never_answers_is_given_up_on(monkeypatch):
    """A port that accepts connections but never speaks (a hung server, a black-holed proxy) is a ConfigError
    after the connect timeout, not a service that never starts."""
    import socket
    import threading

    pytest.importorskip("psycopg")
    from affectkit.serve.store.postgres import PostgresStore

    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        outcome: list[BaseException] = []

        def connect() -> None:
            try:
                PostgresStore(f"postgresql://u@127.0.0.1:{silent.getsockname()[1]}/db", connect_timeout=1)
            except BaseException as exc:  # noqa: BLE001 - the test looks at it
                outcome.append(exc)

        worker = threading.Thread(target=connect, daemon=True)
        worker.start()
        worker.join(30)  # psycopg's floor is 2 s; without a timeout it would wait 130 s
        finished = not worker.is_alive()
    worker.join(30)  # the listener is closed: a connect still waiting fails now
    assert finished, "the store waited for a server that never answers"
    assert len(outcome) == 1 and isinstance(outcome[0], ConfigError)
    assert "cannot use this PostgreSQL database" in str(outcome[0])


def test_without_psycopg_the_line_says_what_to_install(monkeypatch):
    import sys

    from affectkit.serve.store.postgres import PostgresStore

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(ConfigError, match=r"^--store postgresql://\.\.\. needs psycopg: pip install "
                                          r"'psycopg\[binary\]>=3\.1'$"):
        PostgresStore("postgresql://u@h/db")


def test_a_closed_connection_is_opened_again(postgres_url):
    """A connection closed under the store (a server restart, an admin's kill) is replaced on next use."""
    store = open_store(postgres_url)
    try:
        store.create_session("s1", "t")
        store._read.db.close()
        store._write.db.close()
        assert store.count_sessions() == 1
        assert store.create_session("s2", "t") is not None and store.count_sessions() == 2
    finally:
        store.close()


def test_postgres_integrity_counts_utterances_without_a_session(postgres_url):
    """The check reports rows the foreign key should have prevented (here, with the key dropped by hand)."""
    import psycopg

    store = open_store(postgres_url)
    try:
        store.create_session("s1", "t")
        store.append([_rec("s1", 0), _rec("s1", 1)])
        assert store.integrity() == "ok"
        with psycopg.connect(postgres_url, autocommit=True) as db:
            db.execute("ALTER TABLE utterances DROP CONSTRAINT utterances_session_fkey")
            db.execute("DELETE FROM sessions WHERE id = 's1'")
        assert store.integrity() == "2 utterance(s) without a session"
    finally:
        store.close()


def test_prosody_is_kept_as_float32_whatever_it_came_as(store):
    store.create_session("s1", "t")
    prosody = np.linspace(0, 1, 88)  # float64
    store.append_audio("s1", 0, {"start": 0.0}, prosody)
    assert np.array_equal(np.array(store.audio("s1")[0]["prosody"]), prosody.astype(np.float32))


# -- SQLite only: opening, migrating, threads, and a failure inside a transaction


def test_sqlite_refuses_a_missing_folder_a_bad_setting_and_a_file_that_is_not_a_log(tmp_path):
    with pytest.raises(ConfigError, match="store folder .* does not exist"):
        Store(tmp_path / "no" / "log.db")
    with pytest.raises(ConfigError, match="synchronous must be FULL or NORMAL, got 'OFF'"):
        Store(tmp_path / "log.db", synchronous="OFF")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database, only bytes " * 100)
    with pytest.raises(ConfigError, match="not a usable SQLite store"):
        Store(junk)
    normal = Store(tmp_path / "log.db", synchronous="NORMAL")
    assert normal.durability() == {"journal_mode": "wal", "synchronous": "NORMAL"}
    normal.close()
    memory = Store(":memory:")  # no file, no folder to check
    assert memory.create_session("s1", "t") is not None and memory.count_sessions() == 1
    memory.close()


def test_a_log_from_before_models_gains_the_column_and_opens_again(tmp_path):
    """A sessions table without ``model`` (a log written before models were recorded) is migrated once; the
    migrated file opens again (the column is found, not added twice) and keeps its old sessions."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL, created REAL NOT NULL)")
        db.execute("INSERT INTO sessions VALUES ('old', 'x', 1.0)")
    for _ in range(2):
        store = Store(path)
        assert store.session("old") == SessionRow("old", "x", 1.0, None)
        store.close()
    store = Store(path)
    store.create_session("new", "t", "h1")
    assert store.session("new").model == "h1" and store.sessions_of_other_models("h1") == 1
    store.close()


def test_sqlite_serves_other_threads(tmp_path):
    """The service reads from request threads what its inference thread writes: one connection, any thread."""
    from concurrent.futures import ThreadPoolExecutor

    store = Store(tmp_path / "log.db")
    store.create_session("s1", "t")
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(store.count_sessions).result() == 1
        pool.submit(store.append, [_rec("s1", 0)]).result()
    assert [r.position for r in store.records("s1")] == [0]
    store.close()


class _Boom(Exception):
    pass


class _FailingDB:
    """The store's connection, except that the statement containing ``fail_on`` raises (a disk error, an
    interrupt half-way through a transaction)."""

    def __init__(self, db, fail_on: str) -> None:
        self.db, self.fail_on = db, fail_on

    def execute(self, sql, *args):
        if self.fail_on in sql:
            raise _Boom(sql)
        return self.db.execute(sql, *args)

    def executemany(self, sql, *args):
        if self.fail_on in sql:
            raise _Boom(sql)
        return self.db.executemany(sql, *args)


@pytest.mark.parametrize(("fail_on", "call"), [
    ("INSERT INTO sessions", lambda s: s.create_session("s2", "t", max_sessions=5)),
    ("DELETE FROM sessions", lambda s: s.delete_session("s1")),
    ("DELETE FROM sessions", lambda s: s.expire(time.time() + 1e6)),
    ("INSERT INTO utterances", lambda s: s.append([_rec("s1", 1)])),
])
def test_a_failure_inside_a_transaction_rolls_it_back_and_raises_it(tmp_path, fail_on, call):
    """The error itself reaches the caller (not one from cleaning up), nothing of the transaction stays (the
    utterances a delete removed before failing are back) and the connection takes the next transaction."""
    store = Store(tmp_path / "log.db")
    store.create_session("s1", "t")
    store.append([_rec("s1", 0)])
    real = store._db
    store._db = _FailingDB(real, fail_on)
    with pytest.raises(_Boom):
        call(store)
    store._db = real
    assert [r.position for r in store.records("s1")] == [0] and store.count_sessions() == 1
    store.append([_rec("s1", 1)])  # BEGIN IMMEDIATE again: the failed transaction is not still open
    assert store.create_session("s3", "t") is not None and store.count_utterances() == 2
    store.close()


def test_size_leaves_out_free_pages(tmp_path):
    """Deleted sessions free their pages: the size counts pages in use, so it shrinks."""
    store = Store(tmp_path / "log.db")
    store.create_session("s1", "t")
    store.append([_rec("s1", p) for p in range(300)])
    full = store.size_bytes()
    store.delete_session("s1")
    free = int(store._db.execute("PRAGMA freelist_count").fetchone()[0])
    assert free > 0 and store.size_bytes() < full
    store.close()


@pytest.mark.parametrize("url, shown", [
    ("postgresql://bob:secret@db.example.com:6543/logs", "postgresql://bob@db.example.com:6543/logs"),
    ("postgresql://db/x", "postgresql://db:5432/x"),  # no user, the default port
    ("postgresql://alice@h/", "postgresql://alice@h:5432/"),  # no database
    ("postgresql:///x", "postgresql://localhost:5432/x"),  # no host: the local server
    ("postgresql://a:b@[bad", "postgresql://..."),  # malformed: the scheme only, never the password
    ("postgresql://a:secret@h/d?bad=x://y", "postgresql://..."),  # malformed after a second "://"
    ("nonsense://x y", "nonsense://..."),
])
def test_a_url_is_shown_without_its_password(url, shown):
    pytest.importorskip("psycopg")
    from affectkit.serve.store.postgres import display_url

    assert display_url(url) == shown
