"""Properties of the run log under random interleavings: no holes, no phantoms, one order."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runservice.api.convert import decode_event, encode_event
from runservice.domain.model import Principal, RunEvent, RunState, StartRequest
from runservice.runtime.agent import AgentContext, AgentRegistry
from runservice.runtime.manager import RunManager, RuntimeSettings
from runservice.store import open_store
from tests.fakes import FakeClock


async def bursty(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits `count` events, yielding to the loop after the positions in `pauses`."""
    pauses = set(input["pauses"])
    for i in range(int(input["count"])):
        await ctx.emit("e", data={"i": i})
        if i in pauses:
            await asyncio.sleep(0)
    return {"n": input["count"]}


async def _collect(
    manager: RunManager, who: Principal, run_id: str, from_seq: int
) -> list[RunEvent]:
    events: list[RunEvent] = []
    async for batch in await manager.subscribe(who, run_id, from_seq):
        events.extend(decode_event(entry.wire) for entry in batch)
        assert [e.seq for e in batch] == [e.seq for e in events[-len(batch) :]]
        assert [e.terminal for e in batch] == [e.terminal for e in events[-len(batch) :]]
    return events


async def _scenario(data_dir: Path, counts: list[int], pauses: list[int], joins: list[int]) -> None:
    store = await open_store(f"sqlite+aiosqlite:///{data_dir / 'p.db'}", encode_event, decode_event)
    agents = AgentRegistry()
    agents.register("bursty", bursty)
    tiny = RuntimeSettings(
        window_events=8, writer_max_batch=5, writer_max_pending=12, batch_max_events=7
    )
    manager = RunManager(store, agents, FakeClock(), encode_event, tiny)
    await manager.start()
    who = Principal("p")
    try:
        runs = [
            await manager.start_run(who, StartRequest("bursty", {"count": n, "pauses": pauses}))
            for n in counts
        ]
        readers = [
            asyncio.create_task(_collect(manager, who, run.run_id, joins[i % len(joins)] % 2))
            for i, run in enumerate(runs)
        ]
        results = await asyncio.gather(*readers)
        for run, n, seen in zip(runs, counts, results, strict=True):
            stored = await store.read_events(run.run_id, 1, 10_000)
            assert [e.seq for e in stored] == list(range(1, n + 3))
            assert stored[-1].state is RunState.SUCCEEDED
            assert seen == stored[seen[0].seq - 1 :]
            assert (await manager.get_run(who, run.run_id)).last_seq == n + 2
    finally:
        await manager.shutdown(0)
        await store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=4),
    pauses=st.lists(st.integers(0, 60), max_size=10),
    joins=st.lists(st.integers(0, 10), min_size=1, max_size=4),
)
def test_logs_have_no_holes_and_every_reader_sees_the_stored_order(
    counts: list[int], pauses: list[int], joins: list[int]
) -> None:
    """With tiny batches, windows and queues, each log is 1..N and readers see exactly it."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_scenario(Path(tmp), counts, pauses, joins))


async def endless(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits as fast as the writer accepts, until stopped."""
    i = 0
    while True:
        i += 1
        await ctx.emit("e", data={"i": i})


async def test_a_run_emitting_without_pause_does_not_hold_back_other_runs(tmp_path: Path) -> None:
    """The writer's queue never drains below a batch while `endless` runs; other runs'
    rows and state changes still commit, each with its lifecycle event."""
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}", encode_event, decode_event)
    agents = AgentRegistry()
    agents.register("endless", endless)
    agents.register("bursty", bursty)
    tiny = RuntimeSettings(writer_max_batch=5, writer_max_pending=12)
    manager = RunManager(store, agents, FakeClock(), encode_event, tiny)
    await manager.start()
    alice, bob = Principal("alice"), Principal("bob")
    try:
        hog = await manager.start_run(alice, StartRequest("endless", {}))
        for _ in range(3):  # each would wait for the hog to end before the fix
            run = await asyncio.wait_for(
                manager.start_run(bob, StartRequest("bursty", {"count": 3, "pauses": []})), 30
            )
            events = await asyncio.wait_for(_collect(manager, bob, run.run_id, 1), 30)
            assert [e.seq for e in events] == [1, 2, 3, 4, 5]
            assert events[-1].state is RunState.SUCCEEDED
        assert (await manager.get_run(alice, hog.run_id)).state is RunState.RUNNING
    finally:
        await manager.shutdown(0)
        await store.close()
