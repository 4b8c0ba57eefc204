"""What replicas on one PostgreSQL database share: leases, fencing, notifications, requests
and the start decisions, in SQL (PostgreSQL's own: advisory locks, LISTEN/NOTIFY).

Leases. Each server process holds one lease row (`holder`, new at each start) that it
renews; the runs it executes name that holder as their `executor`. Expiry is reckoned by
the database's clock only. A peer deletes an expired lease row and then ends the runs
whose executor has no lease row any more (INTERRUPTED, terminal event at the next seq,
under the run row's lock), in its own transactions.

Fencing. Every commit of a replica's writer first takes a KEY SHARE lock on the lease row
of each run it writes (through the run row's executor) and drops, from that transaction,
every run whose lease row is gone. Deleting a lease row needs a lock that conflicts with
KEY SHARE, so a sweep waits for commits in flight and every commit after it sees the
lease gone: the database, not timing, refuses a fenced replica's writes.

Notifications. A commit that changes runs sends one NOTIFY on CHANNEL (more only past
PAYLOAD_LIMIT) in the same transaction: {"h": holder, "e": {run: last seq}, "n": [new
runs], "c": [changed rows], "q": [runs with a new request], "d": {deleted run: owner}}.
PostgreSQL delivers it at commit, to one LISTEN connection per replica.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runservice.domain.errors import RunFencedError
from runservice.domain.model import Checkpoint, Run, RunEvent, RunState
from runservice.domain.replicas import (
    INPUT_REQUEST,
    Notice,
    OrphanFate,
    StartAsk,
    StartFacts,
    StartWrite,
    commit_notice,
)
from runservice.store.driver import SaSql, Sql

if TYPE_CHECKING:
    from runservice.store.sql import SqlRunStore

logger = logging.getLogger(__name__)

CHANNEL = "runservice"

# The database's clock, in integer microseconds since the epoch (the tables' unit).
_NOW_US = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
_ACTIVE = "('PENDING', 'RUNNING')"
_AGENTS = " AND agent <> 'external'"  # external runs: caps of their own, and no executor
_USER_LOCK = "pg_advisory_xact_lock(hashtextextended('runservice:user:' || $1, 0))"
_ALL_LOCK = "pg_advisory_xact_lock(hashtextextended('runservice:all', 0))"


class ClusterSql:
    """The replicas' SQL, over the store's engine (PostgreSQL only)."""

    def __init__(self, store: SqlRunStore, engine: AsyncEngine) -> None:
        self._store = store
        self._engine = engine

    # -- leases ------------------------------------------------------------------------

    def fence_by(self, holder: str) -> None:
        """Fences every later commit of the store by `holder`'s lease (SqlRunStore.fence_by)."""
        self._store.fence_by(holder)

    async def begin_lease(self, replica: str, holder: str, ttl: float) -> None:
        """Ends the leases of this replica's earlier lives and takes a new one."""

        async def work(conn: AsyncConnection) -> None:
            await conn.exec_driver_sql(
                "DELETE FROM runservice_leases WHERE replica = $1", (replica,)
            )
            await conn.exec_driver_sql(
                "INSERT INTO runservice_leases (holder, replica, expires_us)"
                f" VALUES ($1, $2, {_NOW_US} + $3)",
                (holder, replica, int(ttl * 1_000_000)),
            )

        await self._store.transaction(work)

    async def renew(self, holder: str, ttl: float) -> bool | None:
        """Extends the lease by `ttl` from now (the database's now). True if it had not
        expired yet, False if it had (but no peer had ended it), None if it is gone."""
        found: list[Any] = []

        async def work(conn: AsyncConnection) -> None:
            result = await conn.exec_driver_sql(
                f"UPDATE runservice_leases l SET expires_us = {_NOW_US} + $2"
                " FROM (SELECT holder, expires_us AS before FROM runservice_leases"
                " WHERE holder = $1) o"
                f" WHERE l.holder = o.holder RETURNING o.before > {_NOW_US}",
                (holder, int(ttl * 1_000_000)),
            )
            found.extend(_rows(result))

        await self._store.transaction(work, retry=False)
        return bool(found[0][0]) if found else None

    async def end_lease(self, holder: str) -> None:
        """Gives the lease up (a clean shutdown): whatever of its runs is unfinished is
        ended by the next sweep, of any replica."""

        async def work(conn: AsyncConnection) -> None:
            await conn.exec_driver_sql("DELETE FROM runservice_leases WHERE holder = $1", (holder,))

        await self._store.transaction(work, retry=False)

    async def expire_leases(self) -> list[str]:
        """Deletes every expired lease (waiting for the commits that hold one); returns the
        holders."""
        gone: list[str] = []

        async def work(conn: AsyncConnection) -> None:
            result = await conn.exec_driver_sql(
                f"DELETE FROM runservice_leases WHERE expires_us < {_NOW_US} RETURNING holder"
            )
            gone.extend(row[0] for row in _rows(result))

        await self._store.transaction(work, retry=False)
        return gone

    async def end_orphans(self, holder: str, end: OrphanFate, limit: int = 500) -> list[Run]:
        """Ends (or takes over) up to `limit` unfinished runs whose executor holds no lease,
        each with the event, row and snapshot that `end` makes of it (given the run with
        the last seq its log reached, and its latest checkpoint), under the run rows' locks;
        returns their rows as written (terminal, or RUNNING under `holder` when resumed)."""
        ended: list[Run] = []

        async def work(conn: AsyncConnection) -> None:
            result = await conn.exec_driver_sql(
                "SELECT r.run_id FROM runs r WHERE r.state IN "
                + _ACTIVE
                + " AND r.agent <> 'external'"
                " AND NOT EXISTS"
                " (SELECT 1 FROM runservice_leases l WHERE l.holder = r.executor)"
                " ORDER BY r.run_id LIMIT $1 FOR UPDATE OF r SKIP LOCKED",
                (limit,),
            )
            run_ids = [row[0] for row in _rows(result)]
            if not run_ids:
                return
            orphans = await self._store.runs_reached(conn, run_ids)
            checkpoints = await self._checkpoints(conn, run_ids)
            fates = [end(run, checkpoints.get(run.run_id)) for run in orphans]
            events = [event for event, _, _ in fates]
            rows = [row for _, row, _ in fates]
            snapshots = [snapshot for _, _, snapshot in fates if snapshot is not None]
            sql = SaSql(conn)
            await self._store.write(sql, [], events, rows, snapshots)
            await self._drop_requests(sql, run_ids)
            await self.notify(sql, holder, commit_notice([], list(events), list(rows)))
            ended.extend(rows)

        await self._store.transaction(work, retry=False)
        return ended

    async def _checkpoints(
        self, conn: AsyncConnection, run_ids: list[str]
    ) -> dict[str, Checkpoint]:
        result = await conn.exec_driver_sql(
            "SELECT run_id, seq, state, inputs_used, snapshot FROM run_checkpoints"
            " WHERE run_id = ANY($1::text[])",
            (run_ids,),
        )
        return {
            row[0]: Checkpoint(row[0], int(row[1]), row[2], int(row[3]), row[4])
            for row in _rows(result)
        }

    # -- fencing, inside the writer's commit ----------------------------------------------

    async def fenced(self, sql: Sql, new_runs: Sequence[Run], run_ids: Iterable[str]) -> set[str]:
        """The runs of a commit whose lease is gone (KEY SHARE locks on the others' leases,
        held to the end of the transaction)."""
        fenced: set[str] = set()
        existing = sorted(set(run_ids) - {r.run_id for r in new_runs})
        if existing:
            rows = await sql.fetch(
                "SELECT r.run_id FROM runs r JOIN runservice_leases l ON l.holder = r.executor"
                " WHERE r.run_id = ANY($1::text[]) FOR KEY SHARE OF l",
                (existing,),
            )
            fenced |= set(existing) - {row[0] for row in rows}
        holders = sorted({r.executor for r in new_runs})
        if holders:
            rows = await sql.fetch(
                "SELECT holder FROM runservice_leases WHERE holder = ANY($1::text[]) FOR KEY SHARE",
                (holders,),
            )
            alive = {row[0] for row in rows}
            fenced |= {r.run_id for r in new_runs if r.executor not in alive}
        return fenced

    async def after_commit(
        self,
        sql: Sql,
        holder: str,
        new_runs: Sequence[Run],
        events: Sequence[RunEvent],
        updated_runs: Sequence[Run],
    ) -> None:
        """In the commit's transaction: drops the requests of runs that ended, notifies."""
        ended = [r.run_id for r in updated_runs if r.state.terminal]
        if ended:
            await self._drop_requests(sql, ended)
        await self.notify(sql, holder, commit_notice(new_runs, events, updated_runs))

    async def notify(self, sql: Sql, holder: str, notice: Notice) -> None:
        """Sends `notice` when the transaction commits."""
        for payload in notice.payloads(holder):
            await sql.execute("SELECT pg_notify($1, $2)", (CHANNEL, payload))

    # -- requests: appends that do not come from the run's own agent ------------------------

    async def request(self, holder: str, run_id: str, kind: str, body: str, at_us: int) -> bool:
        """Records a request for the run's executor unless one of `kind` is there or the
        run is finished; True if recorded (and notified)."""
        recorded = False

        async def work(conn: AsyncConnection) -> None:
            nonlocal recorded
            result = await conn.exec_driver_sql(
                "INSERT INTO run_requests (run_id, kind, body, at_us)"
                " SELECT run_id, $2, $3, $4 FROM runs WHERE run_id = $1 AND state IN "
                + _ACTIVE
                + " ON CONFLICT DO NOTHING",
                (run_id, kind, body, at_us),
            )
            recorded = result.rowcount > 0
            if recorded:
                await self.notify(SaSql(conn), holder, Notice(requests=[run_id]))

        await self._store.transaction(work)
        return recorded

    async def requests_for(self, holder: str) -> list[tuple[str, str, str]]:
        """(run_id, kind, body) of every request waiting for a run executed under `holder`:
        stops, then one (run_id, "input", "") per run with inputs not yet appended."""
        async with self._store.connection() as conn:
            result = await conn.exec_driver_sql(
                "SELECT q.run_id, q.kind, q.body FROM run_requests q JOIN runs r"
                " ON r.run_id = q.run_id WHERE r.executor = $1 AND r.state IN "
                + _ACTIVE
                + " ORDER BY q.at_us",
                (holder,),
            )
            requests = [(row[0], row[1], row[2]) for row in _rows(result)]
            result = await conn.exec_driver_sql(
                "SELECT DISTINCT i.run_id FROM run_inputs i JOIN runs r ON r.run_id = i.run_id"
                " WHERE i.seq IS NULL AND r.executor = $1 AND r.state IN " + _ACTIVE,
                (holder,),
            )
            requests += [(row[0], INPUT_REQUEST, "") for row in _rows(result)]
            return requests

    async def wake(self, holder: str, run_id: str) -> None:
        """Tells the replica executing the run that it has requests (inputs) waiting."""

        async def work(conn: AsyncConnection) -> None:
            await self.notify(SaSql(conn), holder, Notice(requests=[run_id]))

        await self._store.transaction(work)

    async def _drop_requests(self, sql: Sql, run_ids: Sequence[str]) -> None:
        await sql.execute(
            "DELETE FROM run_requests WHERE run_id = ANY($1::text[])", (list(run_ids),)
        )

    # -- reading other replicas' runs ---------------------------------------------------

    async def reached(self, run_ids: Sequence[str]) -> dict[str, int]:
        """The last committed seq of each run's log (runs with no events are left out)."""
        if not run_ids:
            return {}
        async with self._store.connection() as conn:
            result = await conn.exec_driver_sql(
                "SELECT run_id, MAX(seq) FROM run_events WHERE run_id = ANY($1::text[])"
                " GROUP BY run_id",
                (list(run_ids),),
            )
            return {row[0]: int(row[1]) for row in _rows(result)}

    # -- start decisions ----------------------------------------------------------------

    async def decide_starts(self, holder: str, asks: Sequence[StartAsk]) -> list[Run | Exception]:
        """Takes the start decisions of `asks` atomically across replicas, in one
        transaction: under the owners' advisory locks (and the server-wide one when an ask
        counts every user's runs), each ask's `decide` is given the facts (including the
        decisions taken before it in the batch) and chooses: an existing run to return, a
        run to write, or an exception. Returns, per ask, the run as written, the existing
        run, or the exception."""
        outcome: list[Run | Exception] = []

        async def work(conn: AsyncConnection) -> None:
            outcome.clear()
            if any(ask.count_all for ask in asks):
                await conn.exec_driver_sql(f"SELECT {_ALL_LOCK}")
            owners = sorted({ask.owner for ask in asks})
            for owner in owners:  # in one order everywhere: no deadlock between replicas
                await conn.exec_driver_sql(f"SELECT {_USER_LOCK}", (owner,))
            batch = _Batch(
                await _counts(conn, "owner = ANY($1::text[]) AND ", (owners,), by_owner=True),
                await _counts(conn, "", ()) if any(a.count_all for a in asks) else {},
            )
            for ask in asks:
                try:
                    facts = await self._facts(conn, ask, batch)
                    decision = ask.decide(facts)
                except Exception as exc:  # the ask's own refusal (or bug): its answer alone
                    outcome.append(exc)
                    continue
                if isinstance(decision, Run):
                    outcome.append(decision)
                    continue
                outcome.append(batch.add(decision))
            if not batch.new:
                return
            sql = SaSql(conn)
            if await self.fenced(sql, batch.new, ()):
                raise RunFencedError("this server's lease is gone")
            await self._store.write(sql, batch.new, batch.events, batch.updated)
            await self.notify(sql, holder, commit_notice(batch.new, batch.events, batch.updated))

        await self._store.transaction(work, retry=False)  # `decide` takes seqs: once only
        return outcome

    async def _facts(self, conn: AsyncConnection, ask: StartAsk, batch: _Batch) -> StartFacts:
        owner = ask.owner
        same = batch.requests.get((owner, ask.request_id)) if ask.request_id else None
        if ask.request_id and same is None:
            result = await conn.exec_driver_sql(
                "SELECT run_id FROM runs WHERE owner = $1 AND request_id = $2",
                (owner, ask.request_id),
            )
            row = result.first()
            if row is not None:
                same = (await self._store.runs_reached(conn, [row[0]]))[0]
        thread: list[Run] = []
        if ask.thread_id:
            key = (owner, ask.thread_id)
            if key not in batch.threads:
                result = await conn.exec_driver_sql(
                    "SELECT run_id FROM runs WHERE owner = $1 AND thread_id = $2 AND state IN "
                    + _ACTIVE
                    + " ORDER BY run_id",
                    (owner, ask.thread_id),
                )
                ids = [row[0] for row in _rows(result)]
                batch.threads[key] = await self._store.runs_reached(conn, ids) if ids else []
            thread = list(batch.threads[key])
        counts = batch.counts.get(owner, {})
        return StartFacts(
            same_request=same,
            thread_active=thread,
            active=counts.get(RunState.RUNNING.value, 0),
            queued=counts.get(RunState.PENDING.value, 0),
            all_active=batch.all_counts.get(RunState.RUNNING.value, 0),
            all_queued=batch.all_counts.get(RunState.PENDING.value, 0),
        )

    # -- notifications ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def listening(
        self, on_notice: Callable[[str], None], on_lost: Callable[[], None]
    ) -> AsyncIterator[None]:
        """LISTENs on CHANNEL on a connection of its own while inside: `on_notice` gets
        each payload, `on_lost` is called if the connection ends."""
        conn = await self._engine.connect()
        try:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None

            def received(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
                on_notice(payload)

            def terminated(_conn: Any) -> None:
                on_lost()

            raw.add_termination_listener(terminated)
            await raw.add_listener(CHANNEL, received)
            yield
        finally:
            with contextlib.suppress(Exception):
                await conn.invalidate()  # never back to the pool: it was LISTENing
            with contextlib.suppress(Exception):
                await conn.close()


async def _counts(
    conn: AsyncConnection, where: str, values: tuple[Any, ...], *, by_owner: bool = False
) -> Any:
    """Active runs by state ({state: n}), or by owner and state ({owner: {state: n}})."""
    if not by_owner:
        result = await conn.exec_driver_sql(
            f"SELECT state, COUNT(*) FROM runs WHERE {where}state IN {_ACTIVE}{_AGENTS}"
            " GROUP BY state",
            values,
        )
        return {row[0]: int(row[1]) for row in _rows(result)}
    result = await conn.exec_driver_sql(
        f"SELECT owner, state, COUNT(*) FROM runs WHERE {where}state IN {_ACTIVE}{_AGENTS}"
        " GROUP BY owner, state",
        values,
    )
    counts: dict[str, dict[str, int]] = {}
    for owner, state, n in _rows(result):
        counts.setdefault(owner, {})[state] = int(n)
    return counts


class _Batch:
    """The start decisions of one transaction so far, as later decisions must see them."""

    def __init__(self, counts: dict[str, dict[str, int]], all_counts: dict[str, int]) -> None:
        self.counts = counts
        self.all_counts = all_counts
        self.threads: dict[tuple[str, str], list[Run]] = {}
        self.requests: dict[tuple[str, str], Run] = {}
        self.new: list[Run] = []
        self.events: list[RunEvent] = []
        self.updated: list[Run] = []

    def add(self, write: StartWrite) -> Run:
        """Counts a run to write; returns it as written."""
        run = write.updated or write.new
        self.new.append(write.new)
        self.events.extend(write.events)
        if write.updated is not None:
            self.updated.append(write.updated)
        state = run.state.value
        owner = self.counts.setdefault(run.owner, {})
        owner[state] = owner.get(state, 0) + 1
        self.all_counts[state] = self.all_counts.get(state, 0) + 1
        if run.thread_id:
            self.threads.setdefault((run.owner, run.thread_id), []).append(run)
        if run.request_id:
            self.requests[(run.owner, run.request_id)] = run
        return run


def _rows(result: Any) -> list[Any]:
    """A driver result's rows, as plain tuples to index."""
    return [tuple(row) for row in result.fetchall()]
