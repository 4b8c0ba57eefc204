"""RunManager: the use cases behind every RPC (start, get, list, stop, subscribe, delete, watch).

It owns every live run and every background task: no task is created in an RPC handler's
scope, so a run outlives the call that started it. Runs are read from memory while live
and from the store afterwards, transparently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from uuid6 import uuid7

from runservice.domain.errors import (
    AdminOnlyError,
    RunActiveError,
    RunNotFoundError,
    SeqOutOfRangeError,
    ServerDrainingError,
)
from runservice.domain.model import (
    STATE_EVENT,
    AgentInfo,
    Principal,
    Run,
    RunChange,
    RunEvent,
    RunFailure,
    RunFilter,
    RunState,
    Scope,
    StartRequest,
    WatchUpdate,
)
from runservice.domain.ports import Clock, RunStore
from runservice.runtime.agent import AgentRegistry
from runservice.runtime.feed import ChangeFeed
from runservice.runtime.lifecycle import LiveRun, drive_run
from runservice.runtime.runlog import WINDOW_BYTES, WINDOW_EVENTS, RunLog
from runservice.runtime.writer import MAX_BATCH_EVENTS, MAX_PENDING_EVENTS, Writer

logger = logging.getLogger(__name__)

REPLAY_PAGE = 1000
SNAPSHOT_LIMIT = 1000


@dataclass(frozen=True)
class RuntimeSettings:
    """The runtime's tunables (the server's flags set them)."""

    stop_grace: float = 5.0
    drain_timeout: float = 30.0
    memory_grace: float = 300.0
    sweep_interval: float = 1.0
    batch_max_events: int = 500
    batch_max_bytes: int = 1024 * 1024
    window_events: int = WINDOW_EVENTS
    window_bytes: int = WINDOW_BYTES
    writer_max_batch: int = MAX_BATCH_EVENTS
    writer_max_pending: int = MAX_PENDING_EVENTS


class RunManager:
    """The facade the API layer calls; every method takes the caller's principal."""

    def __init__(
        self,
        store: RunStore,
        agents: AgentRegistry,
        clock: Clock,
        settings: RuntimeSettings | None = None,
    ) -> None:
        self._store = store
        self._agents = agents
        self._clock = clock
        self._settings = settings or RuntimeSettings()
        self._live: dict[str, LiveRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._feed = ChangeFeed()
        self._writer = Writer(
            store,
            self._on_run_committed,
            max_batch_events=self._settings.writer_max_batch,
            max_pending_events=self._settings.writer_max_pending,
        )
        self._draining = False
        self._closed = asyncio.Event()

    # -- lifecycle of the manager -------------------------------------------------------

    async def start(self) -> None:
        """Reconciles runs orphaned by a previous process, then starts the background tasks."""
        await self._reconcile_orphans()
        self._writer.start()
        self._spawn(self._sweep_loop(), name="runservice-sweeper")

    @property
    def draining(self) -> bool:
        """True once shutdown has begun."""
        return self._draining

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stops taking runs, lets running ones finish for `drain_timeout`, interrupts the rest.

        Every run ends in a persisted terminal state; the writer is flushed last.
        """
        if self._draining:
            await self._closed.wait()
            return
        self._draining = True
        timeout = self._settings.drain_timeout if drain_timeout is None else drain_timeout
        await self._drain(timeout)
        self._feed.close()
        await self._writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._closed.set()

    async def _drain(self, limit: float) -> None:
        live = [r for r in self._live.values() if not r.ended.is_set()]
        if not live:
            return
        logger.info("draining %d active runs for up to %.1fs", len(live), limit)
        waits = [asyncio.ensure_future(r.ended.wait()) for r in live]
        _, pending = await asyncio.wait(waits, timeout=limit)
        for waiter in pending:
            waiter.cancel()
        for run in live:
            run.request_end(RunState.INTERRUPTED, "server shutdown")
        grace = self._settings.stop_grace + 1.0
        tasks = [r.task for r in live if r.task is not None and not r.task.done()]
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=grace)
            for task in stuck:  # the supervisor itself is stuck: cancel it, it records INTERRUPTED
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=grace)

    async def _reconcile_orphans(self) -> None:
        orphans = await self._store.unfinished_runs()
        if not orphans:
            return
        now = self._clock.now()
        failure = RunFailure(
            "UNAVAILABLE", "interrupted: the server stopped while the run was active"
        )
        events, updated = [], []
        for run in orphans:
            events.append(
                RunEvent(
                    run_id=run.run_id,
                    seq=run.last_seq + 1,
                    at=now,
                    type=STATE_EVENT,
                    state=RunState.INTERRUPTED,
                    error=failure,
                )
            )
            updated.append(
                run.replace(
                    state=RunState.INTERRUPTED,
                    error=failure,
                    ended_at=now,
                    stop_reason="server restarted",
                )
            )
        await self._store.commit([], events, updated)
        logger.warning("marked %d runs orphaned by the previous process INTERRUPTED", len(orphans))

    # -- use cases ----------------------------------------------------------------------

    async def start_run(self, principal: Principal, request: StartRequest) -> Run:
        """Creates a run, commits its row, and starts it; returns it PENDING."""
        if self._draining:
            raise ServerDrainingError()
        agent = self._agents.get(request.agent)
        run = Run(
            run_id=str(uuid7()),
            owner=principal.user,
            agent=request.agent,
            state=RunState.PENDING,
            created_at=self._clock.now(),
            input=dict(request.input),
            thread_id=request.thread_id,
            labels=dict(request.labels),
            request_id=request.request_id,
            multitask_strategy=request.multitask_strategy,
            timeout=request.timeout,
        )
        log = RunLog(
            run.run_id,
            window_events=self._settings.window_events,
            window_bytes=self._settings.window_bytes,
        )
        live = LiveRun(run, log)
        self._live[run.run_id] = live
        try:
            await self._writer.commit_run(new=run)
        except BaseException:
            self._live.pop(run.run_id, None)
            raise
        live.task = self._spawn(
            drive_run(live, agent, self._writer, self._clock, grace=self._settings.stop_grace),
            name=f"run:{run.run_id}",
        )
        return run

    async def get_run(self, principal: Principal, run_id: str) -> Run:
        """The run, from memory while live, else from the store."""
        scope = principal.own_scope()
        live = self._live.get(run_id)
        if live is not None:
            if not scope.allows(live.run.owner):
                raise RunNotFoundError(run_id)
            return self._view(live)
        run = await self._store.get_run(scope, run_id)
        if run is None:
            raise RunNotFoundError(run_id)
        return run

    async def list_runs(
        self,
        principal: Principal,
        run_filter: RunFilter,
        *,
        all_users: bool,
        before_run_id: str | None,
        limit: int,
    ) -> list[Run]:
        """A page of runs newest first; live runs carry their current log position."""
        scope = self._list_scope(principal, all_users, "listing all users' runs")
        runs = await self._store.list_runs(scope, run_filter, before_run_id, limit)
        return [self._view(self._live[r.run_id]) if r.run_id in self._live else r for r in runs]

    async def stop_run(self, principal: Principal, run_id: str, reason: str) -> Run:
        """Stops the run and returns it once terminal; a finished run is returned unchanged."""
        run = await self.get_run(principal, run_id)
        live = self._live.get(run_id)
        if live is None or run.state.terminal:
            return run
        live.request_end(RunState.STOPPED, reason or f"stopped by {principal.user}")
        await live.ended.wait()
        return self._view(live)

    async def delete_run(self, principal: Principal, run_id: str) -> None:
        """Deletes a finished run and its log."""
        run = await self.get_run(principal, run_id)
        if not run.state.terminal:
            raise RunActiveError(run_id, "deleting it")
        live = self._live.pop(run_id, None)
        if not await self._store.delete_run(principal.own_scope(), run_id):
            raise RunNotFoundError(run_id)
        if live is not None:
            live.log.finished = True
        self._feed.publish(WatchUpdate(RunChange.DELETED, run))

    def list_agents(self) -> list[AgentInfo]:
        """The agents this server can run."""
        return self._agents.infos()

    async def subscribe(
        self, principal: Principal, run_id: str, from_seq: int
    ) -> AsyncIterator[list[RunEvent]]:
        """Batches of the run's events with `seq >= from_seq`, ending after the terminal event.

        Raises RunNotFoundError or SeqOutOfRangeError before yielding anything.
        """
        run = await self.get_run(principal, run_id)
        cursor = max(from_seq, 1)
        if cursor > run.last_seq + 1:
            raise SeqOutOfRangeError(run_id, from_seq, run.last_seq)
        return self._follow(run_id, cursor)

    async def _follow(self, run_id: str, cursor: int) -> AsyncIterator[list[RunEvent]]:
        live = self._live.get(run_id)
        if live is not None:
            live.subscribers += 1
        try:
            while True:
                batch = await self._next_batch(run_id, live, cursor)
                if batch is None:
                    return
                yield batch
                cursor = batch[-1].seq + 1
                if batch[-1].terminal:
                    return
        finally:
            if live is not None:
                live.subscribers -= 1
                live.idle_since = self._clock.now()

    async def _next_batch(
        self, run_id: str, live: LiveRun | None, cursor: int
    ) -> list[RunEvent] | None:
        s = self._settings
        while True:
            if live is not None:
                window = live.log.read(cursor, s.batch_max_events, s.batch_max_bytes)
                if window:
                    return window
                if window == [] and live.log.finished:
                    return None
                if window == []:
                    await live.log.wait_beyond(cursor - 1)
                    continue
            events = await self._store.read_events(run_id, cursor, REPLAY_PAGE)
            if events:
                return _bounded(events, s.batch_max_events, s.batch_max_bytes)
            if live is None:
                return None  # finished and evicted: the store holds the whole log

    async def watch(
        self, principal: Principal, run_filter: RunFilter, *, all_users: bool
    ) -> AsyncIterator[WatchUpdate]:
        """A snapshot of matching runs, a SNAPSHOT_END marker, then every change."""
        scope = self._list_scope(principal, all_users, "watching all users' runs")
        if self._draining:
            raise ServerDrainingError()
        watcher = self._feed.open(scope, run_filter)
        try:
            snapshot_filter = run_filter
            if not run_filter.states:
                snapshot_filter = RunFilter(
                    frozenset({RunState.PENDING, RunState.RUNNING}),
                    run_filter.agent,
                    run_filter.thread_id,
                    run_filter.labels,
                )
            runs = await self._store.list_runs(scope, snapshot_filter, None, SNAPSHOT_LIMIT)
        except BaseException:
            self._feed.discard(watcher)
            raise
        return self._watch_stream(watcher, runs)

    async def _watch_stream(self, watcher: Any, runs: list[Run]) -> AsyncIterator[WatchUpdate]:
        for run in runs:
            watcher.seen.add(run.run_id)
            live = self._live.get(run.run_id)
            yield WatchUpdate(RunChange.EXISTING, self._view(live) if live else run)
        yield WatchUpdate(RunChange.SNAPSHOT_END, None)
        async for update in self._feed.follow(watcher):
            yield update

    # -- internals ----------------------------------------------------------------------

    def _list_scope(self, principal: Principal, all_users: bool, what: str) -> Scope:
        if all_users and not principal.is_admin:
            raise AdminOnlyError(what)
        return principal.scope(all_users=all_users)

    def _view(self, live: LiveRun) -> Run:
        return live.run.replace(last_seq=live.log.committed_seq)

    def _on_run_committed(self, run: Run, created: bool) -> None:
        live = self._live.get(run.run_id)
        if live is not None:
            live.run = run
            if run.state.terminal:
                live.idle_since = run.ended_at
        change = RunChange.CREATED if created else RunChange.STATE_CHANGED
        view = self._view(live) if live is not None else run
        self._feed.publish(WatchUpdate(change, view))

    def _spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sweep_interval)
            self.sweep()

    def sweep(self) -> int:
        """Evicts finished runs idle for the memory grace period; returns how many left memory."""
        grace = timedelta(seconds=self._settings.memory_grace)
        now = self._clock.now()
        gone = [
            run_id
            for run_id, live in self._live.items()
            if live.ended.is_set()
            and live.subscribers == 0
            and live.idle_since is not None
            and now - live.idle_since >= grace
        ]
        for run_id in gone:
            del self._live[run_id]
        return len(gone)

    def in_memory(self, run_id: str) -> bool:
        """True while the run is held in memory (for tests and metrics)."""
        return run_id in self._live


def _bounded(events: list[RunEvent], max_events: int, max_bytes: int) -> list[RunEvent]:
    out: list[RunEvent] = []
    size = 0
    for event in events[:max_events]:
        size += event.size_hint()
        if out and size > max_bytes:
            break
        out.append(event)
    return out
