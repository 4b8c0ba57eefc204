"""The group-commit writer: one task commits the pending work of every run in batches.

Agents enqueue events without waiting for disk; the writer takes everything pending (up to
a bound) and commits it in one transaction, then publishes it to the runs' logs. While a
commit is in flight new work accumulates, so batches grow with load and a quiet server
commits each event on its own. When too much is pending, `append` waits: backpressure
lands on the producing agent, not on memory.

A store that cannot take writes (locked, disk full, unreachable) is retried for as long as
it lasts, so every log stays a gap-free prefix of what its run emitted and the outage
ends with nothing lost. Once it has lasted `unhealthy_after` (five times that for a lock
another process holds, which it lets go on its own), the writer reports the store
unhealthy (the server stops taking new runs) and withdraws the rows of runs not yet
committed, so their callers hear "unavailable" rather than wait. While idle it probes the
store with a small write now and then (every second while it is failing), so an outage
is noticed, and its end too, without waiting for work. A store that refuses one run's data for
good gives up that run alone: its uncommitted events are dropped and the run can still end
with its terminal event at the next seq, so its log never has a hole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from runservice.domain.errors import (
    DatabaseUnavailableError,
    RunFencedError,
    StoreError,
    StoreUnavailableError,
)
from runservice.domain.model import Beside, Run, RunEvent
from runservice.domain.ports import EventEncoder, NoMetrics, RunMetrics, RunStore
from runservice.runtime.runlog import RunLog

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 2000
MAX_PENDING_EVENTS = 20000
RETRY_BACKOFF_MIN_S = 0.02
RETRY_BACKOFF_MAX_S = 1.0
UNHEALTHY_AFTER_S = 1.0
LOCK_PATIENCE = 5  # times UNHEALTHY_AFTER_S: another writer's lock is waited out longer
PROBE_INTERVAL_S = 1.0
IDLE_PROBE_S = 5.0


@dataclass
class _Batch:
    new_runs: list[Run] = field(default_factory=list)
    events: list[tuple[RunLog, RunEvent]] = field(default_factory=list)
    # Each with the seq of the lifecycle event it was queued with (0: none), which it must
    # be committed with.
    updated_runs: list[tuple[Run, int]] = field(default_factory=list)
    # What is stored beside the logs, each with the seq of the last event it follows.
    beside: list[tuple[Beside, int]] = field(default_factory=list)
    # (run_id, seq as above, future resolved once that work is committed)
    waiters: list[tuple[str | None, int, asyncio.Future[None]]] = field(default_factory=list)

    def split_by_run(self) -> list[_Batch]:
        """One batch per run, so that one run's bad data cannot sink another's."""
        parts: dict[str | None, _Batch] = {}
        for run in self.new_runs:
            parts.setdefault(run.run_id, _Batch()).new_runs.append(run)
        for log, event in self.events:
            parts.setdefault(event.run_id, _Batch()).events.append((log, event))
        for update in self.updated_runs:
            parts.setdefault(update[0].run_id, _Batch()).updated_runs.append(update)
        for record in self.beside:
            parts.setdefault(record[0].run_id, _Batch()).beside.append(record)
        for waiter in self.waiters:
            parts.setdefault(waiter[0], _Batch()).waiters.append(waiter)
        return list(parts.values())

    def split_at(self, size: int) -> tuple[_Batch, _Batch]:
        """The first `size` events with the work that rides along, and the rest.

        A run update or waiter rides along with the lifecycle event it was queued with;
        one without an event (a new run row) rides with the first slice unless its run
        still has events in the rest. So a run emitting without pause cannot hold back
        another run's row: every slice carries the rows that are ready.
        """
        first, rest = _Batch(events=self.events[:size]), _Batch(events=self.events[size:])
        waiting: dict[str, int] = {}  # each run's first seq left in the rest
        for _, event in reversed(rest.events):
            waiting[event.run_id] = event.seq

        def rides(run_id: str | None, seq: int) -> bool:
            if seq:  # its event is in this slice, or was committed before
                return run_id is None or seq < waiting.get(run_id, seq + 1)
            return run_id is not None and run_id not in waiting

        first.new_runs = self.new_runs  # a run's events are queued after its row
        for update in self.updated_runs:
            (first if rides(update[0].run_id, update[1]) else rest).updated_runs.append(update)
        for record in self.beside:
            (first if rides(record[0].run_id, record[1]) else rest).beside.append(record)
        for waiter in self.waiters:
            (first if rides(waiter[0], waiter[1]) else rest).waiters.append(waiter)
        return first, rest

    def merge(self, other: _Batch) -> None:
        """Appends `other`'s work to this batch."""
        self.new_runs.extend(other.new_runs)
        self.events.extend(other.events)
        self.updated_runs.extend(other.updated_runs)
        self.beside.extend(other.beside)
        self.waiters.extend(other.waiters)

    def take_runs(self, run_ids: set[str]) -> _Batch:
        """Removes and returns the work of `run_ids`."""
        taken, kept = _Batch(), _Batch()
        for part in self.split_by_run():
            part_ids = part.run_ids()
            (taken if part_ids and set(part_ids) <= run_ids else kept).merge(part)
        self.new_runs, self.events = kept.new_runs, kept.events
        self.updated_runs, self.waiters = kept.updated_runs, kept.waiters
        self.beside = kept.beside
        return taken

    def run_ids(self) -> list[str]:
        """The runs this batch has work of, sorted."""
        return sorted(
            {e.run_id for _, e in self.events}
            | {r.run_id for r in self.new_runs}
            | {r.run_id for r, _ in self.updated_runs}
            | {b.run_id for b, _ in self.beside}
            | {w[0] for w in self.waiters if w[0] is not None}
        )

    def __bool__(self) -> bool:
        return bool(
            self.new_runs or self.events or self.updated_runs or self.beside or self.waiters
        )


