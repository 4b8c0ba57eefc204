"""What a live run exchanges with the world while it runs: its inputs and its live fields.

Inputs are SendInput's, appended to the run's log as `input` events by the process that
executes the run; the agent takes them in log order with `ctx.receive()` or `ctx.ask()`,
whether they arrived before or after it asked. Live fields (`waiting_for_input`,
`progress`, `usage`) change the run, not its log: each change calls `on_change`, which
the manager coalesces into a few commits of the run's row a second at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from runservice.domain.errors import RunEndedError
from runservice.domain.model import RunEvent, RunProgress


class Inputs:
    """A live run's inputs: those appended to its log, in order, and the agent's place."""

    def __init__(self) -> None:
        self.received: list[Mapping[str, Any]] = []  # the `input` events' data, in log order
        self.used = 0  # how many the agent has taken
        self.appended: set[str] = set()  # request_ids this process appended
        self.lock = asyncio.Lock()  # one taker of offered inputs at a time
        self._arrived = asyncio.Event()
        # By request_id: the `input` event once committed. A committed one stays, so that a
        # caller whose offer was read before that commit still finds its event.
        self._receipts: dict[str, asyncio.Future[RunEvent]] = {}

    def add(self, data: Mapping[str, Any]) -> None:
        """An input took its place in the log: the agent may receive it."""
        self.received.append(data)
        self._arrived.set()

    async def next(self, timeout: float | None) -> Mapping[str, Any]:  # noqa: ASYNC109
        """The next input not yet taken, waiting up to `timeout` seconds for one
        (TimeoutError after that; None waits as long as the run lives)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.used >= len(self.received):
            self._arrived.clear()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                raise TimeoutError("no input arrived in time")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                raise TimeoutError(f"no input arrived within {timeout:g}s") from None
        data = self.received[self.used]
        self.used += 1
        return data

    @property
    def queued(self) -> int:
        """Inputs in the log that the agent has not taken yet."""
        return len(self.received) - self.used

    def expect(self, request_id: str) -> asyncio.Future[RunEvent]:
        """A future of the `input` event that delivers `request_id`, once committed."""
        future = self._receipts.get(request_id)
        if future is None or (future.done() and future.exception() is not None):
            future = asyncio.get_running_loop().create_future()
            self._receipts[request_id] = future
        return future

    def committed(self, request_id: str, event: RunEvent) -> None:
        """The `input` event of `request_id` is committed."""
        future = self._receipts.get(request_id)
        if future is None or future.done():
            future = self._receipts[request_id] = asyncio.get_running_loop().create_future()
        future.set_result(event)

    def fail(self, exc: BaseException) -> None:
        """Inputs still expected cannot be appended now (`exc` says why)."""
        for request_id, future in list(self._receipts.items()):
            if not future.done():
                del self._receipts[request_id]
                future.set_exception(exc)
                future.add_done_callback(consume_outcome)

    def close(self, run_id: str, state: str) -> None:
        """The run ended: inputs expected but not appended will not be (those appended
        are answered when their commit is)."""
        for request_id, future in list(self._receipts.items()):
            if request_id in self.appended:
                continue
            del self._receipts[request_id]
            if not future.done():
                future.set_exception(RunEndedError(run_id, state))
                future.add_done_callback(consume_outcome)


def consume_outcome(future: asyncio.Future[Any]) -> None:
    """A done-callback that retrieves the future's outcome, so that an exception nobody
    awaits is not reported as never retrieved."""
    with contextlib.suppress(BaseException):
        future.exception()


class LiveFields:
    """A live run's fields that its agent moves: waiting_for_input, progress and usage."""

    def __init__(self) -> None:
        self.waiting = False
        self.progress: RunProgress | None = None
        self.usage: dict[str, float] = {}
        self.on_change: Callable[[], None] | None = None
        self.flush: asyncio.TimerHandle | None = None  # the commit of the changes, scheduled
        self.flushed_at = -math.inf  # when the last one was made (the loop's clock)

    def set_waiting(self, waiting: bool) -> None:
        """The agent starts or stops waiting for input."""
        if waiting != self.waiting:
            self.waiting = waiting
            self._changed()

    def set_progress(self, done: float, total: float, message: str) -> None:
        """The agent reports its progress."""
        for name, value in (("done", done), ("total", total)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"progress {name} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"progress {name} must be a finite number >= 0, not {value}")
        if not isinstance(message, str):
            raise TypeError("progress message must be a string")
        progress = RunProgress(float(done), float(total), message[:MAX_MESSAGE_CHARS])
        if progress != self.progress:
            self.progress = progress
            self._changed()

    def add_usage(self, counters: Mapping[str, float]) -> None:
        """The agent reports running totals of what the run consumed."""
        for name, value in counters.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"usage {name} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"usage {name} must be a finite number, not {value}")
        if len(self.usage.keys() | counters.keys()) > MAX_USAGE_KEYS:
            raise ValueError(f"a run reports at most {MAX_USAGE_KEYS} usage counters")
        changed = {k: float(v) for k, v in counters.items() if self.usage.get(k) != v}
        if changed:
            self.usage.update(changed)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


MAX_MESSAGE_CHARS = 1024
"""The longest progress message kept (longer ones are cut)."""

MAX_USAGE_KEYS = 64
"""The most usage counters a run may report."""
