"""The durable log of the service: one interface (:class:`LogStore`), two backends.

- :class:`SQLiteStore` (default): one file, nothing to start; one service process.
- :class:`~affectkit.serve.store.postgres.PostgresStore` (``postgresql://...``): one database shared by
  several replicas behind a balancer (README: past one machine).

:func:`open_store` picks the backend from what the operator wrote after ``--store``.  ``Store`` is the SQLite
backend under the name older code uses.
"""

from __future__ import annotations

from pathlib import Path

from affectkit.errors import ConfigError
from affectkit.serve.store.base import LogStore, Record, SessionRow, WriterConflict, token_digest
from affectkit.serve.store.sqlite import SQLiteStore

__all__ = ["LogStore", "Record", "SQLiteStore", "SessionRow", "Store", "WriterConflict", "is_url", "open_store",
           "token_digest"]

Store = SQLiteStore
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_url(target: str | Path) -> bool:
    """Whether ``--store`` names a server (``scheme://...``) rather than a SQLite file."""
    return "://" in str(target)


def open_store(target: str | Path, synchronous: str = "FULL") -> LogStore:
    """The log at ``target``: ``postgresql://user@host:port/db`` (or ``postgres://``) opens PostgreSQL, anything
    else without a scheme is a SQLite file (``":memory:"`` for tests).  ``synchronous`` is SQLite's setting.
    ConfigError (one line) for an unknown scheme, a malformed URL or a server that cannot be reached."""
    text = str(target)
    if text.startswith(POSTGRES_SCHEMES):
        from affectkit.serve.store.postgres import PostgresStore

        return PostgresStore(text)
    if is_url(text):
        raise ConfigError(f"--store {text.split('://', 1)[0]}://...: unknown kind of store; give a SQLite file path "
                          "or a postgresql://user@host:port/dbname URL")
    return SQLiteStore(text, synchronous=synchronous)
