"""Completion webhooks in the database: deliveries and their attempts.

Two parts. `DeliveryRows` gives the commit of a run's end (sql.py's _commit_plan, on every
path that ends runs: the writer, the sweep of orphans at start, a peer replica's sweep)
the statement that stores its deliveries in the same transaction, so a delivery is never
lost to a crash after the end is committed. `SqlWebhookLog` is what the sender
(runservice/webhooks) and ListWebhookDeliveries read and write afterwards.

Claims. A sender takes due deliveries by moving their `next_us` past the attempt's
timeout (`claimed` = 1) and counting the attempt, in one short transaction; on PostgreSQL
under FOR UPDATE SKIP LOCKED, so replicas sharing the database take different rows. No
transaction stays open during a POST. A sender that dies mid-attempt leaves a claim that
lapses at its `next_us`, and the delivery is attempted again (at least once). An
attempt's outcome is recorded only while its claim is still the latest one, except a
success, which always ends the delivery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, delete, exists, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runservice.domain.errors import StoreError
from runservice.domain.model import Run
from runservice.domain.webhooks import (
    AttemptOutcome,
    DeliveryState,
    DueDelivery,
    WebhookAttempt,
    WebhookDelivery,
    WebhookTarget,
    delivery_id,
)
from runservice.store import tables

if TYPE_CHECKING:
    from runservice.store.sql import SqlRunStore

_Statements = list[tuple[str, list[tuple[Any, ...]]]]

_D = tables.webhook_deliveries
_A = tables.webhook_attempts
_PENDING = DeliveryState.PENDING.value
_INSERT_COLUMNS = (
    "delivery_id",
    "run_id",
    "target",
    "url",
    "body",
    "state",
    "created_us",
    "next_us",
    "claimed",
    "attempts",
)


class DeliveryRows:
    """The deliveries a commit stores for the runs it ends: one to the deployment's
    webhook, one to the run's own; none until `enable` (a server without webhooks)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sql = _insert_sql(engine)
        self._deployment_url = ""
        self._body: Callable[[Run], bytes] | None = None

    def enable(self, deployment_url: str, body: Callable[[Run], bytes]) -> None:
        """From now on a run's end stores its deliveries: to `deployment_url` (if any)
        and to the run's own webhook_url, each POSTing what `body` makes of the run."""
        self._deployment_url = deployment_url
        self._body = body

    def statements(self, runs: Iterable[Run]) -> _Statements:
        """The INSERT of the deliveries of the terminal runs among `runs` (ON CONFLICT DO
        NOTHING: an end committed twice stores its deliveries once)."""
        if self._body is None:
            return []
        rows: list[tuple[Any, ...]] = []
        now = _now_us()
        for run in runs:
            targets = self._targets(run) if run.state.terminal else []
            if not targets:
                continue
            body = self._body(run)
            for target, url in targets:
                key = delivery_id(run.run_id, target)
                rows.append((key, run.run_id, target.value, url, body, _PENDING, now, now, 0, 0))
        return [(self._sql, rows)] if rows else []

    def _targets(self, run: Run) -> list[tuple[WebhookTarget, str]]:
        targets = []
        if self._deployment_url and self._deployment_url != run.webhook_url:
            targets.append((WebhookTarget.DEPLOYMENT, self._deployment_url))
        if run.webhook_url:
            targets.append((WebhookTarget.RUN, run.webhook_url))
        return targets


