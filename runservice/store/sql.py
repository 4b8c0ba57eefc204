"""SqlRunStore: runs and event logs in any SQLAlchemy async database (SQLite, PostgreSQL).

Writes only SQL both accept (multi-row INSERT, ON CONFLICT ... DO UPDATE). A group commit
is at most three statements in the driver's own SQL; with SQLite it runs as one call on
a commit thread (see _CommitThread). Reads go through SQLAlchemy, replay pages through
the driver's own rows. Driver errors stay here: "database is locked" is retried a
bounded number of times; a database that stays locked or cannot be reached surfaces as
StoreUnavailableError (worth retrying later), any other driver error as StoreError.
PostgreSQL's errors are told apart by their SQLSTATE code, SQLite's by their message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Table, and_, bindparam, delete, exists, func, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runservice.domain.errors import StoreError, StoreUnavailableError
from runservice.domain.model import (
    INPUT_EVENT,
    Beside,
    Checkpoint,
    EncodedEvent,
    MultitaskStrategy,
    PendingInput,
    Run,
    RunEvent,
    RunFailure,
    RunFilter,
    RunProgress,
    RunState,
    Scope,
    Snapshot,
    encoded_event,
)
from runservice.domain.ports import EventDecoder, EventEncoder
from runservice.domain.replicas import deleted_notice
from runservice.domain.streams import EXTERNAL_AGENT
from runservice.store import migrations, tables
from runservice.store.beside import BesideRows
from runservice.store.cluster import ClusterSql
from runservice.store.driver import RawSql, SaSql, Sql
from runservice.store.engine import PG_CONNECT_TIMEOUT_S, make_engine, make_writer_engine
from runservice.store.streams import SqlStreams
from runservice.store.webhooks import DeliveryRows

logger = logging.getLogger(__name__)

T = TypeVar("T")

_Plan = list[tuple[str, tuple[Any, ...] | list[tuple[Any, ...]]]]
"""Statements of one commit, each with its values: one row's, or a list of rows."""

LOCK_RETRIES = 8
LOCK_BACKOFF_S = 0.05
INSERT_CHUNK = 512  # rows per INSERT: 4,608 parameters, under every driver's limit

# Portable SQL that writes a page: it rewrites the newest schema row as it is.
_PROBE_SQL = (
    "UPDATE runservice_schema SET applied_us = applied_us"
    " WHERE version = (SELECT MAX(version) FROM runservice_schema)"
)

_PAYLOAD_NONE, _PAYLOAD_DATA, _PAYLOAD_TEXT, _PAYLOAD_BINARY, _PAYLOAD_VALUE = 0, 1, 2, 3, 4
_TERMINAL = frozenset(s.value for s in RunState if s.terminal)


async def open_store(
    url: str,
    encoder: EventEncoder | None = None,
    decoder: EventDecoder | None = None,
    *,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    idle_in_transaction: float | None = None,
) -> SqlRunStore:
    """A store on `url`, schema migrated, with the codec of events' wire forms (if any).

    `pool_size` and `max_overflow` size a database server's connection pool (SQLAlchemy's
    defaults when None); a SQLite file ignores them.
    """
    engine = make_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        idle_in_transaction=idle_in_transaction,
    )
    store = SqlRunStore(engine, encoder, decoder, make_writer_engine(url))
    try:
        await _once(store.migrate)
    except BaseException:
        await store.close()
        raise
    return store


