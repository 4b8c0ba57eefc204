"""External runs in SQL: stream records, producers and append units, beside the runs and
events tables (domain/streams.py says what they mean).

Every operation on a stream is one transaction (`SqlStreams.transaction`) in which the
runtime reads what it decides on and writes what it decided. On PostgreSQL the reads of
a stream's record and run row lock them (`FOR UPDATE`), so that two replicas appending to
one stream take turns; SQLite has one writer at a time, and a transaction that lost a
race is retried whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from runservice.domain.model import Run, RunEvent, RunState
from runservice.domain.streams import EXTERNAL_AGENT, ProducerState, StreamRecord
from runservice.store import tables
from runservice.store.driver import SaSql

if TYPE_CHECKING:
    from runservice.store.sql import SqlRunStore

T = TypeVar("T")

_ACTIVE = (RunState.PENDING.value, RunState.RUNNING.value)


class SqlStreams:
    """The StreamStore port over the run store's engine."""

    def __init__(self, store: SqlRunStore, *, sqlite: bool) -> None:
        self._store = store
        # SQLite: this process's stream transactions take turns. Each reads, then writes:
        # two at once would both hold the file's read lock and neither could write.
        self._turn: asyncio.Lock | None = asyncio.Lock() if sqlite else None

    async def transaction(self, work: Callable[[_Tx], Awaitable[T]]) -> T:
        """Runs `work` in one transaction (retried whole while the database is locked)."""
        result: list[T] = []

        async def attempt(conn: AsyncConnection) -> None:
            result.clear()
            result.append(await work(_Tx(self._store, conn)))

        if self._turn is None:
            await self._store.transaction(attempt)
        else:
            async with self._turn:
                await self._store.transaction(attempt)
        return result[0]

    async def finished(self, run_id: str) -> bool:
        """True once the run's row is terminal, or gone (a read, in no transaction)."""
        r = tables.runs.c
        async with self._store.connection() as conn:
            state = (await conn.execute(select(r.state).where(r.run_id == run_id))).scalar()
        return state is None or state not in _ACTIVE

    async def expired(self, now_us: int, limit: int) -> list[StreamRecord]:
        """Records whose deadline has passed, soonest first."""
        s = tables.streams.c
        query = (
            select(tables.streams)
            .where(s.deadline_us.is_not(None), s.deadline_us <= now_us)
            .order_by(s.deadline_us)
            .limit(limit)
        )
        async with self._store.connection() as conn:
            rows = (await conn.execute(query)).all()
        return [_record(row) for row in rows]


