"""Runs you can talk to: SendInput, the agent's receive and ask, waiting_for_input in
GetRun, ListRuns and WatchRuns, the `approval` agent, the `run.stop_requested` event, and
live progress and usage, through a real server and a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness
from tests.fakes import gate
from tests.helpers import error_info, read_all, start, struct
from tests.serverproc import wait_for


def data(event: run_pb2.RunEvent) -> dict[str, Any]:
    """An event's data as a dict."""
    return json_format.MessageToDict(event.data)


async def send(caller: Any, run_id: str, request_id: str = "", **values: Any) -> run_pb2.RunEvent:
    """SendInput of `values`; the `input` event."""
    request = pb.SendInputRequest(run_id=run_id, input=struct(**values), request_id=request_id)
    response: pb.SendInputResponse = await caller.SendInput(request)
    return response.event


async def get(caller: Any, run_id: str) -> run_pb2.Run:
    """GetRun."""
    return (await caller.GetRun(pb.GetRunRequest(run_id=run_id))).run


async def ended(caller: Any, run_id: str) -> run_pb2.Run:
    """The run once terminal."""
    events = await read_all(caller, run_id)
    assert events[-1].type == "run.state"
    return await get(caller, run_id)


async def changes(caller: Any, request: pb.WatchRunsRequest) -> AsyncIterator[pb.WatchRunsResponse]:
    """WatchRuns' responses."""
    async for response in caller.WatchRuns(request):
        yield response


async def test_the_approval_flow_waits_visibly_takes_the_answer_and_finishes(
    server: Harness,
) -> None:
    """The run asks (an input.requested event with the question), waits (GetRun, ListRuns'
    filter and WatchRuns all show it), takes the input and ends with its result."""
    alice = server.caller("alice")
    watch = alice.WatchRuns(pb.WatchRunsRequest(waiting_for_input=True))
    run = await start(alice, "approval", question="Deploy to production?")

    async for update in watch:
        if update.change == pb.RUN_CHANGE_UPDATED and update.run.run_id == run.run_id:
            assert update.run.waiting_for_input
            break
    waiting = await get(alice, run.run_id)
    assert waiting.waiting_for_input and waiting.state == run_pb2.RUN_STATE_RUNNING
    listed = await alice.ListRuns(pb.ListRunsRequest(waiting_for_input=True))
    assert [r.run_id for r in listed.runs] == [run.run_id]
    bob_list = await server.caller("bob").ListRuns(pb.ListRunsRequest(waiting_for_input=True))
    assert not bob_list.runs

    event = await send(alice, run.run_id, approve=True, note="go")
    assert event.type == "input" and data(event) == {"approve": True, "note": "go"}
    async for update in watch:  # reported once more as it stops waiting
        if update.run.run_id == run.run_id and not update.run.waiting_for_input:
            break
    watch.cancel()
    done = await ended(alice, run.run_id)
    assert done.state == run_pb2.RUN_STATE_SUCCEEDED and not done.waiting_for_input
    assert json_format.MessageToDict(done.result) == {"approved": True, "note": "go"}
    events = await read_all(alice, run.run_id)
    types = [e.type for e in events]
    assert types == ["run.state", "input.requested", "input", "run.state"], types
    asked = data(events[1])
    assert asked["question"] == "Deploy to production?" == asked["prompt"]
    assert events[2].seq == event.seq


async def test_inputs_sent_before_the_agent_asks_are_delivered_in_order(server: Harness) -> None:
    """Inputs that arrive while the agent is busy wait in the log; it receives them in
    log order once it asks."""
    alice = server.caller("alice")
    run = await start(alice, "collector", gate="busy", n=3)
    first = await send(alice, run.run_id, k=1)
    second = await send(alice, run.run_id, k=2)
    assert second.seq == first.seq + 1
    assert not (await get(alice, run.run_id)).waiting_for_input
    gate("busy").set()
    await wait_for(lambda: get_waiting(alice, run.run_id))
    await send(alice, run.run_id, k=3)
    done = await ended(alice, run.run_id)
    result = json_format.MessageToDict(done.result)
    assert result == {"inputs": [{"k": 1.0}, {"k": 2.0}, {"k": 3.0}]}


async def get_waiting(caller: Any, run_id: str) -> bool:
    """True while the run waits for input."""
    return (await get(caller, run_id)).waiting_for_input


