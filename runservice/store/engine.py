"""Engine setup: SQLite pragmas for the embedded default, pool settings for servers."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 5_000

# aiosqlite logs every statement with its parameters at DEBUG; parameters are run inputs
# and event payloads, which must never reach the log, even at --log-level debug.
logging.getLogger("aiosqlite").setLevel(logging.INFO)


def make_engine(url: str) -> AsyncEngine:
    """An async engine for `url`; SQLite files get WAL, a busy timeout and synchronous=NORMAL."""
    parsed = make_url(url)
    # hide_parameters: a failed statement's error must not carry run inputs into the log.
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True, hide_parameters=True)
    engine = create_async_engine(url, hide_parameters=True)
    _set_sqlite_pragmas(engine.sync_engine, SQLITE_BUSY_TIMEOUT_MS)
    return engine


def make_writer_engine(url: str) -> Engine | None:
    """For a SQLite file, a synchronous engine for the group commits (the store runs each
    commit as one call on a thread of its own); None for other databases.

    Its busy timeout is zero: a locked database fails at once and the store retries with
    an async backoff, so no thread sleeps inside SQLite holding up the commits queued
    behind it.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    engine = create_engine(
        parsed.set(drivername="sqlite+pysqlite"), hide_parameters=True, pool_size=1
    )
    _set_sqlite_pragmas(engine, busy_timeout_ms=0)
    return engine


def _set_sqlite_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    """Every new connection of `engine` gets WAL, synchronous=NORMAL and the busy timeout."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def sqlite_url(path: str) -> str:
    """The async SQLAlchemy URL of a SQLite file."""
    return f"sqlite+aiosqlite:///{path}"
