"""SqlRunStore: runs and event logs in any SQLAlchemy async database (SQLite, PostgreSQL).

Writes only SQL both accept. Driver errors stay here: "database is locked" is retried a
bounded number of times; a database that stays locked or cannot be reached surfaces as
StoreUnavailableError (worth retrying later), any other driver error as StoreError.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Table, and_, bindparam, delete, exists, insert, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runservice.domain.errors import StoreError, StoreUnavailableError
from runservice.domain.model import (
    EncodedEvent,
    MultitaskStrategy,
    Run,
    RunEvent,
    RunFailure,
    RunFilter,
    RunState,
    Scope,
)
from runservice.domain.ports import EventDecoder, EventEncoder
from runservice.store import migrations, tables
from runservice.store.engine import make_engine

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOCK_RETRIES = 8
LOCK_BACKOFF_S = 0.05

_PAYLOAD_NONE, _PAYLOAD_DATA, _PAYLOAD_TEXT, _PAYLOAD_BINARY = 0, 1, 2, 3
_TERMINAL = frozenset(s.value for s in RunState if s.terminal)


async def open_store(
    url: str, encoder: EventEncoder | None = None, decoder: EventDecoder | None = None
) -> SqlRunStore:
    """A store on `url`, schema migrated, with the codec of events' wire forms (if any)."""
    store = SqlRunStore(make_engine(url), encoder, decoder)
    await store.migrate()
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
    ) -> None:
        self._engine = engine
        self._encoder = encoder
        self._decoder = decoder
        self._insert_events = _positional_insert(engine, tables.events, _EVENT_COLUMNS)

    async def migrate(self) -> None:
        """Brings the schema up to date."""
        await migrations.migrate(self._engine)

    async def close(self) -> None:
        """Releases every pooled connection."""
        await self._engine.dispose()

    async def commit(
        self, new_runs: Sequence[Run], events: Sequence[RunEvent], updated_runs: Sequence[Run]
    ) -> None:
        """Commits runs, events and run updates in one transaction."""

        async def work(conn: AsyncConnection) -> None:
            if new_runs:
                await conn.execute(insert(tables.runs), [_run_row(r) for r in new_runs])
                labels = [
                    {"run_id": r.run_id, "key": k, "value": v}
                    for r in new_runs
                    for k, v in r.labels.items()
                ]
                if labels:
                    await conn.execute(insert(tables.run_labels), labels)
            if events:
                # The hot path: rows straight to the driver, no per-row SQLAlchemy work.
                await conn.exec_driver_sql(self._insert_events, [_event_row(e) for e in events])
                await conn.execute(_RAISE_LAST_SEQ, _last_seqs(events))
            if updated_runs:
                await conn.execute(_UPDATE_RUN, [_update_row(r) for r in updated_runs])

        await self._write(work)

    async def get_run(self, scope: Scope, run_id: str) -> Run | None:
        """The run, when `scope` may see it."""
        query = select(tables.runs).where(tables.runs.c.run_id == run_id)
        async with self._engine.connect() as conn:
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
        async with self._engine.connect() as conn:
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
        async with self._engine.connect() as conn:
            rows = (await self._read(conn, query)).all()
        return [self._event_from_row(row) for row in rows]

    def _event_from_row(self, row: Any) -> RunEvent:
        if row.wire is None:
            return _event_from_row(row)
        if self._decoder is None:
            raise StoreError("this store has no event decoder")
        return self._decoder(row.wire)

    async def read_encoded(self, run_id: str, from_seq: int, limit: int) -> list[EncodedEvent]:
        """A page of the run's log in wire form; rows stored before encoding are encoded now."""
        e = tables.events.c
        query = (
            select(e.seq, e.wire, e.state)
            .where(e.run_id == run_id, e.seq >= from_seq)
            .order_by(e.seq)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await self._read(conn, query)).all()
        if any(wire is None for _, wire, _ in rows):
            return [
                self._encode(event) for event in await self.read_events(run_id, from_seq, limit)
            ]
        return [
            EncodedEvent(seq, wire, state is not None and state in _TERMINAL)
            for seq, wire, state in rows
        ]

    def _encode(self, event: RunEvent) -> EncodedEvent:
        if self._encoder is None:
            raise StoreError("this store has no event encoder")
        return EncodedEvent(event.seq, self._encoder(event), event.terminal)

    async def delete_run(self, scope: Scope, run_id: str) -> bool:
        """Deletes the run, its labels and its events in one transaction."""
        deleted = False

        async def work(conn: AsyncConnection) -> None:
            nonlocal deleted
            cond = [tables.runs.c.run_id == run_id]
            if not scope.everyone:
                cond.append(tables.runs.c.owner == scope.user)
            result = await conn.execute(delete(tables.runs).where(*cond))
            deleted = result.rowcount > 0
            if deleted:
                await conn.execute(delete(tables.events).where(tables.events.c.run_id == run_id))
                await conn.execute(
                    delete(tables.run_labels).where(tables.run_labels.c.run_id == run_id)
                )

        await self._write(work)
        return deleted

    async def find_by_request_id(self, scope: Scope, request_id: str) -> Run | None:
        """The scope's user's run started with `request_id`, if any."""
        r = tables.runs.c
        query = select(tables.runs).where(r.owner == scope.user, r.request_id == request_id)
        async with self._engine.connect() as conn:
            row = (await self._read(conn, query)).first()
            if row is None:
                return None
            labels = await self._labels(conn, [row.run_id])
        return _run_from_row(row, labels.get(row.run_id, {}))

    async def purge_ended_before(self, cutoff: datetime, limit: int) -> list[str]:
        """Deletes up to `limit` finished runs that ended before `cutoff`, with their logs."""
        r = tables.runs.c
        terminal = [s.value for s in RunState if s.terminal]
        query = (
            select(r.run_id)
            .where(r.state.in_(terminal), r.ended_us < _us(cutoff))
            .order_by(r.ended_us)
            .limit(limit)
        )
        purged: list[str] = []

        async def work(conn: AsyncConnection) -> None:
            nonlocal purged
            run_ids = list((await conn.execute(query)).scalars())
            if run_ids:
                await conn.execute(delete(tables.events).where(tables.events.c.run_id.in_(run_ids)))
                await conn.execute(
                    delete(tables.run_labels).where(tables.run_labels.c.run_id.in_(run_ids))
                )
                await conn.execute(delete(tables.runs).where(r.run_id.in_(run_ids)))
            purged = run_ids

        await self._write(work)
        return purged

    async def unfinished_runs(self) -> list[Run]:
        """Every run left PENDING or RUNNING, across owners (for reconciliation)."""
        active = [RunState.PENDING.value, RunState.RUNNING.value]
        query = (
            select(tables.runs)
            .where(tables.runs.c.state.in_(active))
            .order_by(tables.runs.c.run_id)
        )
        async with self._engine.connect() as conn:
            rows = (await self._read(conn, query)).all()
            labels = await self._labels(conn, [row.run_id for row in rows])
        return [_run_from_row(row, labels.get(row.run_id, {})) for row in rows]

    async def _labels(self, conn: AsyncConnection, run_ids: list[str]) -> dict[str, dict[str, str]]:
        if not run_ids:
            return {}
        lab = tables.run_labels.c
        query = select(lab.run_id, lab.key, lab.value).where(lab.run_id.in_(run_ids))
        found: dict[str, dict[str, str]] = {}
        for run_id, key, value in (await self._read(conn, query)).all():
            found.setdefault(run_id, {})[key] = value
        return found

    async def _read(self, conn: AsyncConnection, query: Any) -> Any:
        return await _retry_locked(lambda: conn.execute(query))

    async def _write(self, work: Callable[[AsyncConnection], Awaitable[None]]) -> None:
        async def attempt() -> None:
            async with self._engine.begin() as conn:
                await work(conn)

        await _retry_locked(attempt)


