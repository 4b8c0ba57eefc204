"""Statements in the driver's own SQL, run on either kind of connection the store holds:
a SQLAlchemy connection (`SaSql`) or, for the writer's commits on PostgreSQL, asyncpg's own
connection (`RawSql`), which costs a third of the CPU per statement."""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

Values = tuple[Any, ...] | list[tuple[Any, ...]]
"""One row's values, or a list of rows (the statement runs once per row)."""


class Sql(Protocol):
    """Runs statements in the driver's own SQL inside the caller's transaction."""

    async def fetch(self, sql: str, values: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of a query."""
        ...

    async def execute(self, sql: str, values: Values = ()) -> int:
        """Runs a statement (once per row for a list of rows); the rows it changed."""
        ...


class SaSql:
    """Sql over a SQLAlchemy connection."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def fetch(self, sql: str, values: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of a query."""
        result = await self.conn.exec_driver_sql(sql, values)
        return [tuple(row) for row in result.fetchall()]

    async def execute(self, sql: str, values: Values = ()) -> int:
        """Runs a statement; the rows it changed."""
        result = await self.conn.exec_driver_sql(sql, values)
        return int(result.rowcount)


class RawSql:
    """Sql over asyncpg's own connection: prepared statements from its cache, no wrapping."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn  # an asyncpg Connection

    async def fetch(self, sql: str, values: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of a query."""
        return [tuple(row) for row in await self.conn.fetch(sql, *values)]

    async def execute(self, sql: str, values: Values = ()) -> int:
        """Runs a statement; the rows it changed (for a list of rows: how many rows)."""
        if isinstance(values, list):
            await self.conn.executemany(sql, values)
            return len(values)
        status: str = await self.conn.execute(sql, *values)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0
