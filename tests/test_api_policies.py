"""Lifecycle policies through the real server: threads, idempotency, caps, retention, watch."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from runservice.domain.model import Principal
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness, wait_for
from tests.fakes import TIMELINE, gate
from tests.helpers import TERMINAL, error_info, read_all, start, struct

MakeServer = Callable[..., Awaitable[Harness]]


def _thread_request(strategy: int, agent: str = "gated", **input: Any) -> pb.StartRunRequest:
    return pb.StartRunRequest(
        agent=agent, input=struct(**input), thread_id="t1", multitask_strategy=strategy
    )


async def _outcomes(calls: list[Awaitable[Any]]) -> tuple[list[Any], list[grpc.aio.AioRpcError]]:
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = [r.run for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) + len(failed) == len(results), results
    return ok, failed


async def _thread_runs(caller: Any) -> list[run_pb2.Run]:
    page = await caller.ListRuns(pb.ListRunsRequest(thread_id="t1", page_size=1000))
    return list(page.runs)


async def test_reject_lets_exactly_one_of_fifty_concurrent_starts_through(server: Harness) -> None:
    """Fifty concurrent StartRun calls on one thread under REJECT start exactly one run."""
    alice = server.caller("alice")
    request = _thread_request(run_pb2.MULTITASK_STRATEGY_REJECT, gate="reject")
    ok, failed = await _outcomes([alice.StartRun(request) for _ in range(50)])
    assert len(ok) == 1 and len(failed) == 49
    for exc in failed:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(exc).reason == "THREAD_BUSY"
        assert ok[0].run_id in exc.details()
    assert [r.run_id for r in await _thread_runs(alice)] == [ok[0].run_id]
    gate("reject").set()
    await read_all(alice, ok[0].run_id)
    again = await alice.StartRun(_thread_request(run_pb2.MULTITASK_STRATEGY_REJECT, gate="reject"))
    assert again.run.run_id  # the thread is free once the run ended


async def test_interrupt_leaves_exactly_one_of_fifty_running(server: Harness) -> None:
    """Under INTERRUPT each new run stops its predecessors: one runs, forty-nine end STOPPED."""
    alice = server.caller("alice")
    request = _thread_request(run_pb2.MULTITASK_STRATEGY_INTERRUPT, gate="never")
    ok, failed = await _outcomes([alice.StartRun(request) for _ in range(50)])
    assert len(ok) == 50 and not failed

    async def settled() -> bool:
        states = [r.state for r in await _thread_runs(alice)]
        return (
            states.count(run_pb2.RUN_STATE_RUNNING) == 1
            and states.count(run_pb2.RUN_STATE_STOPPED) == 49
        )

    await wait_for(settled)
    runs = await _thread_runs(alice)
    survivor = next(r for r in runs if r.state == run_pb2.RUN_STATE_RUNNING)
    assert survivor.run_id == max(r.run_id for r in runs)  # the last one admitted
    for run in runs:
        if run.run_id != survivor.run_id:
            assert run.stop_reason.startswith("interrupted by run ")


async def test_enqueue_runs_fifty_concurrent_starts_one_after_another_in_order(
    server: Harness,
) -> None:
    """Under ENQUEUE fifty runs all succeed, each starting after the previous one ended."""
    alice = server.caller("alice")
    request = _thread_request(run_pb2.MULTITASK_STRATEGY_ENQUEUE, agent="recorder")
    ok, failed = await _outcomes([alice.StartRun(request) for _ in range(50)])
    assert len(ok) == 50 and not failed
    order = sorted(r.run_id for r in ok)  # ids are time-ordered: admission order

    async def all_done() -> bool:
        runs = await _thread_runs(alice)
        return all(r.state == run_pb2.RUN_STATE_SUCCEEDED for r in runs) and len(runs) == 50

    await wait_for(all_done, limit=30)
    expected = [(what, run_id) for run_id in order for what in ("start", "end")]
    assert expected == TIMELINE
    queued = await read_all(alice, order[-1])
    assert queued[0].state == run_pb2.RUN_STATE_PENDING  # a queued run's log starts PENDING
    assert queued[1].state == run_pb2.RUN_STATE_RUNNING


async def test_stopping_a_queued_run_ends_it_before_it_starts(server: Harness) -> None:
    """A queued run that is stopped never runs: its log is PENDING then STOPPED."""
    alice = server.caller("alice")
    first = (
        await alice.StartRun(_thread_request(run_pb2.MULTITASK_STRATEGY_ENQUEUE, gate="q"))
    ).run
    second = (
        await alice.StartRun(_thread_request(run_pb2.MULTITASK_STRATEGY_ENQUEUE, gate="q"))
    ).run
    stopped = (
        await alice.StopRun(pb.StopRunRequest(run_id=second.run_id, reason="changed mind"))
    ).run
    assert stopped.state == run_pb2.RUN_STATE_STOPPED and not stopped.HasField("start_time")
    events = await read_all(alice, second.run_id)
    assert [e.type for e in events] == ["run.state", "run.stop_requested", "run.state"]
    assert [e.state for e in events if e.type == "run.state"] == [
        run_pb2.RUN_STATE_PENDING,
        run_pb2.RUN_STATE_STOPPED,
    ]
    gate("q").set()
    assert (await read_all(alice, first.run_id))[-1].state == run_pb2.RUN_STATE_SUCCEEDED


async def test_twenty_concurrent_starts_with_one_request_id_create_one_run(
    server: Harness,
) -> None:
    """A repeated request_id returns the original run, however many retries race."""
    alice = server.caller("alice")
    request = pb.StartRunRequest(agent="echo", input=struct(text="once"), request_id="req-1")
    ok, failed = await _outcomes([alice.StartRun(request) for _ in range(20)])
    assert not failed and len({r.run_id for r in ok}) == 1
    listed = (await alice.ListRuns(pb.ListRunsRequest())).runs
    assert [r.run_id for r in listed] == [ok[0].run_id]
    await read_all(alice, ok[0].run_id)
    server.clock.advance(3600)  # the run leaves memory; the store still knows the key
    await wait_for(lambda: not server.app.manager.in_memory(ok[0].run_id))
    again = (await alice.StartRun(request)).run
    assert again.run_id == ok[0].run_id and again.state == run_pb2.RUN_STATE_SUCCEEDED
    other = (await server.caller("bob").StartRun(request)).run
    assert other.run_id != ok[0].run_id  # keys are per owner


async def test_a_request_id_reused_for_a_different_request_is_refused(server: Harness) -> None:
    """The same request_id with a different request is ALREADY_EXISTS, naming the run."""
    alice = server.caller("alice")
    first = (await alice.StartRun(pb.StartRunRequest(agent="echo", request_id="k"))).run
    different = pb.StartRunRequest(agent="echo", input=struct(text="other"), request_id="k")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.StartRun(different)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(caught.value).reason == "REQUEST_ID_REUSED"
    assert first.run_id in caught.value.details()


async def test_caps_refuse_the_run_past_the_limit_and_accept_once_one_ends(
    make_server: MakeServer,
) -> None:
    """With two active runs per user allowed, the third is refused until one ends."""
    server = await make_server(max_active_per_user=2, max_active=3)
    alice, bob = server.caller("alice"), server.caller("bob")
    a1 = await start(alice, "gated", gate="cap1")
    await start(alice, "gated", gate="cap2")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start(alice, "gated", gate="cap3")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "TOO_MANY_ACTIVE_RUNS"
    assert "--max-active-per-user" in caught.value.details()
    await start(bob, "gated", gate="cap4")  # bob has his own allowance...
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start(bob, "gated", gate="cap5")  # ...but the server-wide cap is 3
    assert caught.value.details().endswith("with --max-active)")
    gate("cap1").set()
    await read_all(alice, a1.run_id)
    assert (await start(alice, "echo", text="fits again")).run_id


async def test_timeouts_use_the_server_default_and_maximum(make_server: MakeServer) -> None:
    """Runs without a timeout get the default; asking above the maximum is refused."""
    server = await make_server(default_timeout=0.3, max_timeout=60.0)
    alice = server.caller("alice")
    run = await start(alice, "gated", gate="never")
    assert run.timeout.ToMilliseconds() == 300
    events = await read_all(alice, run.run_id)
    assert events[-1].state == run_pb2.RUN_STATE_TIMED_OUT
    request = pb.StartRunRequest(agent="echo")
    request.timeout.FromSeconds(3600)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.StartRun(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-timeout" in caught.value.details()


async def test_concurrent_stops_and_a_stop_after_the_end_agree(server: Harness) -> None:
    """Two concurrent StopRun calls and a later one return the same run; one terminal event."""
    alice = server.caller("alice")
    run = await start(alice, "gated", gate="never", before=1)
    stop = pb.StopRunRequest(run_id=run.run_id, reason="twice")
    first, second = await asyncio.gather(alice.StopRun(stop), alice.StopRun(stop))
    later = await alice.StopRun(pb.StopRunRequest(run_id=run.run_id, reason="late"))
    assert first.run == second.run == later.run
    assert later.run.state == run_pb2.RUN_STATE_STOPPED and later.run.stop_reason == "twice"
    events = await read_all(alice, run.run_id)
    assert sum(1 for e in events if e.state in TERMINAL) == 1


async def test_runs_past_their_retention_are_purged(make_server: MakeServer) -> None:
    """Finished runs older than --retention disappear with their logs; newer ones stay."""
    server = await make_server(retention=3600.0, purge_interval=0.05)
    alice = server.caller("alice")
    old = await start(alice, "ticker", count=5)
    await read_all(alice, old.run_id)
    server.clock.advance(1800)
    young = await start(alice, "echo", text="young")
    await read_all(alice, young.run_id)
    server.clock.advance(2000)  # old ended 3800 s ago, young 2000 s ago

    async def purged() -> bool:
        listed = (await alice.ListRuns(pb.ListRunsRequest())).runs
        return [r.run_id for r in listed] == [young.run_id]

    await wait_for(purged)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.GetRun(pb.GetRunRequest(run_id=old.run_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert await server.app.store.read_events(old.run_id, 1, 100) == []


async def test_pagination_neither_skips_nor_repeats_while_runs_are_created(
    make_server: MakeServer,
) -> None:
    """Paging through 1,000 runs while 200 more are created yields each old run exactly once."""
    server = await make_server(max_active_per_user=0, max_active=0)
    alice = server.caller("alice")
    existing = set()
    for _ in range(10):
        made = await asyncio.gather(
            *(alice.StartRun(pb.StartRunRequest(agent="echo")) for _ in range(100))
        )
        existing.update(r.run.run_id for r in made)
    assert len(existing) == 1000

    async def create_more() -> None:
        for _ in range(200):
            await alice.StartRun(pb.StartRunRequest(agent="echo"))

    creator = asyncio.create_task(create_more())
    seen: list[str] = []
    token = ""
    while True:
        page = await alice.ListRuns(pb.ListRunsRequest(page_size=37, page_token=token))
        seen.extend(r.run_id for r in page.runs)
        token = page.next_page_token
        if not token:
            break
        await asyncio.sleep(0)  # let the creator interleave with the paging
    await creator
    assert len(seen) == len(set(seen))
    assert existing <= set(seen)
    assert seen == sorted(seen, reverse=True)


async def test_watch_sees_every_transition_of_a_hundred_runs_in_order(server: Harness) -> None:
    """WatchRuns reports created, RUNNING and SUCCEEDED for each of 100 runs, in that order."""
    alice = server.caller("alice")
    call = alice.WatchRuns(pb.WatchRunsRequest())
    async for update in call:
        if update.change == pb.RUN_CHANGE_SNAPSHOT_END:
            break
    runs = await asyncio.gather(*(start(alice, "echo", text="w") for _ in range(100)))
    ids = {r.run_id for r in runs}
    history: dict[str, list[tuple[int, int]]] = defaultdict(list)
    finished = 0
    async for update in call:
        history[update.run.run_id].append((update.change, update.run.state))
        if update.run.state == run_pb2.RUN_STATE_SUCCEEDED:
            finished += 1
            if finished == 100:
                break
    call.cancel()
    assert set(history) == ids
    for changes in history.values():
        assert changes == [
            (pb.RUN_CHANGE_CREATED, run_pb2.RUN_STATE_PENDING),
            (pb.RUN_CHANGE_STATE_CHANGED, run_pb2.RUN_STATE_RUNNING),
            (pb.RUN_CHANGE_STATE_CHANGED, run_pb2.RUN_STATE_SUCCEEDED),
        ]


async def test_an_agent_that_ignores_cancellation_is_abandoned_after_the_grace(
    make_server: MakeServer,
) -> None:
    """StopRun returns STOPPED once --stop-grace has passed, even if the agent never yields."""
    server = await make_server(stop_grace=0.3)
    alice = server.caller("alice")
    run = await start(alice, "stubborn")
    await read_until_type(alice, run.run_id, "started")
    stopped = (await alice.StopRun(pb.StopRunRequest(run_id=run.run_id))).run
    assert stopped.state == run_pb2.RUN_STATE_STOPPED
    events = await read_all(alice, run.run_id)
    assert [e.type for e in events] == ["run.state", "started", "run.stop_requested", "run.state"]


async def read_until_type(caller: Any, run_id: str, event_type: str) -> None:
    """Reads the run's log until an event of `event_type` arrives."""
    call = caller.Subscribe(pb.SubscribeRequest(run_id=run_id))
    async for response in call:
        if any(e.type == event_type for e in response.events):
            break
    call.cancel()


