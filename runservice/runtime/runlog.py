"""A live run's log: seq assignment, the committed window, and the wake-up signal.

Seqs are assigned at emit; events become visible (join the window, wake subscribers) only
after the writer has committed them. The window is a bounded ring of the newest
committed events: a subscriber whose cursor is older reads from the store instead.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from runservice.domain.model import RunEvent

WINDOW_EVENTS = 4096
WINDOW_BYTES = 4 * 1024 * 1024


class RunLog:
    """The in-memory head of one run's event log."""

    def __init__(
        self,
        run_id: str,
        last_seq: int = 0,
        *,
        window_events: int = WINDOW_EVENTS,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        self.run_id = run_id
        self.committed_seq = last_seq
        self.finished = False
        self.broken: BaseException | None = None
        self._next_seq = last_seq + 1
        self._window: deque[RunEvent] = deque()
        self._window_bytes = 0
        self._max_events = window_events
        self._max_bytes = window_bytes
        self._signal = asyncio.Event()

    def assign_seq(self) -> int:
        """The next seq of this log (the caller enqueues the event right away)."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    @property
    def last_assigned(self) -> int:
        """The highest seq handed out so far."""
        return self._next_seq - 1

    def publish(self, events: Iterable[RunEvent]) -> None:
        """Makes committed events visible and wakes every waiting subscriber."""
        for event in events:
            self._window.append(event)
            self._window_bytes += event.size_hint()
            self.committed_seq = event.seq
            if event.terminal:
                self.finished = True
        while len(self._window) > 1 and (
            len(self._window) > self._max_events or self._window_bytes > self._max_bytes
        ):
            self._window_bytes -= self._window.popleft().size_hint()
        signal, self._signal = self._signal, asyncio.Event()
        signal.set()

    def read(self, cursor: int, max_events: int, max_bytes: int) -> list[RunEvent] | None:
        """Committed events from `cursor` on, bounded; None if `cursor` is older than the window."""
        if cursor > self.committed_seq:
            return []
        if not self._window or cursor < self._window[0].seq:
            return None
        start = cursor - self._window[0].seq
        out: list[RunEvent] = []
        size = 0
        for i in range(start, min(start + max_events, len(self._window))):
            event = self._window[i]
            size += event.size_hint()
            if out and size > max_bytes:
                break
            out.append(event)
        return out

    def fail(self, exc: BaseException) -> None:
        """Marks the log broken: its events can no longer be stored; wakes every reader."""
        self.broken = exc
        signal, self._signal = self._signal, asyncio.Event()
        signal.set()

    async def wait_beyond(self, seq: int) -> None:
        """Returns once an event after `seq` is committed, or the log is finished or broken."""
        while self.committed_seq <= seq and not self.finished and self.broken is None:
            await self._signal.wait()
