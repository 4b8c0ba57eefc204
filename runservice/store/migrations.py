"""Schema migrations, applied in order on start; each runs once, in its own transaction.

On PostgreSQL each migration's transaction first takes an advisory lock, so servers
starting together on one database apply each step once, one after the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Column, Connection, Index, MetaData, String, Table, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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
    runs_v1 = _as_created(
        conn,
        tables.runs,
        without=(
            "request_hash",
            "executor",
            "retention_s",
            "expire_us",
            "webhook_url",
            "waiting_for_input",
            "progress",
            "usage",
            "resume_count",
        ),
    )
    events_v1 = _as_created(conn, tables.events, without="wire")
    for table in (runs_v1, _as_created(conn, tables.run_labels), events_v1):
        table.create(conn)


def _as_created(conn: Connection, table: Table, without: str | tuple[str, ...] = ()) -> Table:
    """`table` without the columns `without`, as `conn`'s database creates it.

    PostgreSQL compares run ids in the "C" collation, byte by byte as SQLite does: ListRuns
    pages by run id, and a locale's collation may order ids otherwise (it skips
    punctuation), besides being slower.
    """
    bytewise = conn.dialect.name == "postgresql"
    return Table(
        table.name,
        MetaData(),
        *(
            Column(
                c.name,
                String(64, collation="C") if bytewise and c.name == "run_id" else c.type,
                primary_key=c.primary_key,
                nullable=c.nullable,
            )
            for c in table.columns
            if c.name not in ((without,) if isinstance(without, str) else without)
        ),
        *(Index(i.name, *(c.name for c in i.columns), unique=i.unique) for i in table.indexes),
    )


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


def _secrets(conn: Connection) -> None:
    tables.secrets.create(conn)


def _replicas(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE runs ADD COLUMN executor VARCHAR(64) NOT NULL DEFAULT ''"))
    _as_created(conn, tables.leases).create(conn)
    _as_created(conn, tables.run_requests).create(conn)


def _retention(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE runs ADD COLUMN retention_s FLOAT"))
    conn.execute(text("ALTER TABLE runs ADD COLUMN expire_us BIGINT"))
    # The purge's two ranges, read in one query: runs with a retention of their own by
    # when they expire; the others (and every row from before this migration, whose
    # retention_s is NULL) by when they ended.
    conn.execute(text("CREATE INDEX ix_runs_expire ON runs (expire_us)"))
    conn.execute(text("CREATE INDEX ix_runs_retention_ended ON runs (retention_s, ended_us)"))


def _webhooks(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE runs ADD COLUMN webhook_url TEXT NOT NULL DEFAULT ''"))
    for table in (tables.webhook_deliveries, tables.webhook_attempts):
        _as_created(conn, table).create(conn)


def _streams(conn: Connection) -> None:
    for table in (tables.streams, tables.stream_producers, tables.stream_units):
        _as_created(conn, table).create(conn)
    # One stream per owner and path (runs started with StartRun have no path).
    conn.execute(
        text("CREATE UNIQUE INDEX ux_streams_owner_path ON streams (owner, path) WHERE path <> ''")
    )


def _interactive(conn: Connection) -> None:
    for ddl in (
        "ADD COLUMN waiting_for_input SMALLINT NOT NULL DEFAULT 0",
        "ADD COLUMN progress TEXT",
        "ADD COLUMN usage TEXT",
        "ADD COLUMN resume_count INTEGER NOT NULL DEFAULT 0",
    ):
        conn.execute(text(f"ALTER TABLE runs {ddl}"))
    for table in tables.RUN_SIDE_TABLES:
        _as_created(conn, table).create(conn)
    # The inputs not yet appended (few at any time, however many there were).
    conn.execute(
        text("CREATE INDEX ix_run_inputs_pending ON run_inputs (run_id) WHERE seq IS NULL")
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, run labels and run events", _initial_schema),
    Migration(2, "idempotency keys and the retention index", _request_ids),
    Migration(3, "encoded events for replay", _add_wire),
    Migration(4, "secrets every server of the database shares", _secrets),
    Migration(5, "replicas: leases, run executors and run requests", _replicas),
    Migration(6, "per-run retention and the expiry index", _retention),
    Migration(7, "completion webhooks: runs' own URLs, deliveries and attempts", _webhooks),
    Migration(8, "external runs: streams, producers and append units", _streams),
    Migration(9, "inputs, live progress and usage, snapshots and checkpoints", _interactive),
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
        await _exclusive(conn)
        await conn.run_sync(lambda c: tables.schema_version.create(c, checkfirst=True))
    for step in MIGRATIONS:
        async with engine.begin() as conn:
            await _exclusive(conn)
            if await _applied(conn, step.version):
                continue
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


_MIGRATION_LOCK = 0x72756E7376630001  # "runsvc" 1: an advisory lock key of our own


async def _exclusive(conn: AsyncConnection) -> None:
    """On PostgreSQL, waits for the migration lock, held until the transaction ends.

    SQLite needs none: one server process at a time uses a SQLite file (store/lock.py).
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})


async def _applied(conn: AsyncConnection, version: int) -> bool:
    version_c = tables.schema_version.c.version
    return (await conn.execute(select(version_c).where(version_c == version))).first() is not None
