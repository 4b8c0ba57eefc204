"""A subscription: one reader's cursor over a run's log, and nothing buffered for it.

A subscriber reads from the run's in-memory window while its cursor is there (one batch
at a time, holding no copy: the window's bytes are shared), and pages from the store when
its cursor is older than the window. A store page is cut into batches, each one
SubscribeResponse; the batches not yet sent are the subscription's read-ahead, kept only
while the reader keeps taking them: when a batch has been out for `read_ahead_hold`
seconds without the reader asking for the next (its write waits on the client's
flow-control window), the read-ahead is dropped and the page size falls back to one
batch. A stalled subscriber therefore holds the batch being written and nothing more;
when it reads again its pages grow back (doubling) to `page_max_bytes`.

A subscription that starts from a snapshot of the run (`after`) yields it first, then
the batches from the seq after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from runservice.domain.errors import DatabaseUnavailableError
from runservice.domain.model import EncodedEvent, Snapshot
from runservice.domain.ports import Clock, RunStore
from runservice.runtime.cluster import RemoteLog
from runservice.runtime.lifecycle import LiveRun

T = TypeVar("T")

FIRST_PAGE_EVENTS = 64
"""The first store read of a subscription, before the size of its events is known."""


class RemoteRuns(Protocol):
    """Runs that other replicas execute: their logs as heard of here, and their state."""

    def follow(self, run_id: str) -> contextlib.AbstractContextManager[RemoteLog]:
        """The run's RemoteLog while inside."""
        ...

    async def finished(self, run_id: str) -> bool:
        """True once the run's row is terminal (or gone)."""
        ...


@dataclass(frozen=True)
class ReadLimits:
    """How a subscription reads: its batches (one per message) and its store pages."""

    batch_max_events: int
    batch_max_bytes: int
    page_max_events: int
    page_max_bytes: int
    read_ahead_hold: float