class SqlRunStore:
    """The RunStore port over SQLAlchemy Core.

    An event with a wire form is stored as that form only (its payload is not encoded a
    second time); `decoder` turns it back into an event for read_events. Events without
    one (stored before migration 3, or by a store with no codec) keep their payload in
    columns of their own, and `encoder` encodes them for read_encoded.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        encoder: EventEncoder | None = None,
        decoder: EventDecoder | None = None,
        writer: Engine | None = None,
    ) -> None:
        self._engine = engine
        # PostgreSQL: what replicas of one database share (leases, notifications).
        self.cluster = ClusterSql(self, engine) if engine.dialect.name == "postgresql" else None
        self._holder: str | None = None  # the lease this server's commits are fenced by
        self._writer = None if writer is None else _CommitThread(writer)
        # PostgreSQL: the writer's commits go through a connection of their own, and replay
        # pages through asyncpg's own pool.
        self._pg_writer = _PgCommitConnection(engine) if self.cluster is not None else None
        self._pages = _PgPages(engine) if self.cluster is not None else None
        self._encoder = encoder
        self._decoder = decoder
        self._page_sql = _page_query(engine)
        self._insert_events = _MultiRow(engine, tables.events, _EVENT_COLUMNS)
        self._insert_labels = _MultiRow(engine, tables.run_labels, _LABEL_COLUMNS)
        # New and changed run rows alike: inserted, or their mutable columns updated.
        self._upsert_runs = _MultiRow(engine, tables.runs, _RUN_COLUMNS, update=_RUN_MUTABLE)
        self.streams = SqlStreams(self, sqlite=self.cluster is None)  # external runs
        # Completion webhooks: stored with the commit of each run's end (store/webhooks.py).
        self.webhook_rows = DeliveryRows(engine)
        # Inputs, snapshots and checkpoints: beside the runs' logs (store/beside.py).
        self.beside = BesideRows(engine)

    async def migrate(self) -> None:
        """Brings the schema up to date."""
        await migrations.migrate(self._engine)

    async def shared_secret(self, name: str, proposed: bytes) -> bytes:
        """The secret called `name` that every server of this database shares: the one
        stored, or `proposed`, stored now, if there is none yet."""
        table = tables.secrets
        insert = (
            _insert_for(self._engine)(table)
            .values(name=name, value=proposed)
            .on_conflict_do_nothing(index_elements=[table.c.name])
        )

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(insert)

        await self._write(work)
        async with self._engine.connect() as conn:
            query = select(table.c.value).where(table.c.name == name)
            value = (await self._read(conn, query)).scalar_one()
        return bytes(value)

    async def close(self) -> None:
        """Releases every pooled connection."""
        if self._pg_writer is not None:
            await self._pg_writer.close()
        if self._pages is not None:
            self._pages.close()
        await self._engine.dispose()
        if self._writer is not None:
            self._writer.close()

    def fence_by(self, holder: str) -> None:
        """From now on every commit writes only runs whose lease lives, and notifies the
        other replicas of what it wrote (PostgreSQL; see store/cluster.py). `holder` is
        this server's lease, which new runs are written under."""
        if self.cluster is None:
            raise StoreError("leases need a PostgreSQL database")
        self._holder = holder

    async def commit(
        self,
        new_runs: Sequence[Run],
        events: Sequence[RunEvent],
        updated_runs: Sequence[Run],
        beside: Sequence[Beside] = (),
    ) -> frozenset[str]:
        """Commits runs, events, run updates and what is stored beside their logs in one
        transaction; returns the runs left out because their lease is gone (fenced:
        nothing of them was written)."""
        writer = self._writer
        if writer is not None:
            plan = self._commit_plan(new_runs, events, updated_runs, beside)
            await _once(lambda: writer.run(plan))
            return frozenset()
        if self._pg_writer is not None:
            pg_writer = self._pg_writer
            return await pg_writer.run(
                lambda sql: self._commit_in(sql, new_runs, events, updated_runs, beside)
            )
        fenced: frozenset[str] = frozenset()

        async def work(conn: AsyncConnection) -> None:
            nonlocal fenced
            fenced = await self._commit_in(SaSql(conn), new_runs, events, updated_runs, beside)

        await self._write(work, retry=False)
        return fenced

    async def _commit_in(
        self,
        sql: Sql,
        new_runs: Sequence[Run],
        events: Sequence[RunEvent],
        updated_runs: Sequence[Run],
        beside: Sequence[Beside] = (),
    ) -> frozenset[str]:
        """A commit's statements in the caller's transaction: with leases, first the runs
        whose lease is gone are left out, and at the end the other replicas notified."""
        cluster, holder = self.cluster, self._holder
        fenced: set[str] = set()
        if cluster is not None and holder is not None:
            run_ids = {e.run_id for e in events} | {r.run_id for r in updated_runs}
            run_ids |= {b.run_id for b in beside}
            fenced = await cluster.fenced(sql, new_runs, run_ids)
            if fenced:
                new_runs = [r for r in new_runs if r.run_id not in fenced]
                events = [e for e in events if e.run_id not in fenced]
                updated_runs = [r for r in updated_runs if r.run_id not in fenced]
                beside = [b for b in beside if b.run_id not in fenced]
        await self.write(sql, new_runs, events, updated_runs, beside)
        if cluster is not None and holder is not None:
            await cluster.after_commit(sql, holder, new_runs, events, updated_runs)
        return frozenset(fenced)

    async def write(
        self,
        sql: Sql,
        new_runs: Sequence[Run],
        events: Sequence[RunEvent],
        updated_runs: Sequence[Run],
        beside: Sequence[Beside] = (),
    ) -> None:
        """Writes runs, events, run updates and beside records in the caller's transaction."""
        for statement, values in self._commit_plan(new_runs, events, updated_runs, beside):
            await sql.execute(statement, values)

    async def transaction(
        self, work: Callable[[AsyncConnection], Awaitable[None]], *, retry: bool = True
    ) -> None:
        """Runs `work` in a transaction; driver errors become store errors."""
        await self._write(work, retry=retry)

    def connection(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A pooled connection for reads; driver errors become store errors."""
        return self._connect()

    async def runs_reached(self, conn: AsyncConnection, run_ids: Sequence[str]) -> list[Run]:
        """The runs, each with the last seq its log really reached, in `run_ids`' order."""
        r, e = tables.runs.c, tables.events.c
        reached = select(func.max(e.seq)).where(e.run_id == r.run_id).scalar_subquery()
        query = select(tables.runs, func.coalesce(reached, 0).label("reached")).where(
            r.run_id.in_(list(run_ids))
        )
        rows = {row.run_id: row for row in (await self._read(conn, query)).all()}
        labels = await self._labels(conn, list(rows))
        return [
            _run_from_row(rows[i], labels.get(i, {})).replace(last_seq=rows[i].reached)
            for i in run_ids
            if i in rows
        ]

    async def probe(self) -> None:
        """Rewrites the newest schema row in a transaction of its own (a page to write)."""
        plan: _Plan = [(_PROBE_SQL, ())]
        writer = self._writer
        if writer is not None:
            await _once(lambda: writer.run(plan))
            return

        async def work(conn: AsyncConnection) -> None:
            await conn.exec_driver_sql(_PROBE_SQL)

        await self._write(work, retry=False)

    def _commit_plan(
        self,
        new_runs: Sequence[Run],
        events: Sequence[RunEvent],
        updated_runs: Sequence[Run],
        beside: Sequence[Beside] = (),
    ) -> _Plan:
        """The statements of one commit, in the driver's own SQL, many rows in each.

        A multi-row statement is one step of the database, where executemany takes one
        per row (and with SQLite, each step hands the GIL to the loop's thread and back).
        Rows go to the driver as tuples, with no per-row work in SQLAlchemy.
        """
        latest = {run.run_id: run for run in (*new_runs, *updated_runs)}
        labels = [(r.run_id, k, v) for r in new_runs for k, v in r.labels.items()]
        return [
            *self._upsert_runs.statements([_run_row(run) for run in latest.values()]),
            *self._insert_labels.statements(labels),
            *self._insert_events.statements([_event_row(e) for e in events]),
            *self.webhook_rows.statements(latest.values()),
            *self.beside.statements(beside),
        ]

    async def get_run(self, scope: Scope, run_id: str) -> Run | None:
        """The run, when `scope` may see it."""
        query = select(tables.runs).where(tables.runs.c.run_id == run_id)
        async with self._connect() as conn:
            row = (await self._read(conn, query)).first()
            if row is None or not scope.allows(row.owner):
                return None
            labels = await self._labels(conn, [run_id])
        return _run_from_row(row, labels.get(run_id, {}))

    async def list_runs(
        self, scope: Scope, run_filter: RunFilter, before_run_id: str | None, limit: int
    ) -> list[Run]:
        """Runs newest first, keyset-paginated on run_id (ids sort by creation time)."""
        r = tables.runs.c
        conditions = []
        if not scope.everyone:
            conditions.append(r.owner == scope.user)
        if run_filter.states:
            conditions.append(r.state.in_(sorted(s.value for s in run_filter.states)))
        if run_filter.agent:
            conditions.append(r.agent == run_filter.agent)
        if run_filter.thread_id:
            conditions.append(r.thread_id == run_filter.thread_id)
        if run_filter.waiting_for_input:
            conditions.append(r.waiting_for_input == 1)
        for key, value in sorted(run_filter.labels.items()):
            lab = tables.run_labels.alias()
            conditions.append(
                exists().where(
                    and_(lab.c.run_id == r.run_id, lab.c.key == key, lab.c.value == value)
                )
            )
        if before_run_id is not None:
            conditions.append(r.run_id < before_run_id)
        query = select(tables.runs).where(*conditions).order_by(r.run_id.desc()).limit(limit)
        async with self._connect() as conn:
            rows = (await self._read(conn, query)).all()
            labels = await self._labels(conn, [row.run_id for row in rows])
        return [_run_from_row(row, labels.get(row.run_id, {})) for row in rows]

    async def read_events(self, run_id: str, from_seq: int, limit: int) -> list[RunEvent]:
        """A page of the run's log from `from_seq`."""
        e = tables.events.c
        query = (
            select(tables.events)
            .where(e.run_id == run_id, e.seq >= from_seq)
            .order_by(e.seq)
            .limit(limit)
        )
        async with self._connect() as conn:
            rows = (await self._read(conn, query)).all()
        return [self._event_from_row(row) for row in rows]

    def event_from_row(self, row: Any) -> RunEvent:
        """The event of a row of the events table."""
        return self._event_from_row(row)

    def _event_from_row(self, row: Any) -> RunEvent:
        if row.wire is None:
            return _event_from_row(row)
        if self._decoder is None:
            raise StoreError("this store has no event decoder")
        return self._decoder(row.wire)

    async def read_encoded(self, run_id: str, from_seq: int, limit: int) -> list[EncodedEvent]:
        """A page of the run's log in wire form; rows stored before encoding are encoded now."""
        events: list[EncodedEvent]
        if self._pages is not None:
            rows = await self._pages.fetch(self._page_sql, run_id, from_seq, limit)
            events = list(map(encoded_event, rows))
        else:
            async with self._connect() as conn:
                result = await _retry_locked(
                    lambda: conn.exec_driver_sql(self._page_sql, (run_id, from_seq, limit))
                )
                # The driver's rows as they are: no SQLAlchemy Row per event.
                events = list(map(encoded_event, result.cursor.fetchall()))
                result.close()
        if any(event.wire is None for event in events):
            return [
                self._encode(event) for event in await self.read_events(run_id, from_seq, limit)
            ]
        return events

    def _encode(self, event: RunEvent) -> EncodedEvent:
        if self._encoder is None:
            raise StoreError("this store has no event encoder")
        return EncodedEvent(event.seq, self._encoder(event), event.terminal)

    async def delete_run(self, scope: Scope, run_id: str) -> bool:
        """Deletes the run, its labels, events and requests in one transaction (telling the
        other replicas, when there are any)."""
        deleted = False

        async def work(conn: AsyncConnection) -> None:
            nonlocal deleted
            deleted = await self.delete_in(conn, run_id, scope)

        await self._write(work)
        return deleted

    async def delete_in(
        self, conn: AsyncConnection, run_id: str, scope: Scope | None = None
    ) -> bool:
        """delete_run's statements in the caller's transaction; False if there was none
        (that `scope` may see). An external run's stream record is deleted too, but not
        a tombstone left of it (store/streams.py)."""
        cond = [tables.runs.c.run_id == run_id]
        if scope is not None and not scope.everyone:
            cond.append(tables.runs.c.owner == scope.user)
        row = (await conn.execute(delete(tables.runs).where(*cond).returning(tables.runs))).first()
        if row is None:
            return False
        for table in (tables.events, tables.run_labels, tables.run_requests):
            await conn.execute(delete(table).where(table.c.run_id == run_id))
        for table in tables.RUN_SIDE_TABLES:
            await conn.execute(delete(table).where(table.c.run_id == run_id))
        for table in (tables.stream_producers, tables.stream_units):
            await conn.execute(delete(table).where(table.c.run_id == run_id))
        s = tables.streams.c
        await conn.execute(delete(tables.streams).where(s.run_id == run_id, s.deleted == 0))
        if self.cluster is not None and self._holder is not None:
            notice = deleted_notice(_run_from_row(row, {}))
            await self.cluster.notify(SaSql(conn), self._holder, notice)
        return True

    async def write_and_notify(
        self,
        sql: Sql,
        new_runs: Sequence[Run],
        events: Sequence[RunEvent],
        updated_runs: Sequence[Run],
    ) -> None:
        """write(), and with replicas, the notice of it to the other replicas."""
        await self.write(sql, new_runs, events, updated_runs)
        if self.cluster is not None and self._holder is not None:
            await self.cluster.after_commit(sql, self._holder, new_runs, events, updated_runs)

    async def find_by_request_id(self, scope: Scope, request_id: str) -> Run | None:
        """The scope's user's run started with `request_id`, if any."""
        r = tables.runs.c
        query = select(tables.runs).where(r.owner == scope.user, r.request_id == request_id)
        async with self._connect() as conn:
            row = (await self._read(conn, query)).first()
            if row is None:
                return None
            labels = await self._labels(conn, [row.run_id])
        return _run_from_row(row, labels.get(row.run_id, {}))

    async def purge_expired(self, now: datetime, default_retention: float, limit: int) -> list[str]:
        """Deletes up to `limit` finished runs whose retention ended by `now` (their own,
        else `default_retention` seconds after their end), with their logs.

        One query, over two index ranges (ix_runs_expire, ix_runs_retention_ended), in no
        particular order: sorting would read every expired run to delete the first few.
        Only finished runs have an ended_us (lifecycle writes it with the terminal state),
        so the query names no state: a condition on it would draw the planner to the
        state index, which holds every finished run.
        """
        r = tables.runs.c
        now_us = _us(now)
        assert now_us is not None
        default_cutoff = now_us - round(default_retention * 1_000_000)
        expired = or_(
            r.expire_us <= now_us,
            and_(r.retention_s.is_(None), r.ended_us <= default_cutoff),
        )
        query = select(r.run_id).where(expired).limit(limit)
        purged: list[str] = []

        async def work(conn: AsyncConnection) -> None:
            nonlocal purged
            run_ids = list((await conn.execute(query)).scalars())
            if run_ids:
                await conn.execute(delete(tables.events).where(tables.events.c.run_id.in_(run_ids)))
                await conn.execute(
                    delete(tables.run_labels).where(tables.run_labels.c.run_id.in_(run_ids))
                )
                for table in (tables.run_requests, *tables.RUN_SIDE_TABLES):
                    await conn.execute(delete(table).where(table.c.run_id.in_(run_ids)))
                await conn.execute(delete(tables.runs).where(r.run_id.in_(run_ids)))
            purged = run_ids

        await self._write(work)
        return purged

    async def offer_input(
        self, run_id: str, request_id: str, digest: str, body: str, at_us: int
    ) -> tuple[str, int | None] | None:
        """Records SendInput's input for an active run unless `request_id` is there
        (store/beside.py); the request's (digest, seq or None), or None."""
        offered: tuple[str, int | None] | None = None

        async def work(conn: AsyncConnection) -> None:
            nonlocal offered
            offered = await self.beside.offer(
                SaSql(conn), run_id, request_id, digest=digest, body=body, at_us=at_us
            )

        await self._write(work)
        return offered

    async def input_receipt(self, run_id: str, request_id: str) -> tuple[str, int | None]:
        """(digest, seq or None) of an offered input; KeyError if there is none."""
        async with self._connect() as conn:
            return await self.beside.receipt(SaSql(conn), run_id, request_id)

    async def pending_inputs(self, run_id: str) -> list[PendingInput]:
        """The run's offered inputs not yet appended, in the order they were offered."""
        async with self._connect() as conn:
            return await self.beside.pending(SaSql(conn), run_id)

    async def input_events(self, run_id: str) -> list[RunEvent]:
        """The run's `input` events, in log order."""
        e = tables.events.c
        query = (
            select(tables.events).where(e.run_id == run_id, e.type == INPUT_EVENT).order_by(e.seq)
        )
        async with self._connect() as conn:
            rows = (await self._read(conn, query)).all()
        return [self._event_from_row(row) for row in rows]

    async def latest_snapshot(self, run_id: str) -> Snapshot | None:
        """The run's latest snapshot, if any."""
        async with self._connect() as conn:
            return await self.beside.snapshot(conn, run_id)

    async def latest_checkpoint(self, run_id: str) -> Checkpoint | None:
        """The run's latest checkpoint, if any."""
        async with self._connect() as conn:
            return await self.beside.checkpoint(conn, run_id)

    async def unfinished_runs(self) -> list[Run]:
        """Every run left PENDING or RUNNING, across owners (for reconciliation), with the
        last seq its log really reached (the row's is as of its last state change)."""
        active = [RunState.PENDING.value, RunState.RUNNING.value]
        r, e = tables.runs.c, tables.events.c
        reached = select(func.max(e.seq)).where(e.run_id == r.run_id).scalar_subquery()
        query = (
            select(tables.runs, func.coalesce(reached, 0).label("reached"))
            .where(r.state.in_(active), r.agent != EXTERNAL_AGENT)  # nothing executes those
            .order_by(r.run_id)
        )
        async with self._connect() as conn:
            rows = (await self._read(conn, query)).all()
            labels = await self._labels(conn, [row.run_id for row in rows])
        return [
            _run_from_row(row, labels.get(row.run_id, {})).replace(last_seq=row.reached)
            for row in rows
        ]

    async def _labels(self, conn: AsyncConnection, run_ids: list[str]) -> dict[str, dict[str, str]]:
        if not run_ids:
            return {}
        lab = tables.run_labels.c
        query = select(lab.run_id, lab.key, lab.value).where(lab.run_id.in_(run_ids))
        found: dict[str, dict[str, str]] = {}
        for run_id, key, value in (await self._read(conn, query)).all():
            found.setdefault(run_id, {})[key] = value
        return found

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        """A pooled connection for reads; failing to get one is a store error too."""
        with _driver_errors():
            async with self._engine.connect() as conn:
                yield conn

    async def _read(self, conn: AsyncConnection, query: Any) -> Any:
        return await _retry_locked(lambda: conn.execute(query))

    async def _write(
        self, work: Callable[[AsyncConnection], Awaitable[None]], *, retry: bool = True
    ) -> None:
        async def attempt() -> None:
            async with self._engine.begin() as conn:
                await work(conn)

        await (_retry_locked(attempt) if retry else _once(attempt))


async def _retry_locked(attempt: Callable[[], Awaitable[T]]) -> T:
    """Runs `attempt`, retrying a bounded number of times while the database is locked."""
    for n in range(LOCK_RETRIES):
        try:
            return await _once(attempt)
        except StoreUnavailableError as exc:
            if not exc.contended or n == LOCK_RETRIES - 1:
                raise
            logger.warning("database is locked; retry %d of %d", n + 1, LOCK_RETRIES - 1)
            await asyncio.sleep(LOCK_BACKOFF_S * (2**n))
    raise AssertionError("unreachable")  # pragma: no cover


async def _once(attempt: Callable[[], Awaitable[T]]) -> T:
    """Runs `attempt`, turning driver errors into store errors that name their cause."""
    with _driver_errors():
        return await attempt()


@contextlib.contextmanager
def _driver_errors() -> Iterator[None]:
    """Turns the driver errors raised inside into store errors that name their cause."""
    try:
        yield
    except DBAPIError as exc:
        raise _store_error(exc) from exc
    except OSError as exc:  # the driver's own files on a full disk; a server out of reach
        raise StoreUnavailableError("database operation failed", unavailable_cause(exc)) from exc
    except PoolTimeoutError as exc:
        raise StoreUnavailableError("database connection failed", _POOL_BUSY) from exc


def _store_error(exc: DBAPIError) -> StoreError:
    """The store error for a driver's error: unavailable (retry later) or refused for good."""
    cause = _sqlstate_cause(exc)
    if cause is not None:
        return StoreUnavailableError(
            "database operation failed", cause, contended=cause == _PG_CONTENDED
        )
    if isinstance(exc, OperationalError):
        cause = unavailable_cause(exc)
        return StoreUnavailableError(
            "database operation failed", cause, contended=cause == _CAUSES[1][1]
        )
    if isinstance(exc, InterfaceError):
        return StoreUnavailableError("database connection failed", _UNREACHABLE)
    if unavailable_cause(exc) in _LASTING or exc.connection_invalidated:
        return StoreUnavailableError("database operation failed", unavailable_cause(exc))
    return StoreError("database refused the operation")


_CAUSES = (
    (("disk is full", "disk full", "no space left"), "the disk holding the database is full"),
    (("locked", "busy"), "the database is locked by another process"),
    (("readonly", "read-only"), "the database is read-only"),
    (("disk i/o error",), "the disk holding the database reports I/O errors"),
    (("unable to open",), "the database file cannot be opened"),
    (("malformed", "not a database", "corrupt"), "the database file is corrupt"),
    (
        ("connection", "connect", "closed", "terminat", "cannot switch to state"),
        "the database cannot be reached",
    ),
)


_UNREACHABLE = _CAUSES[-1][1]
_POOL_BUSY = "every pooled database connection is busy (see --db-pool-size)"
_PG_CONTENDED = "the database aborted the transaction in a conflict with another one"

# PostgreSQL's errors by SQLSTATE code, or the class it starts with: those worth retrying
# later. Anything else (a constraint, a bug) is the data's fault: StoreError.
_SQLSTATE_CAUSES = (
    ("08", _UNREACHABLE),  # connection exception
    ("57P", _UNREACHABLE),  # admin or crash shutdown, cannot connect now, database dropped
    ("57014", "the database cancelled the statement (a timeout or an operator)"),
    ("53100", _CAUSES[0][1]),  # disk_full
    ("53300", "the database has no connection slots left (see its max_connections)"),
    ("53", "the database is out of memory or other resources"),
    ("25006", "the database is read-only"),
    ("28", "the database refuses the login (check the user and password in --db)"),
    ("3D000", "the database named in --db does not exist"),
    ("40", _PG_CONTENDED),  # serialization failure, deadlock
)
_OUT_OF_REACH = (ConnectionError, TimeoutError, socket.gaierror)
_OUT_OF_REACH_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT})