async def test_memory_grace_is_rearmed_while_someone_is_subscribed(server: Harness) -> None:
    """A finished run stays in memory while subscribed, and for the grace period after."""
    alice = server.caller("alice")
    manager = server.app.manager
    run = await start(alice, "ticker", count=3)
    await read_all(alice, run.run_id)
    principal = Principal("alice")
    batches = await manager.subscribe(principal, run.run_id, 1)
    await anext(batches)  # a subscriber is now attached, mid-log
    server.clock.advance(3600)
    assert manager.sweep() == 0 and manager.in_memory(run.run_id)
    await batches.aclose()  # the subscriber leaves: the grace period starts again
    server.clock.advance(299)
    assert manager.sweep() == 0
    server.clock.advance(2)
    assert manager.sweep() == 1 and not manager.in_memory(run.run_id)


async def test_watch_streams_end_cleanly_at_shutdown(make_server: MakeServer) -> None:
    """An open WatchRuns stream ends with OK when the server shuts down."""
    server = await make_server()
    call = server.caller("alice").WatchRuns(pb.WatchRunsRequest())
    async for update in call:
        if update.change == pb.RUN_CHANGE_SNAPSHOT_END:
            break
    stopping = asyncio.create_task(server.app.stop())
    async for _ in call:
        pass
    assert await call.code() == grpc.StatusCode.OK
    await stopping