class _Tx:
    """One transaction's reads and writes (the StreamTx port)."""

    def __init__(self, store: SqlRunStore, conn: AsyncConnection) -> None:
        self._store = store
        self._conn = conn
        self._lock = conn.dialect.name == "postgresql"

    async def _first(self, query: Any) -> Any:
        if self._lock:
            query = query.with_for_update()
        return (await self._conn.execute(query)).first()

    async def stream(self, owner: str, path: str) -> StreamRecord | None:
        s = tables.streams.c
        row = await self._first(select(tables.streams).where(s.owner == owner, s.path == path))
        return None if row is None else _record(row)

    async def stream_of(self, run_id: str) -> StreamRecord | None:
        s = tables.streams.c
        row = await self._first(select(tables.streams).where(s.run_id == run_id))
        return None if row is None else _record(row)

    async def run(self, run_id: str) -> Run | None:
        r = tables.runs.c
        if await self._first(select(r.run_id).where(r.run_id == run_id)) is None:
            return None
        runs = await self._store.runs_reached(self._conn, [run_id])
        return runs[0] if runs else None

    async def producer(self, run_id: str, producer_id: str) -> ProducerState | None:
        p = tables.stream_producers.c
        row = await self._first(
            select(p.epoch, p.seq).where(p.run_id == run_id, p.producer_id == producer_id)
        )
        return None if row is None else ProducerState(row.epoch, row.seq)

    async def events(self, run_id: str, first: int, last: int) -> list[RunEvent]:
        e = tables.events.c
        query = (
            select(tables.events)
            .where(e.run_id == run_id, e.seq >= first, e.seq <= last)
            .order_by(e.seq)
        )
        rows = (await self._conn.execute(query)).all()
        return [self._store.event_from_row(row) for row in rows]

    async def unit_end(self, run_id: str, first: int) -> int:
        u = tables.stream_units.c
        query = select(u.last_seq).where(u.run_id == run_id, u.first_seq == first)
        last = (await self._conn.execute(query)).scalar()
        return first if last is None else int(last)

    async def forks(self, run_id: str) -> int:
        s = tables.streams.c
        query = select(func.count()).select_from(tables.streams).where(s.fork_of == run_id)
        return int((await self._conn.execute(query)).scalar() or 0)

    async def open_streams(self, owner: str | None) -> int:
        r = tables.runs.c
        query = (
            select(func.count())
            .select_from(tables.runs)
            .where(r.agent == EXTERNAL_AGENT, r.state.in_(_ACTIVE))
        )
        if owner is not None:
            query = query.where(r.owner == owner)
        return int((await self._conn.execute(query)).scalar() or 0)

    async def set_last_seq(self, run_id: str, seq: int) -> None:
        r = tables.runs
        await self._conn.execute(update(r).where(r.c.run_id == run_id).values(last_seq=seq))

    async def put_stream(self, record: StreamRecord) -> None:
        # Updated in place: a delete and insert would leave a transaction waiting on the
        # row's lock (FOR UPDATE) finding no row at all.
        s = tables.streams
        row = _row(record)
        changed = await self._conn.execute(
            update(s).where(s.c.run_id == record.run_id).values(**row)
        )
        if changed.rowcount == 0:
            await self._conn.execute(s.insert().values(**row))

    async def put_producer(self, run_id: str, producer_id: str, state: ProducerState) -> None:
        p = tables.stream_producers
        changed = await self._conn.execute(
            update(p)
            .where(p.c.run_id == run_id, p.c.producer_id == producer_id)
            .values(epoch=state.epoch, seq=state.seq)
        )
        if changed.rowcount == 0:
            await self._conn.execute(
                p.insert().values(
                    run_id=run_id, producer_id=producer_id, epoch=state.epoch, seq=state.seq
                )
            )

    async def put_unit(self, run_id: str, first: int, last: int) -> None:
        await self._conn.execute(
            tables.stream_units.insert().values(run_id=run_id, first_seq=first, last_seq=last)
        )

    async def write(
        self, new_runs: Sequence[Run], events: Sequence[RunEvent], updated_runs: Sequence[Run]
    ) -> None:
        await self._store.write_and_notify(SaSql(self._conn), new_runs, events, updated_runs)

    async def delete(self, record: StreamRecord, *, keep_tombstone: bool) -> None:
        run_id = record.run_id
        for table in (tables.stream_producers, tables.stream_units):
            await self._conn.execute(delete(table).where(table.c.run_id == run_id))
        if keep_tombstone:
            # Its path stays taken, and it still counts as a fork of its own source.
            tombstone = dataclasses.replace(record, deleted=True, ttl_s=None, expires_us=None)
            await self.put_stream(tombstone)
        else:
            s = tables.streams
            await self._conn.execute(delete(s).where(s.c.run_id == run_id))
        await self._store.delete_in(self._conn, run_id)


def _row(record: StreamRecord) -> dict[str, Any]:
    return {
        "run_id": record.run_id,
        "owner": record.owner,
        "path": record.path,
        "content_type": record.content_type,
        "created_us": record.created_us,
        "access_us": record.access_us,
        "ttl_s": record.ttl_s,
        "expires_us": record.expires_us,
        "deadline_us": None if record.deleted else record.deadline_us(),
        "stream_seq": record.stream_seq,
        "fork_of": record.fork_of,
        "fork_seq": record.fork_seq,
        "fork_sub": record.fork_sub,
        "deleted": int(record.deleted),
        "closed_by": record.closed_by,
    }


def _record(row: Any) -> StreamRecord:
    return StreamRecord(
        run_id=row.run_id,
        owner=row.owner,
        path=row.path,
        content_type=row.content_type,
        created_us=row.created_us,
        access_us=row.access_us,
        ttl_s=row.ttl_s,
        expires_us=row.expires_us,
        stream_seq=row.stream_seq,
        fork_of=row.fork_of,
        fork_seq=row.fork_seq,
        fork_sub=row.fork_sub,
        deleted=bool(row.deleted),
        closed_by=row.closed_by,
    )
