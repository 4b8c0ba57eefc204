"""Schema migrations, applied in order on start; each runs once, in its own transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Column, Connection, Index, MetaData, Table, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from runservice.store import tables
from runservice.store.preflight import check_schema, check_sqlite_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One step of the schema's history."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _initial_schema(conn: Connection) -> None:
    # The tables as they were at version 1; later columns come from later migrations.
    runs_v1 = Table(
        "runs",
        MetaData(),
        *(
            Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in tables.runs.columns
            if c.name != "request_hash"
        ),
        *(Index(i.name, *(c.name for c in i.columns)) for i in tables.runs.indexes),
    )
    events_v1 = Table(
        "run_events",
        MetaData(),
        *(
            Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in tables.events.columns
            if c.name != "wire"
        ),
    )
    for table in (runs_v1, tables.run_labels, events_v1):
        table.create(conn)


def _request_ids(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE runs ADD COLUMN request_hash VARCHAR(64) NOT NULL DEFAULT ''"))
    # Partial unique index (SQLite and PostgreSQL both have them): one run per owner and
    # idempotency key, for runs that have a key.
    conn.execute(
        text(
            "CREATE UNIQUE INDEX ux_runs_owner_request_id ON runs (owner, request_id) "
            "WHERE request_id <> ''"
        )
    )
    conn.execute(text("CREATE INDEX ix_runs_state_ended ON runs (state, ended_us)"))


def _add_wire(conn: Connection) -> None:
    blob = "BYTEA" if conn.dialect.name == "postgresql" else "BLOB"
    conn.execute(text(f"ALTER TABLE run_events ADD COLUMN wire {blob}"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, run labels and run events", _initial_schema),
    Migration(2, "idempotency keys and the retention index", _request_ids),
    Migration(3, "encoded events for replay", _add_wire),
)


LATEST_VERSION = MIGRATIONS[-1].version


async def migrate(engine: AsyncEngine) -> int:
    """Applies every migration the database lacks; returns the schema version.

    DatabaseRefusedError, before anything is written, for a database that is corrupt,
    another program's, or of a newer schema than LATEST_VERSION.
    """
    check_sqlite_file(engine.url, LATEST_VERSION)  # before the engine's first connection
    where = engine.url.render_as_string(hide_password=True)
    async with engine.connect() as conn:
        await conn.run_sync(check_schema, where, LATEST_VERSION)
    async with engine.begin() as conn:
        await conn.run_sync(lambda c: tables.schema_version.create(c, checkfirst=True))
    async with engine.connect() as conn:
        done = set((await conn.execute(select(tables.schema_version.c.version))).scalars())
    for step in MIGRATIONS:
        if step.version in done:
            continue
        async with engine.begin() as conn:
            await conn.run_sync(step.apply)
            await conn.execute(
                tables.schema_version.insert().values(
                    version=step.version,
                    description=step.description,
                    applied_us=int(time.time() * 1_000_000),
                )
            )
        logger.info("applied schema migration %d: %s", step.version, step.description)
    return LATEST_VERSION