class SqlWebhookLog:
    """Deliveries as the sender and ListWebhookDeliveries see them."""

    def __init__(self, store: SqlRunStore) -> None:
        self._store = store
        self._skip_locked = store.cluster is not None  # PostgreSQL: replicas share the rows

    async def claim(self, now_us: int, limit: int, claim_until_us: int) -> list[DueDelivery]:
        """Up to `limit` deliveries due at `now_us`, oldest due first, each claimed until
        `claim_until_us` for one more attempt."""
        due = (
            select(_D.c.delivery_id)
            .where(_D.c.state == _PENDING, _D.c.next_us <= now_us)
            .order_by(_D.c.next_us)
            .limit(limit)
        )
        if self._skip_locked:
            due = due.with_for_update(skip_locked=True)
        claim = (
            update(_D)
            .where(_D.c.delivery_id.in_(due))
            .values(claimed=1, attempts=_D.c.attempts + 1, next_us=claim_until_us)
            .returning(
                _D.c.delivery_id, _D.c.run_id, _D.c.url, _D.c.body, _D.c.created_us, _D.c.attempts
            )
        )
        if not await self._any_due(now_us):
            return []
        claimed: list[DueDelivery] = []

        async def work(conn: AsyncConnection) -> None:
            rows = (await conn.execute(claim)).all()
            claimed[:] = [DueDelivery(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

        await self._store.transaction(work)
        return sorted(claimed, key=lambda d: d.created_us)

    async def _any_due(self, now_us: int) -> bool:
        """A read first: a poll that finds nothing due takes no write lock (on SQLite, one
        the writer's group commits would have to wait out)."""
        query = select(_D.c.delivery_id).where(_D.c.state == _PENDING, _D.c.next_us <= now_us)
        async with self._store.connection() as conn:
            return (await conn.execute(query.limit(1))).first() is not None

    async def record(
        self,
        due: DueDelivery,
        attempt: WebhookAttempt,
        outcome: AttemptOutcome,
        next_us: int,
    ) -> None:
        """Stores the attempt and what it leads to: the delivery DELIVERED, due again at
        `next_us` (retrying), or FAILED (gave_up)."""
        row = {
            "delivery_id": due.delivery_id,
            "attempt": due.attempt,
            "at_us": _us(attempt.at),
            "duration_us": int(attempt.duration * 1_000_000),
            "status": attempt.status,
            "error": attempt.error,
        }
        pending = (_D.c.delivery_id == due.delivery_id) & (_D.c.state == _PENDING)
        latest = pending & (_D.c.attempts == due.attempt)  # no newer claim took it over
        now = _now_us()
        change: Any
        if outcome == "delivered":
            delivered = DeliveryState.DELIVERED.value
            change = update(_D).where(pending).values(state=delivered, claimed=0, ended_us=now)
        elif outcome == "retrying":
            change = update(_D).where(latest).values(claimed=0, next_us=next_us)
        else:
            failed = DeliveryState.FAILED.value
            change = update(_D).where(latest).values(state=failed, claimed=0, ended_us=now)
        insert = _dialect_insert(self._store)(_A).values(row).on_conflict_do_nothing()

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(insert)
            await conn.execute(change)

        await self._store.transaction(work)

    async def release(self, claims: Sequence[DueDelivery]) -> None:
        """Gives back claims whose attempts never ran (a shutdown cut them short): due
        now, and their attempt numbers free again."""
        if not claims:
            return
        now = _now_us()

        async def work(conn: AsyncConnection) -> None:
            for due in claims:
                latest = (_D.c.delivery_id == due.delivery_id) & (_D.c.attempts == due.attempt)
                await conn.execute(
                    update(_D)
                    .where(latest & (_D.c.state == _PENDING))
                    .values(claimed=0, next_us=now, attempts=due.attempt - 1)
                )

        await self._store.transaction(work, retry=False)

    async def release_all(self) -> int:
        """Makes every claimed delivery due now: for a server that knows no other process
        can hold a claim (a SQLite file serves one process), as it starts."""
        count = 0
        claimed = (_D.c.claimed == 1) & (_D.c.state == _PENDING)

        async def work(conn: AsyncConnection) -> None:
            nonlocal count
            result = await conn.execute(
                update(_D).where(claimed).values(claimed=0, next_us=_now_us())
            )
            count = int(result.rowcount)

        await self._store.transaction(work)
        return count

    async def deliveries(self, run_id: str) -> list[WebhookDelivery]:
        """The run's deliveries, the deployment's first, each with its attempts in order
        (one statement: a delivery and its attempts as of one moment)."""
        attempt_columns = [c.label(f"a_{c.name}") for c in _A.c if c.name != "delivery_id"]
        query = (
            select(_D, *attempt_columns)
            .outerjoin(_A, _A.c.delivery_id == _D.c.delivery_id)
            .where(_D.c.run_id == run_id)
            .order_by(_D.c.target, _A.c.attempt)
        )
        async with self._store.connection() as conn:
            rows = (await conn.execute(query)).all()
        found: dict[str, tuple[Any, list[WebhookAttempt]]] = {}
        for row in rows:
            _, attempts = found.setdefault(row.delivery_id, (row, []))
            if row.a_attempt is not None:
                attempts.append(
                    WebhookAttempt(
                        attempt=row.a_attempt,
                        at=_at(row.a_at_us),
                        duration=row.a_duration_us / 1_000_000,
                        status=row.a_status,
                        error=row.a_error,
                    )
                )
        return [_delivery(row, attempts) for row, attempts in found.values()]

    async def forget_finished(self, limit: int = 500) -> int:
        """Deletes up to `limit` finished deliveries (and their attempts) whose run is gone
        (deleted, or purged at the end of its retention); returns how many. A pending one
        stays until it is delivered or given up, whatever became of its run."""
        runs = tables.runs
        gone = (
            select(_D.c.delivery_id)
            .where(_D.c.state != _PENDING, ~exists().where(runs.c.run_id == _D.c.run_id))
            .limit(limit)
        )
        count = 0

        async def work(conn: AsyncConnection) -> None:
            nonlocal count
            ids = list((await conn.execute(gone)).scalars())
            if ids:
                await conn.execute(delete(_A).where(_A.c.delivery_id.in_(ids)))
                await conn.execute(delete(_D).where(_D.c.delivery_id.in_(ids)))
            count = len(ids)

        await self._store.transaction(work)
        return count


def _delivery(row: Any, attempts: list[WebhookAttempt]) -> WebhookDelivery:
    state = DeliveryState(row.state)
    return WebhookDelivery(
        delivery_id=row.delivery_id,
        run_id=row.run_id,
        target=WebhookTarget(row.target),
        url=row.url,
        state=state,
        created_at=_at(row.created_us),
        next_attempt_at=_at(row.next_us) if state is DeliveryState.PENDING else None,
        ended_at=None if row.ended_us is None else _at(row.ended_us),
        attempts=tuple(attempts),
    )


def _insert_sql(engine: AsyncEngine) -> str:
    """The one-row INSERT ... ON CONFLICT DO NOTHING of a delivery, in the driver's SQL."""
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    values: dict[str, Any] = {c: bindparam(c) for c in _INSERT_COLUMNS}
    statement: Any = insert(_D).values(values)
    statement = statement.on_conflict_do_nothing(index_elements=["delivery_id"])
    compiled = statement.compile(engine)
    if list(compiled.positiontup or ()) != list(_INSERT_COLUMNS):
        raise StoreError(f"the {engine.dialect.name} driver does not take positional values")
    return str(compiled)


def _dialect_insert(store: SqlRunStore) -> Callable[..., Any]:
    return postgresql.insert if store.cluster is not None else sqlite.insert


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def _us(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def _at(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)
