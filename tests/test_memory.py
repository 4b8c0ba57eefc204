"""What runs leave behind in the server's memory once they have come and gone."""

from __future__ import annotations

import gc
from functools import partial
from typing import Any

from runservice.runtime.lifecycle import LiveRun
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness, wait_for
from tests.fakes import gate
from tests.helpers import TERMINAL, read_all, start, struct

RUNS = 30


async def _ended(caller: Any, run_id: str) -> bool:
    run = (await caller.GetRun(pb.GetRunRequest(run_id=run_id))).run
    return run.state in TERMINAL


def _live_runs_held() -> int:
    gc.collect()
    return sum(isinstance(o, LiveRun) for o in gc.get_objects())


async def test_runs_queued_on_a_thread_that_never_idles_leave_memory_when_evicted(
    server: Harness,
) -> None:
    """A thread always busy (each run queued behind the one before) holds no ended run:
    after N runs have come and gone, memory holds as many runs as after the first."""
    alice = server.caller("alice")
    manager = server.app.manager
    previous = None
    for i in range(RUNS):
        request = pb.StartRunRequest(
            agent="gated",
            input=struct(gate=f"g{i}"),
            thread_id="t1",
            multitask_strategy=run_pb2.MULTITASK_STRATEGY_ENQUEUE,
        )
        run = (await alice.StartRun(request)).run
        if previous is not None:  # the run before ends, leaves its grace, is evicted
            gate(f"g{i - 1}").set()
            await wait_for(partial(_ended, alice, previous))
            server.clock.advance(301)
            assert manager.sweep() == 1
        previous = run.run_id
    assert _live_runs_held() <= 2  # the last run, and the one before while it is freed


def _live_runs_tracked(run_ids: set[str]) -> int:
    """LiveRun objects of `run_ids` the collector knows of, garbage not yet collected
    included (other tests' servers may be held by library caches: not counted)."""
    return sum(isinstance(o, LiveRun) and o.run_id in run_ids for o in gc.get_objects())


async def test_evicted_runs_are_freed_at_once_not_at_the_next_full_collection(
    server: Harness,
) -> None:
    """A run that leaves memory is freed by reference counting: no cycle keeps it and its
    events until a full collection (rare on a busy server, whose old objects go last)."""
    alice = server.caller("alice")
    gc.collect()
    gc.disable()
    try:
        runs = [await start(alice, "ticker", count=20) for _ in range(RUNS)]
        for run in runs:
            await read_all(alice, run.run_id)
        server.clock.advance(301)
        assert server.app.manager.sweep() == RUNS
        ids = {run.run_id for run in runs}
        await wait_for(lambda: _live_runs_tracked(ids) == 0, limit=5)
    finally:
        gc.enable()
