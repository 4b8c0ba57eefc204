"""Peers: the other replicas of the deployment, as this replica's runtime meets them.

The Replica (runtime/cluster.py) holds the lease and the notification connection; Peers
turns what it hears into effects on this process's runs and watchers: other replicas'
run changes published to the watchers here, their stop requests applied to the runs
executed here, runs fenced here dropped, and the logs of runs they execute followed
(the RemoteRuns a Subscription reads through).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator

from runservice.domain.errors import RunFencedError, StoreError
from runservice.domain.model import (
    Checkpoint,
    Run,
    RunChange,
    RunEvent,
    RunState,
    Scope,
    Snapshot,
    WatchUpdate,
)
from runservice.domain.ports import Clock, RunMetrics, RunStore
from runservice.domain.replicas import INPUT_REQUEST, Notice, deleted_run
from runservice.runtime.cluster import ClusterStore, RemoteLog, RemoteRun, Replica
from runservice.runtime.feed import ChangeFeed
from runservice.runtime.lifecycle import (
    LEASE_FAILURE,
    LEASE_LOST,
    NO_RESUMES,
    LiveRun,
    Predecessor,
    Resumes,
    orphan_fate,
)
from runservice.runtime.registry import Registry

logger = logging.getLogger(__name__)

EVERYONE = Scope("", everyone=True)


class Peers:
    """This replica's side of the others (RemoteRuns, for subscriptions, among it)."""

    def __init__(
        self,
        sql: ClusterStore,
        name: str,
        lease_ttl: float,
        *,
        store: RunStore,
        registry: Registry,
        feed: ChangeFeed,
        clock: Clock,
        metrics: RunMetrics | None = None,
        resumes: Resumes = NO_RESUMES,
    ) -> None:
        self._store = store
        self._resumes = resumes
        # Called with each run this replica took over to resume (set by the manager).
        self.on_resumed: Callable[[Run], None] | None = None
        self._registry = registry
        self._feed = feed
        self._clock = clock
        self._notices: asyncio.Queue[Notice] = asyncio.Queue()
        # Called for a run executed here that has inputs waiting (set by the manager).
        self.on_inputs: Callable[[LiveRun], None] | None = None
        self.replica = Replica(
            sql,
            name,
            lease_ttl,
            end_orphan=self._orphan_fate,
            on_notice=self._queue_notice,
            on_requests=self._apply_requests,
            on_fenced=self._lease_lost,
            on_swept=self._swept,
            on_deaf=feed.lag_all,  # what other replicas changed meanwhile is unknown
            metrics=metrics,
        )

    @property
    def holder(self) -> str:
        """The lease this replica executes its runs under now."""
        return self.replica.holder

    async def start(self) -> None:
        """Takes the lease (ending the runs no lease covers) and starts following peers."""
        await self.replica.start()
        self._registry.spawn(self._notice_loop(), name="runservice-notices")

    async def close(self) -> None:
        """Gives the lease up."""
        await self.replica.close()

    # -- RemoteRuns ---------------------------------------------------------------------

    @contextlib.contextmanager
    def follow(self, run_id: str) -> Iterator[RemoteLog]:
        """The run's log as heard of from the replica that executes it."""
        with self.replica.follow(run_id) as heard:
            yield heard

    async def finished(self, run_id: str) -> bool:
        """True once the run's row is terminal (or gone)."""
        run = await self._store.get_run(EVERYONE, run_id)
        return run is None or run.state.terminal

    async def reached(self, runs: list[Run]) -> list[Run]:
        """`runs` from the store, those still active with the last seq their logs reached
        (a row's is as of its last state change, and another replica may be writing)."""
        active = [run.run_id for run in runs if not run.state.terminal]
        if not active:
            return runs
        reached = await self.replica.sql.reached(active)
        return [run.replace(last_seq=max(run.last_seq, reached.get(run.run_id, 0))) for run in runs]

    async def request_stop(self, run_id: str, reason: str, by: str = "") -> None:
        """Asks the run's executor, wherever it is, to stop it."""
        body = json.dumps({"reason": reason, "by": by}) if by else reason
        await self.replica.request_stop(run_id, body, self._now_us())

    async def request_inputs(self, run_id: str) -> None:
        """Tells the run's executor, wherever it is, that inputs wait for it."""
        await self.replica.wake_executor(run_id)

    async def wait_end(self, run_id: str, get: Callable[[], Awaitable[Run]]) -> Run:
        """The run (as `get` reads it) once it is terminal, as another replica ends it."""
        with self.follow(run_id) as heard:
            while True:
                run = await get()
                if run.state.terminal:
                    return run
                await heard.wait_beyond(max(run.last_seq, heard.committed_seq))

    def predecessor(self, run: Run, admitting: dict[str, LiveRun]) -> Predecessor:
        """The thread's active run `run`: the live run here (or being admitted here), or a
        run another replica executes."""
        live = self._registry.get(run.run_id) or admitting.get(run.run_id)
        if live is not None:
            return live
        return RemoteRun(
            run.run_id,
            self.replica,
            self.finished,
            lambda coro, name: self._registry.spawn(coro, name=name),
            self._now_us,
        )

    def _now_us(self) -> int:
        return int(self._clock.now().timestamp() * 1_000_000)

    # -- what the Replica hears -----------------------------------------------------------

    def _queue_notice(self, notice: Notice) -> None:
        if self._feed.watched or notice.deleted:
            self._notices.put_nowait(notice)

    async def _notice_loop(self) -> None:
        """Publishes other replicas' run changes to this replica's watchers, in order."""
        while True:
            notice = await self._notices.get()
            try:
                await self._publish(notice)
            except StoreError as exc:
                logger.warning("could not read runs another replica changed (%s)", exc)

    async def _publish(self, notice: Notice) -> None:
        for run_id, told in notice.deleted.items():
            self._registry.evict(run_id)
            self._feed.publish_deleted(deleted_run(run_id, told))
        if not self._feed.watched or not (notice.new or notice.changed or notice.updated):
            return
        for run_id in (*notice.new, *notice.changed, *notice.updated):
            found = await self._store.get_run(EVERYONE, run_id)
            if found is None:
                continue
            run = (await self.reached([found]))[0]
            if run_id in notice.new:  # as on its own replica: CREATED, then the change
                queued = run.replace(state=RunState.PENDING, started_at=None)
                self._feed.publish(WatchUpdate(RunChange.CREATED, queued))
                if run.state is RunState.PENDING:
                    continue
            updated = run_id in notice.updated and run_id not in notice.changed
            change = RunChange.UPDATED if updated else RunChange.STATE_CHANGED
            self._feed.publish(WatchUpdate(change, run))

    def _apply_requests(self, requests: list[tuple[str, str, str]]) -> None:
        """Requests other replicas recorded for runs executed here: stops, and inputs
        waiting to be appended."""
        for run_id, kind, body in requests:
            live = self._registry.get(run_id)
            if live is None:
                continue
            if kind == INPUT_REQUEST:
                if self.on_inputs is not None:
                    self.on_inputs(live)
                continue
            reason, by = _stop_body(body)
            live.request_end(RunState.STOPPED, reason, by)

    def runs_fenced(self, run_ids: frozenset[str]) -> None:
        """The database refused runs' writes: another replica ended them. They leave."""
        for run_id in run_ids:
            live = self._registry.get(run_id)
            if live is not None:
                _drop_fenced(live)

    def _lease_lost(self, holder: str) -> None:
        """This server's lease `holder` was ended by a peer: every run under it leaves."""
        for live in self._registry:
            if live.run.executor == holder:
                _drop_fenced(live)

    def _orphan_fate(
        self, run: Run, checkpoint: Checkpoint | None
    ) -> tuple[RunEvent, Run, Snapshot | None]:
        """A run no lease covers: resumed here from its checkpoint when its agent is here
        and resumable (and resumes are left), else interrupted."""
        return orphan_fate(
            run,
            checkpoint if self._resumes.allowed(run) else None,
            self._clock,
            self._resumes,
            reason=LEASE_LOST,
            failure=LEASE_FAILURE,
            executor=self.replica.holder,
        )

    def _swept(self, runs: list[Run]) -> None:
        """This replica ended (or took over) runs no lease covered: its own watchers hear
        of it here, and the runs it took over resume here."""
        if self._feed.watched:
            for run in runs:
                self._feed.publish(WatchUpdate(RunChange.STATE_CHANGED, run))
        for run in runs:
            if not run.state.terminal and self.on_resumed is not None:
                self.on_resumed(run)


def _stop_body(body: str) -> tuple[str, str]:
    """A stop request's (reason, by): JSON {"reason", "by"}, or the reason alone."""
    if body.startswith("{"):
        try:
            parsed = json.loads(body)
            return str(parsed["reason"]), str(parsed.get("by", ""))
        except (ValueError, KeyError, TypeError):
            pass
    return body, ""


def _drop_fenced(live: LiveRun) -> None:
    if not live.log.fenced:
        live.log.fence(RunFencedError("this server's lease on the run is gone"))
    live.request_end(RunState.INTERRUPTED, "this server lost its lease")