async def test_a_failed_runs_traceback_is_logged_under_its_error_id(
    server: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's error id finds the agent's traceback in the server log."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=3, fail_at=1)
    events = await read_all(alice, run.run_id)
    error_id = events[-1].error.message.split("error id ")[1].rstrip(")")
    records = [r for r in caplog.records if error_id in r.getMessage()]
    assert records and records[0].exc_info is not None
    assert "fail_at" in str(records[0].exc_info[1])


async def test_stop_and_enqueue_racing_on_a_thread_never_overlap(server: Harness) -> None:
    """StopRun of the active run and an ENQUEUE StartRun at once: the new run starts after."""
    alice = server.caller("alice")
    first = (await alice.StartRun(_thread_request(run_pb2.MULTITASK_STRATEGY_REJECT, gate="x"))).run
    request = _thread_request(run_pb2.MULTITASK_STRATEGY_ENQUEUE, agent="recorder")
    stopped, second = await asyncio.gather(
        alice.StopRun(pb.StopRunRequest(run_id=first.run_id)), alice.StartRun(request)
    )
    assert stopped.run.state == run_pb2.RUN_STATE_STOPPED
    events = await read_all(alice, second.run.run_id)
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    first_end = (await alice.GetRun(pb.GetRunRequest(run_id=first.run_id))).run.end_time
    second_start = (await alice.GetRun(pb.GetRunRequest(run_id=second.run.run_id))).run.start_time
    assert second_start.ToNanoseconds() >= first_end.ToNanoseconds()
