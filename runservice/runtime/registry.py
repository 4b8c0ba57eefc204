"""The registry of live runs: every run this process holds, and every task it owns.

No task is created in an RPC handler's scope: runs and background loops are spawned
here, held by strong reference and reaped here, so a run outlives the call that started
it. Finished runs stay for the memory grace period after their last reader, then leave
(`sweep`). At shutdown the registry drains: running runs get the drain timeout to finish,
then every run still active is interrupted, its agent given the stop grace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from typing import Any

from runservice.domain.model import RunState
from runservice.runtime.lifecycle import SHUTDOWN, LiveRun, Phase

logger = logging.getLogger(__name__)


class Registry:
    """Live runs by id, and the tasks that run them."""

    def __init__(self, on_evict: Callable[[LiveRun], None]) -> None:
        self._live: dict[str, LiveRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_evict = on_evict
        self._hurry = asyncio.Event()

    def get(self, run_id: str) -> LiveRun | None:
        """The live run, if this process holds it."""
        return self._live.get(run_id)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._live

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[LiveRun]:
        return iter(list(self._live.values()))

    def add(self, live: LiveRun) -> None:
        """Holds `live` from now on."""
        self._live[live.run_id] = live

    def discard(self, live: LiveRun) -> None:
        """Drops a run that was never committed (nothing else knew it)."""
        self._live.pop(live.run_id, None)

    def evict(self, run_id: str) -> None:
        """The run leaves memory (it is read from the store from now on)."""
        live = self._live.pop(run_id, None)
        if live is not None:
            self._on_evict(live)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Runs `coro` in a task the registry holds until it is done."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def sweep(self, now: datetime, grace: float) -> int:
        """Evicts finished runs idle for `grace` seconds; returns how many left memory."""
        limit = timedelta(seconds=grace)
        gone = [
            run_id
            for run_id, live in self._live.items()
            if live.ended.is_set()
            and live.subscribers == 0
            and live.idle_since is not None
            and now - live.idle_since >= limit
        ]
        for run_id in gone:
            self.evict(run_id)
        return len(gone)

    def hurry(self) -> None:
        """Cuts a drain short: runs still active are interrupted now."""
        self._hurry.set()

    async def drain(self, limit: float, stop_grace: float) -> None:
        """Lets active runs finish for `limit` seconds (queued ones never start), then
        interrupts the rest; returns once each ended or its supervisor was cancelled."""
        live = [r for r in self._live.values() if not r.ended.is_set()]
        if not live:
            return
        for run in live:
            if run.phase is Phase.QUEUED:  # queued runs do not start during a drain
                run.request_end(RunState.INTERRUPTED, SHUTDOWN)
        logger.info("draining %d active runs for up to %.1fs", len(live), limit)
        await self._wait_ended(live, limit)
        for run in live:
            run.request_end(RunState.INTERRUPTED, SHUTDOWN)
        tasks = [r.task for r in live if r.task is not None and not r.task.done()]
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=stop_grace + 0.5)
            for task in stuck:  # the supervisor itself is stuck: cancel it, it records INTERRUPTED
                task.cancel()
            if stuck:  # (its terminal state is then queued: the writer's close waits for it)
                await asyncio.wait(stuck, timeout=0.5)

    async def cancel_all(self) -> None:
        """Cancels every task still held (background loops, abandoned supervisors)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _wait_ended(self, live: list[LiveRun], limit: float) -> None:
        """Waits until every run in `live` ended, `limit` passed, or hurry() was called."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        hurry: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
        pending: set[asyncio.Future[Any]] = {asyncio.ensure_future(r.ended.wait()) for r in live}
        try:
            while pending and not hurry.done() and loop.time() < deadline:
                _, pending = await asyncio.wait(
                    pending | {hurry},
                    timeout=deadline - loop.time(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                pending.discard(hurry)
        finally:
            for waiter in (*pending, hurry):
                waiter.cancel()