class Subscription:
    """One reader's position in a run's log; `batches()` yields from it."""

    def __init__(
        self,
        store: RunStore,
        run_id: str,
        live: LiveRun | None,
        cursor: int,
        *,
        limits: ReadLimits,
        clock: Clock,
        remote: RemoteRuns | None = None,
        opened: set[Subscription] | None = None,
    ) -> None:
        self._store = store
        self._opened = opened  # the server's open subscriptions, this one among them while open
        self._remote = remote  # None: a run not in memory is finished (one server)
        self._heard: RemoteLog | None = None  # while following a run another replica writes
        self._following = contextlib.ExitStack()
        self._run_id = run_id
        self._live = live
        self._cursor = cursor  # the seq of the next event the reader has not been given
        self._limits = limits
        self._clock = clock
        self._ahead: deque[list[EncodedEvent]] = deque()  # read, cut, not yet yielded
        self._page_bytes = limits.page_max_bytes
        self._average: int | None = None  # bytes per event of the last page read
        self._ended = False
        self._shed_timer: asyncio.TimerHandle | None = None
        self.sheds = 0  # read-aheads dropped (for tests and metrics)

    async def batches(self) -> AsyncGenerator[Sequence[EncodedEvent], None]:
        """Batches of consecutive events from the cursor, ending after the terminal event
        (or at the end of a finished log). Raises DatabaseUnavailableError if the run's end
        could not be stored."""
        live = self._live
        if live is not None:
            live.subscribers += 1
        if self._remote is not None and live is None:
            self._heard = self._following.enter_context(self._remote.follow(self._run_id))
        if self._opened is not None:
            self._opened.add(self)
        try:
            while not self._ended:
                if not self._ahead and not await self._fill():
                    return
                if len(self._ahead) > 1:
                    self._arm_shed()
                yield self._take()  # not bound to a local: a stalled write holds it alone
                self._disarm_shed()
        finally:
            if self._opened is not None:
                self._opened.discard(self)
            self._disarm_shed()
            self._following.close()
            if live is not None:
                live.subscribers -= 1
                live.idle_since = self._clock.now()

    async def after(self, snapshot: Snapshot) -> AsyncIterator[Snapshot | Sequence[EncodedEvent]]:
        """`snapshot`, then batches() (the cursor being the seq right after the snapshot's)."""
        yield snapshot
        async with contextlib.aclosing(self.batches()) as batches:
            async for batch in batches:
                yield batch

    @property
    def lag(self) -> int:
        """Events committed that the reader has not been given yet (as far as this server
        knows: a run another replica executes, as of its last notice)."""
        seen = self._cursor - 1
        if self._live is not None:
            return max(0, self._live.log.committed_seq - seen)
        if self._heard is not None:
            return max(0, self._heard.committed_seq - seen)
        return 0

    def _take(self) -> list[EncodedEvent]:
        batch = self._ahead.popleft()
        self._cursor = batch[-1].seq + 1
        self._ended = batch[-1].terminal
        return batch

    def _arm_shed(self) -> None:
        loop = asyncio.get_running_loop()
        self._shed_timer = loop.call_later(self._limits.read_ahead_hold, self._shed)

    def _disarm_shed(self) -> None:
        if self._shed_timer is not None:
            self._shed_timer.cancel()
            self._shed_timer = None

    def _shed(self) -> None:
        """The reader has not taken a batch for a while: drop what was read ahead for it."""
        self._shed_timer = None
        self._ahead.clear()
        self._page_bytes = self._limits.batch_max_bytes
        self.sheds += 1

    async def _fill(self) -> bool:
        """Reads the next batches from the cursor (waiting for them if the run is live);
        False at the end of the log."""
        limits = self._limits
        live = self._live
        while True:
            if live is not None and live.log.fenced and self._remote is not None:
                # Another replica ended the run: go on from the store, as a follower.
                live = self._live = None
                self._heard = self._following.enter_context(self._remote.follow(self._run_id))
            if live is not None and live.log.abandoned:
                raise DatabaseUnavailableError("this run's end could not be stored")
            if live is not None:
                window = live.log.read(
                    self._cursor, limits.batch_max_events, limits.batch_max_bytes
                )
                if window:
                    self._ahead.append(window)
                    return True
                if window == [] and live.log.finished:
                    return False
                if window == []:
                    await live.log.wait_beyond(self._cursor - 1)
                    continue
            events = await _whole(
                self._store.read_encoded(self._run_id, self._cursor, self._page_size())
            )
            if events:
                self._ahead.extend(_cut(events, limits.batch_max_events, limits.batch_max_bytes))
                self._grow_page(events)
                return True
            if live is None and self._heard is None:
                return False  # finished and evicted: the store holds the whole log
            if live is None and not await self._wait_remote():
                return False

    async def _wait_remote(self) -> bool:
        """Waits for another replica to commit past the cursor; False once the run is
        finished with nothing past the cursor (its row is terminal: its whole log is in
        the store)."""
        heard = self._heard
        assert heard is not None and self._remote is not None
        seen = self._cursor - 1
        if heard.committed_seq > seen:
            # Heard of events that the store did not show: the read raced the notice of
            # their commit (they are there now), or the run was deleted (an external run
            # may be, while open).
            events = await _whole(self._store.read_encoded(self._run_id, self._cursor, 1))
            return bool(events) or not await _whole(self._remote.finished(self._run_id))
        await heard.wait_beyond(seen)
        if heard.committed_seq > seen:
            return True
        if not await _whole(self._remote.finished(self._run_id)):
            return True
        # Terminal with all its events committed with it: one last look for what follows.
        events = await _whole(self._store.read_encoded(self._run_id, self._cursor, 1))
        return bool(events)

    def _page_size(self) -> int:
        """Events to read from the store: about `_page_bytes` worth, judging by the last
        page read (FIRST_PAGE_EVENTS before any)."""
        if self._average is None:
            return FIRST_PAGE_EVENTS
        return max(1, min(self._limits.page_max_events, self._page_bytes // self._average))

    def _grow_page(self, events: Sequence[EncodedEvent]) -> None:
        self._average = max(1, sum(len(e.wire) for e in events) // len(events))
        self._page_bytes = min(self._limits.page_max_bytes, self._page_bytes * 2)


_READING: set[asyncio.Task[Any]] = set()


async def _whole(read: Coroutine[Any, Any, T]) -> T:
    """Awaits a store read that a cancellation (the client left) does not interrupt: the
    read ends by itself and its connection goes back to the pool whole. (A driver call
    cancelled midway may leave its connection closing when the store closes, and the
    server's shutdown waiting on it.)"""
    task = asyncio.ensure_future(read)
    _READING.add(task)
    task.add_done_callback(_READING.discard)
    return await asyncio.shield(task)


async def settle(limit: float) -> None:
    """Waits (up to `limit` seconds) for the store reads that left subscriptions let
    finish, so that the store closes with none of its connections still out."""
    if _READING:
        await asyncio.wait(set(_READING), timeout=limit)


def _cut(
    events: Sequence[EncodedEvent], max_events: int, max_bytes: int
) -> list[list[EncodedEvent]]:
    """Consecutive slices of `events`, each within the count and byte bounds (never empty)."""
    out: list[list[EncodedEvent]] = []
    current: list[EncodedEvent] = []
    size = 0
    for event in events:
        event_size = len(event.wire)
        if current and (len(current) >= max_events or size + event_size > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(event)
        size += event_size
    if current:
        out.append(current)
    return out