async def test_a_repeated_request_id_delivers_once_and_a_reused_one_is_refused(
    server: Harness,
) -> None:
    """The same request_id and input answers the first event again; with another input it
    is ALREADY_EXISTS (REQUEST_ID_REUSED) and appends nothing."""
    alice = server.caller("alice")
    run = await start(alice, "collector", gate="dup", n=2)
    first = await send(alice, run.run_id, "key-1", k=1)
    again = await send(alice, run.run_id, "key-1", k=1)
    assert again.seq == first.seq and again.type == "input"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send(alice, run.run_id, "key-1", k=99)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(refused.value).reason == "REQUEST_ID_REUSED"
    concurrent = await asyncio.gather(*(send(alice, run.run_id, "key-2", k=2) for _ in range(5)))
    assert len({e.seq for e in concurrent}) == 1
    gate("dup").set()
    done = await ended(alice, run.run_id)
    assert json_format.MessageToDict(done.result) == {"inputs": [{"k": 1.0}, {"k": 2.0}]}
    events = await read_all(alice, run.run_id)
    assert [e.type for e in events].count("input") == 2
    after = await send(alice, run.run_id, "key-1", k=1)  # a late retry: the same answer
    assert after.seq == first.seq


async def test_input_to_an_ended_or_unseen_run_is_refused_precisely(server: Harness) -> None:
    """An ended run: FAILED_PRECONDITION RUN_ENDED; another user's: NOT_FOUND; an external
    run: FAILED_PRECONDITION EXTERNAL_RUN; no input: INVALID_ARGUMENT."""
    alice, bob = server.caller("alice"), server.caller("bob")
    finished = await start(alice, "echo", text="hi")
    await ended(alice, finished.run_id)
    asking = await start(alice, "approval", question="?")
    external = await start(alice, "external")
    cases = [
        (alice, finished.run_id, grpc.StatusCode.FAILED_PRECONDITION, "RUN_ENDED"),
        (bob, asking.run_id, grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND"),
        (alice, external.run_id, grpc.StatusCode.FAILED_PRECONDITION, "EXTERNAL_RUN"),
    ]
    for caller, run_id, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(caller, run_id, x=1)
        assert refused.value.code() == code and error_info(refused.value).reason == reason
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await alice.SendInput(pb.SendInputRequest(run_id=asking.run_id))
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in (missing.value.details() or "")
    await alice.StopRun(pb.StopRunRequest(run_id=asking.run_id))
    events = await read_all(alice, asking.run_id)
    assert "input" not in [e.type for e in events]


async def test_a_stop_is_recorded_in_the_log_before_the_end(server: Harness) -> None:
    """StopRun appends run.stop_requested (reason, who) before the terminal event."""
    alice = server.caller("alice")
    run = await start(alice, "approval", question="wait forever?")
    await wait_for(lambda: get_waiting(alice, run.run_id))
    stopped = await alice.StopRun(pb.StopRunRequest(run_id=run.run_id, reason="no answer"))
    assert stopped.run.state == run_pb2.RUN_STATE_STOPPED
    assert not stopped.run.waiting_for_input
    events = await read_all(alice, run.run_id)
    assert [e.type for e in events][-2:] == ["run.stop_requested", "run.state"]
    assert data(events[-2]) == {"reason": "no answer", "by": "alice"}


async def test_progress_and_usage_move_live_in_watch_runs_and_survive_a_restart(
    make_server: Callable[..., Awaitable[Harness]],
) -> None:
    """Each step's progress and usage reach a watcher as UPDATED changes while the run
    works; the run keeps its last ones after it ends and after the server restarts."""
    server = await make_server("worked")
    alice = server.caller("alice")
    watch = alice.WatchRuns(pb.WatchRunsRequest(agent="worker"))
    run = await start(alice, "worker", steps=3, gate="w")
    seen: list[tuple[int, float]] = []
    for k in (1, 2, 3):
        gate(f"w-{k}").set()
        async for update in watch:
            progress = update.run.progress
            if update.run.run_id == run.run_id and progress.done == k:
                assert progress.total == 3 and progress.message == f"step {k}"
                assert update.run.usage["tokens"] == 10 * k
                seen.append((update.change, progress.done))
                break
    watch.cancel()
    # The last step's change rides with the run's end: the agent returned at once.
    assert seen[:2] == [(pb.RUN_CHANGE_UPDATED, 1), (pb.RUN_CHANGE_UPDATED, 2)]
    assert seen[2][1] == 3
    done = await ended(alice, run.run_id)
    assert done.progress.done == 3 and dict(done.usage) == {"tokens": 30, "cost": 0.03}
    await server.channel.close()
    await server.app.stop()
    again = await make_server("worked")
    kept = await get(again.caller("alice"), run.run_id)
    assert kept.progress.done == 3 and kept.progress.message == "step 3"
    assert dict(kept.usage) == {"tokens": 30, "cost": 0.03}
