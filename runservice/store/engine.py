"""Engine setup: SQLite pragmas for the embedded default, a connection pool for PostgreSQL."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runservice.store.preflight import DatabaseRefusedError

SQLITE_BUSY_TIMEOUT_MS = 5_000
PG_CONNECT_TIMEOUT_S = 10
"""How long a new PostgreSQL connection may take before the attempt counts as failed."""

SUPPORTED = (
    "SQLite (sqlite+aiosqlite:///FILE) or PostgreSQL (postgresql+asyncpg://USER@HOST:PORT/DB)"
)

# aiosqlite logs every statement with its parameters at DEBUG; parameters are run inputs
# and event payloads, which must never reach the log, even at --log-level debug.
logging.getLogger("aiosqlite").setLevel(logging.INFO)


def make_engine(
    url: str,
    *,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    idle_in_transaction: float | None = None,
) -> AsyncEngine:
    """An async engine for `url`; SQLite files get WAL, a busy timeout and synchronous=NORMAL.

    A PostgreSQL engine pools up to `pool_size` connections, plus `max_overflow` opened
    for a burst and closed after it (SQLAlchemy's defaults when None), each checked
    before use (pool_pre_ping), so a restarted database costs no failed statement. With
    `idle_in_transaction` (seconds), the database ends a session that keeps a transaction
    open with nothing to do for longer: a server paused mid-commit (a long stall, SIGSTOP)
    then holds no lock that its peers wait on (the lease sweep, store/cluster.py).
    DatabaseRefusedError for a URL of any other database or driver.
    """
    parsed = check_url(url)
    # hide_parameters: a failed statement's error must not carry run inputs into the log.
    if parsed.get_backend_name() == "postgresql":
        sizes = {"pool_size": pool_size, "max_overflow": max_overflow}
        return create_async_engine(
            parsed,
            pool_pre_ping=True,
            hide_parameters=True,
            connect_args={
                "timeout": PG_CONNECT_TIMEOUT_S,
                "server_settings": {
                    "application_name": "runservice",
                    **_idle_setting(idle_in_transaction),
                },
            },
            **{name: size for name, size in sizes.items() if size is not None},
        )
    engine = create_async_engine(parsed, hide_parameters=True)
    _set_sqlite_pragmas(engine.sync_engine, SQLITE_BUSY_TIMEOUT_MS)
    return engine


def check_url(url: str) -> URL:
    """The parsed `url`; DatabaseRefusedError unless it names a database and driver
    runservice supports (the message never shows the URL's password)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # Not quoted: a URL that does not parse may still hold a password.
        raise DatabaseRefusedError(f"--db is not a database URL; use {SUPPORTED}") from None
    supported = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
    if supported.get(parsed.get_backend_name()) != parsed.get_driver_name():
        shown = parsed.render_as_string(hide_password=True)
        raise DatabaseRefusedError(f"--db {shown}: runservice stores in {SUPPORTED}")
    return parsed


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


def _idle_setting(seconds: float | None) -> dict[str, str]:
    if not seconds:
        return {}
    return {"idle_in_transaction_session_timeout": str(max(1, int(seconds * 1000)))}
