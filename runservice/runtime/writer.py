"""The group-commit writer: one task commits the pending work of every run in batches.

Agents enqueue events without waiting for disk; the writer takes everything pending (up to
a bound) and commits it in one transaction, then publishes it to the runs' logs. While a
commit is in flight new work accumulates, so batches grow with load and a quiet server
commits each event on its own. When too much is pending, `append` waits: backpressure
lands on the producing agent, not on memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from runservice.domain.errors import StoreError, StoreUnavailableError
from runservice.domain.model import Run, RunEvent
from runservice.domain.ports import EventEncoder, RunStore
from runservice.runtime.runlog import RunLog

logger = logging.getLogger(__name__)

MAX_BATCH_EVENTS = 2000
MAX_PENDING_EVENTS = 20000
RETRY_BACKOFF_MAX_S = 5.0
RETRY_ATTEMPTS = 8  # about 11 s of backoff before a batch is given up


@dataclass
class _Batch:
    new_runs: list[Run] = field(default_factory=list)
    events: list[tuple[RunLog, RunEvent]] = field(default_factory=list)
    # Each with the seq of the lifecycle event it was queued with (0: none), which it must
    # be committed with.
    updated_runs: list[tuple[Run, int]] = field(default_factory=list)
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
        reached = {event.run_id: event.seq for _, event in first.events}
        waiting = {event.run_id for _, event in rest.events}

        def rides(run_id: str | None, seq: int) -> bool:
            if seq:
                return seq <= reached.get(run_id or "", 0)
            return run_id is not None and run_id not in waiting

        first.new_runs = self.new_runs  # a run's events are queued after its row
        for update in self.updated_runs:
            (first if rides(update[0].run_id, update[1]) else rest).updated_runs.append(update)
        for waiter in self.waiters:
            (first if rides(waiter[0], waiter[1]) else rest).waiters.append(waiter)
        return first, rest

    def __bool__(self) -> bool:
        return bool(self.new_runs or self.events or self.updated_runs or self.waiters)


RunCommitted = Callable[[Run, bool], None]
"""Called after a run row is committed: (run, created)."""


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
    ) -> None:
        self._store = store
        self._encoder = encoder
        self._on_run_committed = on_run_committed
        self._max_batch = max_batch_events
        self._max_pending = max_pending_events
        self._pending = _Batch()
        self._wake = asyncio.Event()
        # Appenders waiting for room, served first come first served: an agent that
        # emits without pause cannot take every freed place from the others.
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def encode(self, event: RunEvent) -> bytes:
        """The event's wire form."""
        return self._encoder(event)

    def _encode_once(self, event: RunEvent) -> None:
        """Gives `event` its wire form if it has none yet."""
        if event.wire is None:
            event.wire = self._encoder(event)

    def start(self) -> None:
        """Starts the writer task."""
        self._task = asyncio.create_task(self._loop(), name="runservice-writer")

    async def append(self, log: RunLog, event: RunEvent) -> None:
        """Queues an event; waits (in line with any others waiting) while the writer is
        too far behind.

        Raises StoreError once the run's log has failed to commit.
        """
        if log.broken is not None:
            raise StoreError("this run's log could not be stored")
        while self._waiting and self._waiting[0].done():  # turns given up (cancelled)
            self._waiting.popleft()
        if self._waiting or len(self._pending.events) >= self._max_pending:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            await turn  # a cancelled turn is skipped by _let_in
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

        The future fails with StoreError if the store refuses the work for good.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        run_id = next((r.run_id for r in (new, updated) if r is not None), None)
        seq = 0
        if event is not None:
            run_id, seq = event[1].run_id, event[1].seq
            if event[0].broken is not None:
                waiter.set_exception(StoreError("this run's log could not be stored"))
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

    async def close(self) -> None:
        """Commits what is pending, then stops the writer task."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                # One pass of the loop first, so that whatever else is ready (agents,
                # calls) adds its work to this batch rather than to a commit of its own.
                await asyncio.sleep(0)
                batch = self._take()
                await self._commit(batch)
            if self._closing:
                return

    def _take(self) -> _Batch:
        pending = self._pending
        if len(pending.events) <= self._max_batch:
            self._pending = _Batch()
            return pending
        batch, self._pending = pending.split_at(self._max_batch)
        return batch

    async def _commit(self, batch: _Batch) -> None:
        failure = await self._try_commit(batch)
        if isinstance(failure, StoreError) and not isinstance(failure, StoreUnavailableError):
            parts = batch.split_by_run()
            if len(parts) > 1:  # find the run whose data the store refuses; commit the rest
                for part in parts:
                    await self._commit(part)
                return
        if failure is None:
            self._publish(batch)
        else:
            self._fail(batch, failure)
        self._let_in()

    def _let_in(self) -> None:
        """Gives the room now free to the appenders waiting longest."""
        room = self._max_pending - len(self._pending.events)
        while room > 0 and self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                room -= 1

    async def _try_commit(self, batch: _Batch) -> StoreError | None:
        events = [event for _, event in batch.events]
        updated = [run for run, _ in batch.updated_runs]
        delay = 0.05
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                await self._store.commit(batch.new_runs, events, updated)
                return None
            except StoreUnavailableError as exc:
                if attempt == RETRY_ATTEMPTS:
                    return exc
                logger.warning(
                    "commit of %d events failed (attempt %d); retrying",
                    len(events),
                    attempt,
                    exc_info=True,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_BACKOFF_MAX_S)
            except StoreError as exc:
                return exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _fail(self, batch: _Batch, exc: StoreError) -> None:
        """Gives up on a batch: its runs' logs are broken, their waiters fail."""
        run_ids = sorted(
            {e.run_id for _, e in batch.events}
            | {r.run_id for r in batch.new_runs}
            | {r.run_id for r, _ in batch.updated_runs}
        )
        logger.error(
            "the store refused a commit for runs %s; they are abandoned",
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
