"""A live run's log: seq assignment, the committed window, and the wake-up signal.

Seqs are assigned at emit; events become visible (join the window, wake subscribers) only
after the writer has committed them. The window is a bounded ring of the newest
committed events: a subscriber whose cursor is older reads from the store instead.

The window keeps each event's wire form and nothing else: consecutive seqs need not be
stored, and bytes are not objects the garbage collector has to visit. (Holding the
events themselves, each with its payload's dict, put two tracked objects per event in
the collections: with 1,000 runs at 10 events/s, 2.3 s of collecting over a 12 s run,
full collections of up to 200 ms.)

Once the run has finished, its window is packed into one buffer: a finished run stays in
memory for the memory grace period, and one buffer costs less than thousands of small bytes
objects (each with its header, rounded up to its allocator's size class), is not spread
over the allocator's arenas among the short-lived objects of every call, and is freed in
one piece.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable, Iterable
from itertools import accumulate, islice

from runservice.domain.model import EncodedEvent, RunEvent, encoded_event
from runservice.runtime.signal import Signal

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
        self.abandoned = False
        self.fenced = False  # another replica ended the run: it is read from the store now
        # Called once when the log is given up (the run's supervisor ends the run). It
        # refers to the run that holds this log: dropped once it cannot be called any more,
        # so that an evicted run is freed at once, not at the next full collection.
        self.on_fail: Callable[[], object] | None = None
        self._next_seq = last_seq + 1
        self._window: deque[bytes] = deque()  # wire forms of seqs _first, _first + 1, ...
        self._first = last_seq + 1
        self._window_bytes = 0
        # Once finished: the window's wire forms end to end, and where each one ends.
        self._packed = b""
        self._ends: array[int] | None = None
        self._max_events = window_events
        self._max_bytes = window_bytes
        self._signal = Signal()

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
        """Makes committed events (the log's next seqs, in order, encoded) visible and
        wakes every waiting subscriber."""
        window = self._window
        for event in events:
            wire = event.wire
            if wire is None:
                raise ValueError("only encoded events join a run's window")
            if not window:
                self._first = event.seq
            window.append(wire)
            self._window_bytes += len(wire)
            self.committed_seq = event.seq
            if event.terminal:
                self.finished = True
        while len(window) > 1 and (
            len(window) > self._max_events or self._window_bytes > self._max_bytes
        ):
            self._window_bytes -= len(window.popleft())
            self._first += 1
        if self.finished and self._ends is None:
            self._pack()
        self._signal.fire()

    def read(self, cursor: int, max_events: int, max_bytes: int) -> list[EncodedEvent] | None:
        """Committed events from `cursor` on, bounded; None if `cursor` is older than the window."""
        if cursor > self.committed_seq:
            return []
        if self._ends is not None:
            return self._read_packed(cursor, max_events, max_bytes)
        window = self._window
        if not window or cursor < self._first:
            return None
        terminal_seq = self.committed_seq if self.finished else 0  # a terminal event is last
        start = cursor - self._first
        out: list[EncodedEvent] = []
        size = 0
        for seq, wire in enumerate(islice(window, start, start + max_events), cursor):
            size += len(wire)
            if out and size > max_bytes:
                break
            out.append(encoded_event((seq, wire, seq == terminal_seq)))
        return out

    def _pack(self) -> None:
        """Replaces the finished window's bytes objects by one buffer."""
        self.on_fail = None  # a finished log is never given up
        window = self._window
        self._packed = b"".join(window)
        self._ends = array("Q", accumulate(map(len, window)))
        window.clear()

    def _read_packed(
        self, cursor: int, max_events: int, max_bytes: int
    ) -> list[EncodedEvent] | None:
        """read() of a packed window: each event's wire form is a copy cut from the buffer."""
        ends, packed = self._ends, self._packed
        assert ends is not None
        index = cursor - self._first
        if not ends or index < 0:
            return None
        out: list[EncodedEvent] = []
        start = ends[index - 1] if index else 0
        stop = min(len(ends), index + max_events)
        base = start
        for i in range(index, stop):
            end = ends[i]
            if out and end - base > max_bytes:
                break
            seq = self._first + i
            out.append(encoded_event((seq, packed[start:end], seq == self.committed_seq)))
            start = end
        return out

    def fail(self, exc: BaseException) -> None:
        """Gives the log up: events not yet committed are dropped (the next seq handed out
        follows the last committed one, for the run's terminal event) and the agent can
        emit nothing more. Readers keep waiting for the terminal event."""
        self._next_seq = self.committed_seq + 1
        if self.broken is None:
            self.broken = exc
            on_fail, self.on_fail = self.on_fail, None
            if on_fail is not None:
                on_fail()

    def fence(self, exc: BaseException) -> None:
        """Another replica ended the run (this server lost its lease on it): nothing more
        of it is written from here, and readers go on from the store."""
        self.fenced = True
        self.broken = exc
        self.on_fail = None
        self.abandon()

    def abandon(self) -> None:
        """Not even the terminal event could be stored: wakes every reader to leave."""
        self.abandoned = True
        self.on_fail = None
        self._signal.fire()

    async def wait_beyond(self, seq: int) -> None:
        """Returns once an event after `seq` is committed, or the log is finished or abandoned."""
        while self.committed_seq <= seq and not self.finished and not self.abandoned:
            await self._signal.wait()