def _sqlstate_cause(exc: DBAPIError) -> str | None:
    """The cause a PostgreSQL error's SQLSTATE names, if it is one worth retrying later."""
    return _code_cause(getattr(exc.orig, "sqlstate", None))


def _code_cause(code: object) -> str | None:
    """The cause a SQLSTATE code names, if it is one worth retrying later."""
    if not isinstance(code, str):
        return None
    return next((cause for prefix, cause in _SQLSTATE_CAUSES if code.startswith(prefix)), None)


def unavailable_cause(exc: BaseException) -> str:
    """Why the database cannot take work now, in an operator's words."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return _CAUSES[0][1]
    if isinstance(exc, _OUT_OF_REACH) or (
        isinstance(exc, OSError) and exc.errno in _OUT_OF_REACH_ERRNOS
    ):
        return _UNREACHABLE
    for needles, cause in _CAUSES:
        if any(needle in text for needle in needles):
            return cause
    return "the database refuses writes"


# Causes a driver may report as a plain database error: the database as a whole cannot
# take the work until an operator acts (room on the disk, a restored file).
_LASTING = frozenset({_CAUSES[0][1], "the database file is corrupt"})


def _us(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp() * 1_000_000)


def _at(us: int | None) -> datetime | None:
    return None if us is None else datetime.fromtimestamp(us / 1_000_000, UTC)


def _json(value: Mapping[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _failure_json(failure: RunFailure | None) -> str | None:
    if failure is None:
        return None
    return _json({"code": failure.code, "message": failure.message, "error_id": failure.error_id})


def _failure(text: str | None) -> RunFailure | None:
    if text is None:
        return None
    raw = json.loads(text)
    return RunFailure(raw["code"], raw["message"], raw.get("error_id"))


_RUN_COLUMNS = tuple(c.name for c in tables.runs.c)
# What a commit may change in an existing run row.
_RUN_MUTABLE = (
    "state",
    "result",
    "error",
    "started_us",
    "ended_us",
    "last_seq",
    "stop_reason",
    "expire_us",
    "waiting_for_input",
    "progress",
    "usage",
    "resume_count",
    "executor",  # a survivor takes over a dead replica's run to resume it
)
_LABEL_COLUMNS = ("run_id", "key", "value")


def _run_row(run: Run) -> tuple[Any, ...]:
    """The run as a row of _RUN_COLUMNS."""
    row = {
        "run_id": run.run_id,
        "owner": run.owner,
        "agent": run.agent,
        "state": run.state.value,
        "input": _json(run.input),
        "result": _json(run.result),
        "error": _failure_json(run.error),
        "thread_id": run.thread_id,
        "labels": _json(run.labels),
        "created_us": _us(run.created_at),
        "started_us": _us(run.started_at),
        "ended_us": _us(run.ended_at),
        "last_seq": run.last_seq,
        "stop_reason": run.stop_reason,
        "request_id": run.request_id,
        "multitask_strategy": run.multitask_strategy.value,
        "timeout_s": run.timeout,
        "request_hash": run.request_hash,
        "executor": run.executor,
        "retention_s": run.retention,
        "expire_us": _expire_us(run),
        "webhook_url": run.webhook_url,
        "waiting_for_input": 1 if run.waiting_for_input else 0,
        "progress": _progress_json(run.progress),
        "usage": _json(run.usage) if run.usage else None,
        "resume_count": run.resume_count,
    }
    return tuple(row[c] for c in _RUN_COLUMNS)


def _progress_json(progress: RunProgress | None) -> str | None:
    if progress is None:
        return None
    return _json({"done": progress.done, "total": progress.total, "message": progress.message})


def _progress(text: str | None) -> RunProgress | None:
    if text is None:
        return None
    raw = json.loads(text)
    return RunProgress(float(raw["done"]), float(raw["total"]), str(raw["message"]))


def _expire_us(run: Run) -> int | None:
    """When a run that ended with a retention of its own expires; None for the others
    (the purge reckons theirs from the server's default and ended_us)."""
    ended_us = _us(run.ended_at)
    if run.retention is None or ended_us is None:
        return None
    return ended_us + round(run.retention * 1_000_000)


def _run_from_row(row: Any, labels: dict[str, str]) -> Run:
    created = _at(row.created_us)
    assert created is not None
    return Run(
        run_id=row.run_id,
        owner=row.owner,
        agent=row.agent,
        state=RunState(row.state),
        created_at=created,
        input=json.loads(row.input),
        result=None if row.result is None else json.loads(row.result),
        error=_failure(row.error),
        thread_id=row.thread_id,
        labels=labels,
        started_at=_at(row.started_us),
        ended_at=_at(row.ended_us),
        last_seq=row.last_seq,
        stop_reason=row.stop_reason,
        request_id=row.request_id,
        multitask_strategy=MultitaskStrategy(row.multitask_strategy),
        timeout=row.timeout_s,
        retention=row.retention_s,
        request_hash=row.request_hash,
        executor=row.executor,
        webhook_url=row.webhook_url,
        waiting_for_input=bool(row.waiting_for_input),
        progress=_progress(row.progress),
        usage={} if row.usage is None else json.loads(row.usage),
        resume_count=row.resume_count,
    )


_EVENT_COLUMNS = (
    "run_id",
    "seq",
    "at_us",
    "type",
    "payload_kind",
    "payload",
    "state",
    "error",
    "wire",
)


class _CommitThread:
    """A synchronous engine on a SQLite file and the one thread that commits through it.

    Through aiosqlite every statement is several hand-offs between the loop's thread and
    the driver's, and while the loop is busy each waits for the GIL; a commit took tens
    of milliseconds under load. Here a whole commit is one call on this thread.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="runservice-commit")

    async def run(self, plan: _Plan) -> None:
        """Executes `plan` in one transaction on the commit thread."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._run, plan)

    def _run(self, plan: _Plan) -> None:
        with self._engine.begin() as conn:
            for sql, values in plan:
                conn.exec_driver_sql(sql, values)

    def close(self) -> None:
        """Closes the connection and stops the thread."""
        self._engine.dispose()
        self._thread.shutdown()


class _PgCommitConnection:
    """One PostgreSQL connection kept for the writer's commits, driven through asyncpg
    itself: no pool checkout (with its ping) per commit, and no SQLAlchemy per statement.
    A one-event commit took 594 µs of the server's CPU through the pool and SQLAlchemy,
    181 µs this way (917 and 318 with the fencing and the NOTIFY of replicas). A
    connection that fails is dropped; the next commit opens a new one.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None
        self._raw: Any = None  # the asyncpg Connection under _conn

    async def run(self, work: Callable[[Sql], Awaitable[T]]) -> T:
        """Runs `work` in a transaction on the connection; driver errors become store
        errors, as everywhere in the store. A connection found dead at BEGIN (the database
        ended the session while it was idle) is replaced at once: nothing was sent on it."""
        raw, transaction = await self._begin()
        try:
            result = await work(RawSql(raw))
            await transaction.commit()
            return result
        except asyncpg.PostgresError as exc:
            await self._rollback(raw, transaction)
            raise _pg_error(exc) from exc
        except _CONNECTION_TROUBLE as exc:
            await self._drop()
            raise StoreUnavailableError("database operation failed", _UNREACHABLE) from exc
        except BaseException:  # cancelled mid-transaction: its state is unknown
            raw.terminate()
            self._raw = None
            raise

    async def _begin(self) -> tuple[Any, Any]:
        retried = False
        while True:
            raw = await self._open()
            transaction = raw.transaction()
            try:
                await transaction.start()
                return raw, transaction
            except (asyncpg.PostgresError, *_CONNECTION_TROUBLE) as exc:
                await self._drop()
                if retried or not _session_gone(exc):
                    if isinstance(exc, asyncpg.PostgresError):
                        raise _pg_error(exc) from exc
                    raise StoreUnavailableError("database operation failed", _UNREACHABLE) from exc
                retried = True

    async def _rollback(self, raw: Any, transaction: Any) -> None:
        if raw.is_closed():
            await self._drop()
            return
        try:
            await transaction.rollback()
        except Exception:  # the connection is unusable: a new one next time
            await self._drop()

    async def _open(self) -> Any:
        if self._raw is not None and not self._raw.is_closed():
            return self._raw
        await self._drop()
        with _driver_errors():
            conn = await self._engine.connect()
            self._raw = (await conn.get_raw_connection()).driver_connection
            self._conn = conn
        return self._raw

    async def _drop(self) -> None:
        conn, self._conn, self._raw = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        """Closes the connection."""
        await self._drop()


class _PgPages:
    """Replay pages on PostgreSQL, read through asyncpg's own pool of a few connections:
    a page costs a third of the server's CPU it takes through SQLAlchemy's pool (whose
    checkout pings the connection). A subscriber that follows a run another replica
    executes reads a page per notification, so this is on the path of every event
    delivered across replicas. A connection that turns out dead is replaced and the
    read made once more (a read may be repeated)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        pool_size = getattr(engine.pool, "size", lambda: 5)()
        self._max = max(2, pool_size // 2)
        self._pool: Any = None
        self._opening = asyncio.Lock()

    async def fetch(self, sql: str, *values: Any) -> list[tuple[Any, ...]]:
        """The rows of a query, as tuples."""
        for attempt in range(2):
            try:
                pool = await self._open()
                async with pool.acquire() as raw:
                    return [tuple(row) for row in await raw.fetch(sql, *values)]
            except (asyncpg.PostgresError, *_CONNECTION_TROUBLE) as exc:
                if attempt or not _session_gone(exc):
                    if isinstance(exc, asyncpg.PostgresError):
                        raise _pg_error(exc) from exc
                    raise StoreUnavailableError("database operation failed", _UNREACHABLE) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._url,
                    min_size=1,
                    max_size=self._max,
                    timeout=PG_CONNECT_TIMEOUT_S,
                    reset=_no_reset,
                    server_settings={"application_name": "runservice"},
                )
        return self._pool

    def close(self) -> None:
        """Closes every connection at once."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None


async def _no_reset(_conn: Any) -> None:
    """A page read changes no session state: nothing to reset between reads (asyncpg's
    default reset is a round trip per read)."""


# What asyncpg raises when the connection, not the statement, is the trouble: it was lost
# (InterfaceError), or it is in a state it cannot go on from (InternalClientError: "cannot
# switch to state 15; another operation is in progress", after the session was ended).
_CONNECTION_TROUBLE = (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


def _session_gone(exc: BaseException) -> bool:
    """True when `exc` says the session itself is gone (connection trouble, or SQLSTATE
    class 08 connection exception or 57P operator intervention: a terminated backend, a
    server shutting down), so the same work may be tried once more on a new connection."""
    if not isinstance(exc, asyncpg.PostgresError):
        return True
    code = str(getattr(exc, "sqlstate", "") or "")
    return code.startswith(("08", "57P"))


def _pg_error(exc: Exception) -> StoreError:
    """The store error for one of asyncpg's own errors, by its SQLSTATE code."""
    cause = _code_cause(getattr(exc, "sqlstate", None))
    if cause is not None:
        return StoreUnavailableError(
            "database operation failed", cause, contended=cause == _PG_CONTENDED
        )
    return StoreError("database refused the operation")


class _MultiRow:
    """INSERTs of one table (upserts, with `update`) in the driver's own SQL, taking rows
    as tuples in column order.

    With SQLite ("?" placeholders) many rows go in one statement, since each statement is
    a step of the database and a hand-off of the GIL; its SQL is the one-row statement
    with the VALUES group repeated, checked at start against SQLAlchemy's own two-row
    statement (compiling a 512-row statement would take SQLAlchemy half a second).
    Other drivers get the one-row statement and all the rows to run it for (asyncpg's
    executemany sends them in one round trip).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        table: Table,
        columns: Sequence[str],
        update: Sequence[str] = (),
    ) -> None:
        self._engine = engine
        self._table = table
        self._columns = columns
        self._update = update
        one = self._compile(1)
        self._head, self._group, self._tail = one, "", ""
        if engine.dialect.paramstyle == "qmark":
            start = one.index(" VALUES (") + len(" VALUES ")
            end = one.index(")", start) + 1
            self._head, self._group, self._tail = one[:start], one[start:end], one[end:]
            if self._sql(2) != self._compile(2):
                raise StoreError("the SQL of a multi-row INSERT is not as expected")

    def statements(self, rows: Sequence[tuple[Any, ...]]) -> _Plan:
        """`rows` as statements, each with its values (a list of rows: run once per row)."""
        if not rows:
            return []
        if not self._group:
            return [(self._head, list(rows))]
        out: _Plan = []
        start = 0
        while start < len(rows):  # power-of-two sizes: few distinct statements to prepare
            size = min(INSERT_CHUNK, 1 << ((len(rows) - start).bit_length() - 1))
            chunk = rows[start : start + size]
            start += size
            out.append((self._sql(size), tuple(itertools.chain.from_iterable(chunk))))
        return out

    def _sql(self, rows: int) -> str:
        return self._head + ", ".join([self._group] * rows) + self._tail

    def _compile(self, rows: int) -> str:
        engine, names = self._engine, self._columns
        values: list[dict[str, Any]] = [
            {c: bindparam(f"{c}_{i}") for c in names} for i in range(rows)
        ]
        statement: Any = _insert_for(engine)(self._table).values(values)
        if self._update:
            statement = statement.on_conflict_do_update(
                index_elements=[self._table.c.run_id],
                set_={c: statement.excluded[c] for c in self._update},
            )
        return _driver_sql(engine, statement, [f"{c}_{i}" for i in range(rows) for c in names])


def _driver_sql(engine: AsyncEngine, statement: Any, names: Sequence[str]) -> str:
    """`statement` in the driver's own SQL, taking the parameters `names` in that order."""
    compiled = statement.compile(engine)
    if not compiled.positional or list(compiled.positiontup or ()) != list(names):
        raise StoreError(f"the {engine.dialect.name} driver does not take positional values")
    return str(compiled)


def _page_query(engine: AsyncEngine) -> str:
    """read_encoded's query: (seq, wire, terminal 1/0) of a page of one run's log."""
    terminal = ", ".join(f"'{state}'" for state in sorted(_TERMINAL))  # enum values, not input
    query = text(
        "SELECT seq, wire, CASE WHEN state IN (" + terminal + ") THEN 1 ELSE 0 END FROM run_events"
        " WHERE run_id = :run_id AND seq >= :from_seq ORDER BY seq LIMIT :limit"
    )
    return _driver_sql(engine, query, ("run_id", "from_seq", "limit"))


def _insert_for(engine: AsyncEngine) -> Callable[[Table], Any]:
    """The dialect's own insert(), which knows ON CONFLICT."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert
    if engine.dialect.name == "sqlite":
        return sqlite.insert
    raise StoreError(f"the {engine.dialect.name} database is not supported")


def _event_row(event: RunEvent) -> tuple[Any, ...]:
    """The event as a row of _EVENT_COLUMNS; with a wire form, the payload is only in it."""
    return (
        event.run_id,
        event.seq,
        _us(event.at),
        event.type,
        _payload_kind(event),
        None if event.wire is not None else _payload(event),
        None if event.state is None else event.state.value,
        _failure_json(event.error),
        event.wire,
    )


def _payload_kind(event: RunEvent) -> int:
    if event.data is not None:
        return _PAYLOAD_DATA
    if event.text is not None:
        return _PAYLOAD_TEXT
    if event.value is not None:
        return _PAYLOAD_VALUE
    return _PAYLOAD_NONE if event.binary is None else _PAYLOAD_BINARY


def _payload(event: RunEvent) -> bytes | None:
    if event.data is not None:
        return json.dumps(event.data, separators=(",", ":")).encode()
    if event.text is not None:
        return event.text.encode()
    if event.value is not None:
        return event.value.encode()
    return event.binary


def _event_from_row(row: Any) -> RunEvent:
    kind, payload = row.payload_kind, row.payload
    at = _at(row.at_us)
    assert at is not None
    return RunEvent(
        run_id=row.run_id,
        seq=row.seq,
        at=at,
        type=row.type,
        data=json.loads(payload) if kind == _PAYLOAD_DATA else None,
        text=payload.decode() if kind == _PAYLOAD_TEXT else None,
        binary=bytes(payload) if kind == _PAYLOAD_BINARY else None,
        state=None if row.state is None else RunState(row.state),
        error=_failure(row.error),
        value=payload.decode() if kind == _PAYLOAD_VALUE else None,
    )
