"""Schema migrations, applied in order on start; each runs once, in its own transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, select
from sqlalchemy.ext.asyncio import AsyncEngine

from runservice.store import tables

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One step of the schema's history."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _initial_schema(conn: Connection) -> None:
    for table in (tables.runs, tables.run_labels, tables.events):
        table.create(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, run labels and run events", _initial_schema),
)


async def migrate(engine: AsyncEngine) -> int:
    """Applies every migration the database lacks; returns the schema version."""
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
    return MIGRATIONS[-1].version
