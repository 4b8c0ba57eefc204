"""Runs through the real gRPC server: detached execution, resume, fan-out, replay."""

from __future__ import annotations

import asyncio

import grpc

from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness, wait_for
from tests.fakes import gate
from tests.helpers import TERMINAL, error_info, read_all, read_until, seqs, start, struct


async def _state(caller: object, run_id: str) -> int:
    response = await caller.GetRun(pb.GetRunRequest(run_id=run_id))  # type: ignore[attr-defined]
    return response.run.state


async def test_start_returns_at_once_with_a_committed_run(server: Harness) -> None:
    """StartRun returns the run PENDING or RUNNING, and GetRun finds it immediately."""
    alice = server.caller("alice")
    run = await start(alice, "gated", gate="g1", before=1)
    assert run.state in (run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING)
    assert run.owner == "alice" and run.agent == "gated"
    got = (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
    assert got.run_id == run.run_id
    gate("g1").set()
    events = await read_all(alice, run.run_id)
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED


async def test_closing_every_subscriber_does_not_stop_the_run(server: Harness) -> None:
    """A run keeps going when all its subscribers disconnect; it finishes and persists."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=40, interval=0.01)
    for _ in range(3):
        seen = await read_until(alice, run.run_id, 1, 3)
        assert seen[0].seq == 1

    async def succeeded() -> bool:
        return await _state(alice, run.run_id) == run_pb2.RUN_STATE_SUCCEEDED

    await wait_for(succeeded)
    events = await read_all(alice, run.run_id)
    assert [e.type for e in events].count("tick") == 40
    assert seqs(events) == list(range(1, 43))
    assert events[0].state == run_pb2.RUN_STATE_RUNNING
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    assert dict(events[-1].data) == {"count": 40}


async def test_resume_from_last_seen_plus_one_has_no_gap_and_no_duplicate(server: Harness) -> None:
    """Reconnecting mid-run with last_seen + 1 yields exactly the rest of the log."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=300, interval=0.002)
    first = await read_until(alice, run.run_id, 0, 60)
    rest = await read_all(alice, run.run_id, from_seq=first[-1].seq + 1)
    combined = first + rest
    assert seqs(combined) == list(range(1, 303))
    assert combined[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    assert combined == await read_all(alice, run.run_id, from_seq=1)


async def test_from_seq_one_replays_everything_then_follows_live(server: Harness) -> None:
    """Subscribe from seq 1 delivers the committed history, then new events live, then ends OK."""
    alice = server.caller("alice")
    run = await start(alice, "gated", gate="live", before=5, after=5)
    call = alice.Subscribe(pb.SubscribeRequest(run_id=run.run_id, from_seq=1))
    events: list[run_pb2.RunEvent] = []
    async for response in call:
        events.extend(response.events)
        if len(events) == 6:  # RUNNING + 5 steps: the agent now waits on its gate
            gate("live").set()
    assert seqs(events) == list(range(1, 13))
    assert [e.data["i"] for e in events if e.type == "step"] == list(range(1, 11))
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    assert await call.code() == grpc.StatusCode.OK


async def test_twenty_concurrent_subscribers_receive_the_identical_sequence(
    server: Harness,
) -> None:
    """Twenty subscribers of one run, joining at different moments, all see the same log."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=400, interval=0.001, size=64)

    async def subscriber(i: int) -> list[run_pb2.RunEvent]:
        await asyncio.sleep(0.005 * i)  # stagger joins: early, mid-run and late joiners
        return await read_all(alice, run.run_id, from_seq=1)

    results = await asyncio.gather(*(subscriber(i) for i in range(20)))
    assert seqs(results[0]) == list(range(1, 403))
    for other in results[1:]:
        assert other == results[0]


async def test_from_seq_at_the_end_of_a_finished_run_ends_at_once(server: Harness) -> None:
    """from_seq = last_seq + 1 on a finished run yields nothing and ends with OK."""
    alice = server.caller("alice")
    run = await start(alice, "echo", text="a b")
    events = await read_all(alice, run.run_id)
    assert await read_all(alice, run.run_id, from_seq=events[-1].seq + 1) == []
    assert seqs(await read_all(alice, run.run_id, from_seq=3)) == [3, 4]


async def test_replay_of_a_long_log_arrives_in_bounded_batches(server: Harness) -> None:
    """Catching up on a long log sends several events per message, each message bounded."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=3000)
    await read_all(alice, run.run_id)
    sizes = []
    async for response in alice.Subscribe(pb.SubscribeRequest(run_id=run.run_id, from_seq=1)):
        sizes.append(len(response.events))
    assert sum(sizes) == 3002
    assert max(sizes) > 1 and max(sizes) <= 2000


async def test_an_hour_later_finished_runs_are_served_from_the_store(server: Harness) -> None:
    """After the memory grace has long passed, GetRun, ListRuns and replay still work."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=25)
    before = await read_all(alice, run.run_id)
    assert server.app.manager.in_memory(run.run_id)
    server.clock.advance(3600)
    await wait_for(lambda: not server.app.manager.in_memory(run.run_id))
    got = (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
    assert got.state == run_pb2.RUN_STATE_SUCCEEDED and got.last_seq == 27
    listed = (await alice.ListRuns(pb.ListRunsRequest())).runs
    assert [r.run_id for r in listed] == [run.run_id]
    assert await read_all(alice, run.run_id) == before
    assert seqs(await read_all(alice, run.run_id, from_seq=20)) == list(range(20, 28))


async def test_stop_ends_the_run_stopped_with_the_agents_cleanup(server: Harness) -> None:
    """StopRun cancels the agent, keeps its partial output, ends STOPPED, and is idempotent."""
    alice = server.caller("alice")
    run = await start(alice, "gated", gate="never", before=2)
    await read_until(alice, run.run_id, 1, 3)
    stopped = (await alice.StopRun(pb.StopRunRequest(run_id=run.run_id, reason="user left"))).run
    assert stopped.state == run_pb2.RUN_STATE_STOPPED
    assert stopped.stop_reason == "user left"
    assert dict(stopped.result) == {"partial": True}
    assert stopped.error.code == 1  # CANCELLED
    again = (await alice.StopRun(pb.StopRunRequest(run_id=run.run_id))).run
    assert again == stopped
    events = await read_all(alice, run.run_id)
    types = [e.type for e in events]
    assert types == ["run.state", "step", "step", "run.stop_requested", "cleanup", "run.state"]
    assert sum(1 for e in events if e.state in TERMINAL) == 1


async def test_a_failing_agent_ends_failed_without_its_exception_text(server: Harness) -> None:
    """An unexpected agent error ends the run FAILED with an error id, not the exception text."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=5, fail_at=2)
    events = await read_all(alice, run.run_id)
    final = events[-1]
    assert final.state == run_pb2.RUN_STATE_FAILED
    assert "fail_at" not in final.error.message and "error id" in final.error.message
    got = (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
    assert got.error.message == final.error.message
    assert [e.data["i"] for e in events if e.type == "tick"] == [1, 2]


async def test_a_deliberate_run_error_shows_its_message(server: Harness) -> None:
    """An agent's RunError message reaches the client."""
    alice = server.caller("alice")
    run = await start(alice, "refusing")
    events = await read_all(alice, run.run_id)
    assert events[-1].state == run_pb2.RUN_STATE_FAILED
    assert events[-1].error.message == "the input names no such document"


async def test_a_run_past_its_timeout_ends_timed_out(server: Harness) -> None:
    """A run that exceeds StartRunRequest.timeout ends TIMED_OUT after its cleanup."""
    alice = server.caller("alice")
    request = pb.StartRunRequest(agent="gated", input=struct(gate="never", before=1))
    request.timeout.FromMilliseconds(300)
    run = (await alice.StartRun(request)).run
    events = await read_all(alice, run.run_id)
    assert events[-1].state == run_pb2.RUN_STATE_TIMED_OUT
    assert events[-2].type == "cleanup"
    assert events[-1].error.code == 4  # DEADLINE_EXCEEDED


async def test_delete_removes_a_finished_run_and_refuses_an_active_one(server: Harness) -> None:
    """DeleteRun is FAILED_PRECONDITION while active; afterwards the run is gone."""
    alice = server.caller("alice")
    run = await start(alice, "gated", gate="del", before=1)
    try:
        await alice.DeleteRun(pb.DeleteRunRequest(run_id=run.run_id))
        raise AssertionError("deleting an active run must fail")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(exc).reason == "RUN_ACTIVE"
    gate("del").set()
    await read_all(alice, run.run_id)
    await alice.DeleteRun(pb.DeleteRunRequest(run_id=run.run_id))
    try:
        await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))
        raise AssertionError("a deleted run must be gone")
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND


async def test_list_runs_pages_newest_first_without_repeats(server: Harness) -> None:
    """ListRuns pages through every run once, newest first, with opaque tokens."""
    alice = server.caller("alice")
    created = [(await start(alice, "echo", text=str(i))).run_id for i in range(23)]
    seen: list[str] = []
    token = ""
    while True:
        page = await alice.ListRuns(pb.ListRunsRequest(page_size=10, page_token=token))
        seen.extend(r.run_id for r in page.runs)
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(created))


