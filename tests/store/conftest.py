"""The store contract suite's fixtures: each test runs once per backend, on a new database.

`store` is an opened, migrated, empty store with the server's event codec: a SQLite file
in tmp_path, or on the session's private PostgreSQL server a database migrated once per
session and emptied before each test (TRUNCATE takes milliseconds, CREATE DATABASE a
quarter of a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from runservice.api.convert import decode_event, encode_event
from runservice.domain.model import Run, RunState
from runservice.store import SqlRunStore, open_store
from runservice.store.engine import sqlite_url
from tests.pgserver import PgServer

BACKENDS = ("sqlite", "postgresql")
TABLES = ("runs", "run_labels", "run_events", "runservice_secrets")
"""The tables of runs and their logs (the schema's own table stays)."""
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """T0 plus `seconds`."""
    return T0 + timedelta(seconds=seconds)


def make_run(run_id: str, owner: str = "alice", **fields: Any) -> Run:
    """A PENDING echo run created at T0, with `fields` changed."""
    run = Run(run_id=run_id, owner=owner, agent="echo", state=RunState.PENDING, created_at=T0)
    return run.replace(**fields)


async def query(url: str, sql: str) -> Sequence[Any]:
    """The rows of `sql` on the database at `url`, read outside the store."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql))).all())
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def pg_database(postgres: PgServer) -> str:
    """The name of a migrated PostgreSQL database for the store tests of the session."""
    name = postgres.create_database("store")

    async def migrate() -> None:
        await (await open_store(postgres.url(name))).close()

    asyncio.run(migrate())
    return name


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database of each backend (migrated already on PostgreSQL)."""
    if request.param == "sqlite":
        return sqlite_url(str(tmp_path / "store.db"))
    server: PgServer = request.getfixturevalue("postgres")
    name: str = request.getfixturevalue("pg_database")
    server.psql(f"TRUNCATE {', '.join(TABLES)}", name)
    return server.url(name)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlRunStore]:
    """An opened, migrated, empty store with the server's event codec."""
    opened = await open_store(store_url, encode_event, decode_event)
    try:
        yield opened
    finally:
        await opened.close()
