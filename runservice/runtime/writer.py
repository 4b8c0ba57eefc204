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
    updated_runs: list[Run] = field(default_factory=list)
    # (run_id or None for a flush, future resolved once the work before it is committed)
    waiters: list[tuple[str | None, asyncio.Future[None]]] = field(default_factory=list)

    def split_by_run(self) -> list[_Batch]:
        """One batch per run, so that one run's bad data cannot sink another's."""
        parts: dict[str | None, _Batch] = {}
        for run in self.new_runs:
            parts.setdefault(run.run_id, _Batch()).new_runs.append(run)
        for log, event in self.events:
            parts.setdefault(event.run_id, _Batch()).events.append((log, event))
        for run in self.updated_runs:
            parts.setdefault(run.run_id, _Batch()).updated_runs.append(run)
        for run_id, waiter in self.waiters:
            parts.setdefault(run_id, _Batch()).waiters.append((run_id, waiter))
        return list(parts.values())

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
        *,
        max_batch_events: int = MAX_BATCH_EVENTS,
        max_pending_events: int = MAX_PENDING_EVENTS,
        encoder: EventEncoder | None = None,
    ) -> None:
        self._store = store
        self._encoder = encoder
        self._on_run_committed = on_run_committed
        self._max_batch = max_batch_events
        self._max_pending = max_pending_events
        self._pending = _Batch()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def encode(self, event: RunEvent) -> bytes | None:
        """The event's wire form, or None when the writer has no encoder."""
        return None if self._encoder is None else self._encoder(event)

    def _encode_once(self, event: RunEvent) -> None:
        """Gives `event` its wire form if it has none yet (and the writer has an encoder)."""
        if event.wire is None and self._encoder is not None:
            event.wire = self._encoder(event)

    def start(self) -> None:
        """Starts the writer task."""
        self._task = asyncio.create_task(self._loop(), name="runservice-writer")

    async def append(self, log: RunLog, event: RunEvent) -> None:
        """Queues an event; waits while the writer is too far behind.

        Raises StoreError once the run's log has failed to commit.
        """
        if log.broken is not None:
            raise StoreError("this run's log could not be stored")
        while len(self._pending.events) >= self._max_pending:
            self._space.clear()
            await self._space.wait()
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
        if event is not None:
            run_id = event[1].run_id
            if event[0].broken is not None:
                waiter.set_exception(StoreError("this run's log could not be stored"))
                return waiter
        if new is not None:
            self._pending.new_runs.append(new)
        if event is not None:
            self._encode_once(event[1])
            self._pending.events.append(event)
        if updated is not None:
            self._pending.updated_runs.append(updated)
        self._pending.waiters.append((run_id, waiter))
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
                batch = self._take()
                await self._commit(batch)
            if self._closing:
                return

    def _take(self) -> _Batch:
        pending = self._pending
        if len(pending.events) <= self._max_batch:
            self._pending = _Batch()
        else:
            # Split at an event boundary; run rows and waiters queued so far ride along
            # only if their events are in this batch, so keep them for the last slice.
            batch = _Batch(events=pending.events[: self._max_batch])
            pending.events = pending.events[self._max_batch :]
            return batch
        return pending

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
        if len(self._pending.events) < self._max_pending:
            self._space.set()

    async def _try_commit(self, batch: _Batch) -> StoreError | None:
        events = [event for _, event in batch.events]
        delay = 0.05
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                await self._store.commit(batch.new_runs, events, batch.updated_runs)
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
            | {r.run_id for r in batch.updated_runs}
        )
        logger.error(
            "the store refused a commit for runs %s; they are abandoned",
            ", ".join(run_ids),
            exc_info=exc,
        )
        for log, _ in batch.events:
            log.fail(exc)
        for run_id, waiter in batch.waiters:
            if waiter.done():
                continue
            if run_id is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(StoreError("the run could not be stored"))

    def _publish(self, batch: _Batch) -> None:
        for run in batch.new_runs:
            self._on_run_committed(run, True)
        by_log: dict[int, tuple[RunLog, list[RunEvent]]] = {}
        for log, event in batch.events:
            by_log.setdefault(id(log), (log, []))[1].append(event)
        for log, events in by_log.values():
            log.publish(events)
        for run in batch.updated_runs:
            self._on_run_committed(run, False)
        for _, waiter in batch.waiters:
            if not waiter.done():
                waiter.set_result(None)