async def test_list_runs_filters_by_state_agent_and_label(server: Harness) -> None:
    """ListRuns filters combine: states, agent and labels."""
    alice = server.caller("alice")
    a = (
        await alice.StartRun(
            pb.StartRunRequest(agent="echo", input=struct(text="x"), labels={"team": "red"})
        )
    ).run
    b = (
        await alice.StartRun(
            pb.StartRunRequest(agent="echo", input=struct(text="y"), labels={"team": "blue"})
        )
    ).run
    c = await start(alice, "gated", gate="filter")
    await read_all(alice, a.run_id)
    await read_all(alice, b.run_id)

    async def ids(**kw: object) -> list[str]:
        return [r.run_id for r in (await alice.ListRuns(pb.ListRunsRequest(**kw))).runs]

    assert await ids(labels={"team": "red"}) == [a.run_id]
    assert await ids(agent="echo") == [b.run_id, a.run_id]
    assert await ids(states=[run_pb2.RUN_STATE_RUNNING, run_pb2.RUN_STATE_PENDING]) == [c.run_id]
    gate("filter").set()


async def test_watch_runs_reports_snapshot_then_each_change(server: Harness) -> None:
    """WatchRuns sends the active runs, a snapshot marker, then created and state changes."""
    alice = server.caller("alice")
    existing = await start(alice, "gated", gate="w1")
    call = alice.WatchRuns(pb.WatchRunsRequest())
    updates = []
    async for update in call:
        updates.append(update)
        if update.change == pb.RUN_CHANGE_SNAPSHOT_END:
            break
    assert [u.run.run_id for u in updates[:-1]] == [existing.run_id]
    fresh = await start(alice, "echo", text="hi")
    changes = []
    async for update in call:
        if update.run.run_id == fresh.run_id:
            changes.append((update.change, update.run.state))
            if update.run.state == run_pb2.RUN_STATE_SUCCEEDED:
                break
    call.cancel()
    assert changes == [
        (pb.RUN_CHANGE_CREATED, run_pb2.RUN_STATE_PENDING),
        (pb.RUN_CHANGE_STATE_CHANGED, run_pb2.RUN_STATE_RUNNING),
        (pb.RUN_CHANGE_STATE_CHANGED, run_pb2.RUN_STATE_SUCCEEDED),
    ]
    gate("w1").set()


async def test_list_agents_names_the_builtins(server: Harness) -> None:
    """ListAgents lists echo and ticker with descriptions."""
    agents = (await server.caller("bob").ListAgents(pb.ListAgentsRequest())).agents
    names = {a.name: a.description for a in agents}
    assert {"echo", "ticker"} <= set(names)
    assert names["echo"]


async def test_an_event_above_the_payload_limit_fails_the_run_not_the_server(
    server: Harness,
) -> None:
    """An agent emitting an oversize event gets an error; the run fails with a message
    naming the limit (--max-event-size), and the server goes on."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=2, size=1_100_000)
    events = await read_all(alice, run.run_id)
    assert events[-1].state == run_pb2.RUN_STATE_FAILED
    assert "--max-event-size" in events[-1].error.message