async def _retry_locked(attempt: Callable[[], Awaitable[T]]) -> T:
    """Runs `attempt`, retrying a bounded number of times while the database is locked."""
    for n in range(LOCK_RETRIES):
        try:
            return await attempt()
        except OperationalError as exc:
            if not _is_lock_error(exc) or n == LOCK_RETRIES - 1:
                raise StoreUnavailableError("database operation failed") from exc
            logger.warning("database is locked; retry %d of %d", n + 1, LOCK_RETRIES - 1)
            await asyncio.sleep(LOCK_BACKOFF_S * (2**n))
        except InterfaceError as exc:
            raise StoreUnavailableError("database connection failed") from exc
        except DBAPIError as exc:
            raise StoreError("database refused the operation") from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _is_lock_error(exc: OperationalError) -> bool:
    text = str(exc.orig).lower()
    return "locked" in text or "busy" in text


_RAISE_LAST_SEQ = (
    update(tables.runs)
    .where(tables.runs.c.run_id == bindparam("b_run_id"))
    .where(tables.runs.c.last_seq < bindparam("b_last_seq"))
    .values(last_seq=bindparam("b_last_seq"))
)

_UPDATE_RUN = (
    update(tables.runs)
    .where(tables.runs.c.run_id == bindparam("b_run_id"))
    .values(
        state=bindparam("b_state"),
        result=bindparam("b_result"),
        error=bindparam("b_error"),
        started_us=bindparam("b_started_us"),
        ended_us=bindparam("b_ended_us"),
        stop_reason=bindparam("b_stop_reason"),
    )
)


def _last_seqs(events: Iterable[RunEvent]) -> list[dict[str, Any]]:
    highest: dict[str, int] = {}
    for event in events:
        highest[event.run_id] = max(highest.get(event.run_id, 0), event.seq)
    return [{"b_run_id": k, "b_last_seq": v} for k, v in highest.items()]


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


def _run_row(run: Run) -> dict[str, Any]:
    return {
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
    }


def _update_row(run: Run) -> dict[str, Any]:
    return {
        "b_run_id": run.run_id,
        "b_state": run.state.value,
        "b_result": _json(run.result),
        "b_error": _failure_json(run.error),
        "b_started_us": _us(run.started_at),
        "b_ended_us": _us(run.ended_at),
        "b_stop_reason": run.stop_reason,
    }


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
        request_hash=row.request_hash,
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


def _positional_insert(engine: AsyncEngine, table: Table, columns: Sequence[str]) -> str:
    """The driver's own INSERT statement for `columns`, taking one tuple per row."""
    compiled = insert(table).values({c: bindparam(c) for c in columns}).compile(engine)
    if not compiled.positional or list(compiled.positiontup or ()) != list(columns):
        raise StoreError(f"the {engine.dialect.name} driver does not take positional parameters")
    return str(compiled)


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
    return _PAYLOAD_NONE if event.binary is None else _PAYLOAD_BINARY


def _payload(event: RunEvent) -> bytes | None:
    if event.data is not None:
        return json.dumps(event.data, separators=(",", ":")).encode()
    if event.text is not None:
        return event.text.encode()
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
    )