RunCommitted = Callable[[Run, bool], None]
"""Called after a run row is committed: (run, created)."""

RunsFenced = Callable[[frozenset[str]], None]
"""Called with the runs a commit left out because this server's lease on them is gone."""

HealthChanged = Callable[[str | None], None]
"""Called when the store stops taking writes (with the cause) and when it takes them again
(with None)."""


class Writer:
    """Commits runs and events in batches; publishes only what is committed."""

    def __init__(
        self,
        store: RunStore,
        on_run_committed: RunCommitted,
        encoder: EventEncoder,
        *,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_pending_events: int = MAX_PENDING_EVENTS,
        unhealthy_after: float = UNHEALTHY_AFTER_S,
        idle_probe: float = IDLE_PROBE_S,
        on_fenced: RunsFenced | None = None,
        metrics: RunMetrics | None = None,
    ) -> None:
        self._store = store
        self._on_fenced = on_fenced
        self._metrics = metrics or NoMetrics()
        self.commits = 0  # transactions committed since start
        self.events_committed = 0  # events in them
        self._encoder = encoder
        self._on_run_committed = on_run_committed
        self._max_batch = max_batch_events
        self._max_pending = max_pending_events
        self._unhealthy_after = unhealthy_after
        self._idle_probe = idle_probe
        self._pending = _Batch()
        self._wake = asyncio.Event()
        # Appenders waiting for room, served first come first served: an agent that
        # emits without pause cannot take every freed place from the others.
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._in_flight = _Batch()  # the batch being committed (or retried), if any
        self._closing = False
        self._failing_since: float | None = None
        self._problem: str | None = None
        self._health_listeners: list[HealthChanged] = []

    @property
    def problem(self) -> str | None:
        """Why the store takes no writes now (it has failed for a while), or None."""
        return self._problem

    def on_health(self, listener: HealthChanged) -> None:
        """Calls `listener` whenever the store's health changes."""
        self._health_listeners.append(listener)

    def encode(self, event: RunEvent) -> bytes:
        """The event's wire form."""
        return self._encoder(event)

    def _encode_once(self, event: RunEvent) -> None:
        """Gives `event` its wire form if it has none yet."""
        if event.wire is None:
            event.wire = self._encoder(event)

    @property
    def pending_events(self) -> int:
        """Events queued or in the commit in flight."""
        return len(self._pending.events) + len(self._in_flight.events)

    def start(self) -> None:
        """Starts the writer task."""
        self._task = asyncio.create_task(self._loop(), name="runservice-writer")

    async def append(self, log: RunLog, event: RunEvent) -> None:
        """Queues an event; waits (in line with any others waiting) while the writer is
        too far behind.

        Raises StoreError once the run's log has been given up.
        """
        _check_open(log)
        while self._waiting and self._waiting[0].done():  # turns given up (cancelled)
            self._waiting.popleft()
        if self._waiting or len(self._pending.events) >= self._max_pending:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            await turn  # a cancelled turn is skipped by _let_in
            _check_open(log)  # given up while this event waited for room
        self._encode_once(event)  # agents' events come encoded (RunContext.emit)
        self._pending.events.append((log, event))
        self._wake.set()

    def commit_run(
        self,
        new: Run | None = None,
        event: tuple[RunLog, RunEvent] | None = None,
        updated: Run | None = None,
    ) -> asyncio.Future[None]:
        """Queues a run row (new or updated) with its lifecycle event; resolves on commit.

        The future fails with DatabaseUnavailableError if a new run's row was withdrawn
        while the store takes no writes, and with StoreError if the store refuses the
        work for good. A log that was given up takes only its terminal event.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run_id = next((r.run_id for r in (new, updated) if r is not None), None)
        seq = 0
        if event is not None:
            run_id, seq = event[1].run_id, event[1].seq
            broken = event[0].broken
            if broken is not None and (not event[1].terminal or isinstance(broken, RunFencedError)):
                waiter.set_exception(_closed_error(event[0]))
                return waiter
        if new is not None:
            self._pending.new_runs.append(new)
        if event is not None:
            self._encode_once(event[1])
            self._pending.events.append(event)
        if updated is not None:
            self._pending.updated_runs.append((updated, seq))
        self._pending.waiters.append((run_id, seq, waiter))
        self._wake.set()
        return waiter

    def put_beside(self, log: RunLog, record: Beside) -> asyncio.Future[None]:
        """Queues what is stored beside the run's log (an input's receipt, a snapshot, a
        checkpoint), to commit with the event at its seq (queued before it) or after;
        resolves on commit.

        The future fails with StoreError once the run's log has been given up."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if log.broken is not None:
            waiter.set_exception(_closed_error(log))
            return waiter
        seq = record.seq  # the last event it follows, queued before it
        self._pending.beside.append((record, seq))
        self._pending.waiters.append((log.run_id, seq, waiter))
        self._wake.set()
        return waiter

    async def close(self, limit: float | None = None) -> None:
        """Commits what is pending, then stops the writer task.

        With a `limit` (seconds), work the store has not taken by then is abandoned: it was never
        published, and the next start reconciles the runs it belonged to.
        """
        self._closing = True
        self._wake.set()
        task = self._task
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=limit)
        if task in done:
            return
        task.cancel()
        await asyncio.wait({task})
        abandoned, self._pending = self._pending, _Batch()
        abandoned.merge(self._in_flight)
        if abandoned:
            self._metrics.store_error("abandoned")
            self._fail(abandoned, StoreUnavailableError("shutting down", "not committed in time"))
        logger.warning("shutdown: the store did not take the last writes in time; abandoned")

    async def _loop(self) -> None:
        while True:
            await self._idle()
            while self._pending:
                # One pass of the loop first, so that whatever else is ready (agents,
                # calls) adds its work to this batch rather than to a commit of its own.
                await asyncio.sleep(0)
                batch = self._take()
                await self._commit(batch)
            if self._closing:
                return

    async def _idle(self) -> None:
        """Waits for work, probing the store meanwhile: every `idle_probe` seconds while
        it seems healthy (so readiness tells the truth on an idle server too), every
        PROBE_INTERVAL_S while it is failing."""
        while not self._closing:
            failing = self._failing_since is not None
            interval = PROBE_INTERVAL_S if failing else self._idle_probe
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
                break
            except TimeoutError:
                await self._probe()
        else:
            await self._wake.wait()
        self._wake.clear()

    async def _probe(self) -> None:
        try:
            await self._store.probe()
        except StoreUnavailableError as exc:
            self._unhealthy(exc)
        except StoreError as exc:
            logger.debug("store probe failed: %s", exc)
        else:
            self._healthy()

    def _take(self) -> _Batch:
        pending = self._pending
        if len(pending.events) <= self._max_batch:
            self._pending = _Batch()
            return pending
        batch, self._pending = pending.split_at(self._max_batch)
        return batch

    async def _commit(self, batch: _Batch) -> None:
        """Commits `batch`, retrying while the store is unavailable (see the module doc)."""
        delay = RETRY_BACKOFF_MIN_S
        self._in_flight = batch
        while batch:
            began = time.perf_counter()  # the loop's clock may be cached per iteration
            try:
                fenced = await self._store.commit(
                    batch.new_runs,
                    [event for _, event in batch.events],
                    [run for run, _ in batch.updated_runs],
                    [record for record, _ in batch.beside],
                )
            except StoreUnavailableError as exc:
                self._metrics.store_retry("locked" if exc.contended else "unavailable")
                self._unhealthy(exc)
                if self._problem is not None:
                    batch = self._withdraw_new_runs(batch, self._problem)
                    # Rows queued behind this batch would wait for the outage's end too.
                    if self._pending.new_runs:
                        self._pending = self._withdraw_new_runs(self._pending, self._problem)
                self._in_flight = batch
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
                continue
            except StoreError as exc:
                parts = batch.split_by_run()
                if len(parts) > 1:  # find the run whose data the store refuses; commit the rest
                    for part in parts:
                        await self._commit(part)
                else:
                    self._give_up(batch, exc)
                break
            took = time.perf_counter() - began
            self._healthy()
            if fenced:
                self._fence(batch.take_runs(set(fenced)), fenced)
            self._metrics.committed(len(batch.events), took)
            self._publish(batch)
            break
        self._in_flight = _Batch()
        self._let_in()

    def _unhealthy(self, exc: StoreUnavailableError) -> None:
        now = asyncio.get_running_loop().time()
        if self._failing_since is None:  # the first failure of a streak, with its traceback
            self._failing_since = now
            logger.warning("the store took no commit (%s); retrying", exc.cause, exc_info=exc)
        else:
            logger.debug("the store still takes no commit (%s); retrying", exc.cause)
        patience = self._unhealthy_after * (LOCK_PATIENCE if exc.contended else 1)
        if self._problem is None and now - self._failing_since >= patience:
            self._problem = exc.cause
            logger.error("the store takes no writes (%s): new runs are refused", exc.cause)
            self._notify(exc.cause)

    def _healthy(self) -> None:
        self._failing_since = None
        if self._problem is not None:
            self._problem = None
            logger.warning("the store takes writes again: new runs are accepted")
            self._notify(None)

    def _notify(self, problem: str | None) -> None:
        for listener in self._health_listeners:
            listener(problem)

    def _withdraw_new_runs(self, batch: _Batch, cause: str) -> _Batch:
        """The batch without the runs whose rows were never committed; their callers are
        told the store is unavailable (nothing of those runs was written)."""
        keep = _Batch()
        for part in batch.split_by_run():
            if not part.new_runs:
                keep.merge(part)
                continue
            logger.warning(
                "run %s withdrawn before it was stored: %s", part.new_runs[0].run_id, cause
            )
            for log, _ in part.events:
                log.fail(DatabaseUnavailableError(cause))
            for _, _, waiter in part.waiters:
                if not waiter.done():
                    waiter.set_exception(DatabaseUnavailableError(cause))
        return keep

    def _let_in(self) -> None:
        """Gives the room now free to the appenders waiting longest."""
        room = self._max_pending - len(self._pending.events)
        while room > 0 and self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                room -= 1

    def _give_up(self, batch: _Batch, exc: StoreError) -> None:
        """Gives up one run's work that the store refuses for good.

        Its log is rewound to what is committed, its later work still pending is dropped,
        and the run may end with a terminal event at the next seq (see RunLog.fail).
        """
        logs = {log for log, _ in batch.events}
        dropped = self._pending.take_runs({log.run_id for log in logs})
        self._metrics.store_error("refused")
        self._fail(batch, exc)
        self._fail(dropped, exc)

    def _fence(self, batch: _Batch, run_ids: frozenset[str]) -> None:
        """Drops the work of runs whose lease is gone (the database refused it: another
        replica ended them); new runs among them are withdrawn, never stored."""
        logger.error(
            "runs %s are no longer this server's (its lease on them is gone): their "
            "uncommitted work is dropped",
            ", ".join(sorted(run_ids)),
        )
        self._metrics.fenced(len(run_ids))
        dropped = self._pending.take_runs(set(run_ids))
        batch.merge(dropped)
        new = {run.run_id for run in batch.new_runs}
        exc = RunFencedError("this server's lease on the run is gone")
        for log, _ in batch.events:
            log.fence(exc)
        for run_id, _, waiter in batch.waiters:
            if waiter.done():
                continue
            if run_id in new:
                waiter.set_exception(DatabaseUnavailableError("this server lost its lease"))
            else:
                waiter.set_exception(exc)
        if self._on_fenced is not None:
            self._on_fenced(run_ids)

    def _fail(self, batch: _Batch, exc: StoreError) -> None:
        """Fails a batch: its runs' logs are given up, its waiters fail."""
        run_ids = batch.run_ids()
        if run_ids:
            logger.error(
                "the store refused a commit for runs %s; their uncommitted events are dropped",
                ", ".join(run_ids),
                exc_info=exc,
            )
        for log, _ in batch.events:
            log.fail(exc)
        for run_id, _, waiter in batch.waiters:
            if waiter.done():
                continue
            if run_id is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(StoreError("the run could not be stored"))

    def _publish(self, batch: _Batch) -> None:
        self.commits += 1
        self.events_committed += len(batch.events)
        for run in batch.new_runs:
            self._on_run_committed(run, True)
        by_log: dict[RunLog, list[RunEvent]] = {}
        for log, event in batch.events:
            events = by_log.get(log)
            if events is None:
                events = by_log[log] = []
            events.append(event)
        for log, events in by_log.items():
            log.publish(events)
        for run, _ in batch.updated_runs:
            self._on_run_committed(run, False)
        for _, _, waiter in batch.waiters:
            if not waiter.done():
                waiter.set_result(None)


def _check_open(log: RunLog) -> None:
    if log.broken is not None:
        raise _closed_error(log)


def _closed_error(log: RunLog) -> StoreError:
    """Why nothing more of the run may be written: its lease is gone (RunFencedError),
    or the store refused its log for good."""
    if log.fenced:
        return RunFencedError("this server's lease on the run is gone")
    return StoreError("this run's log could not be stored")
