"""External runs over gRPC: StartRun of agent `external`, AppendEvents with idempotent
producers, CloseRun, and the adapted rules (deleted while open, not interrupted at
restart, caps of their own), through a real server and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness, start_harness
from tests.helpers import error_info, read_all, read_until, start, struct


def value(v: Any) -> struct_pb2.Value:
    """A protobuf Value of a JSON value."""
    out = struct_pb2.Value()
    json_format.ParseDict(v, out)
    return out


def message(v: Any, event_type: str = "") -> pb.EventInput:
    """An EventInput carrying the JSON value `v`."""
    return pb.EventInput(type=event_type, value=value(v))


async def append(caller: Any, run_id: str, *values: Any, **fields: Any) -> pb.AppendEventsResponse:
    """AppendEvents of JSON values."""
    request = pb.AppendEventsRequest(run_id=run_id, events=[message(v) for v in values], **fields)
    response: pb.AppendEventsResponse = await caller.AppendEvents(request)
    return response


def payloads(events: list[run_pb2.RunEvent]) -> list[Any]:
    """The JSON values of the message events."""
    return [
        json_format.MessageToDict(e.value) for e in events if e.WhichOneof("payload") == "value"
    ]


async def test_an_external_run_takes_appends_and_ends_when_closed(server: Harness) -> None:
    """Every value appended reaches a live subscriber and a late one, in order; CloseRun
    ends the run SUCCEEDED with its result."""
    alice = server.caller("alice")
    run = await start(alice, "external")
    assert run.agent == "external" and run.state == run_pb2.RUN_STATE_RUNNING
    live = asyncio.create_task(read_all(alice, run.run_id))
    values = [{"i": 1}, "text", 42, True, None, [1, [2]]]
    for v in values:
        await append(alice, run.run_id, v)
    first = await append(alice, run.run_id, {"a": 1}, {"b": 2})
    assert first.last_seq == 1 + len(values) + 2 and not first.closed
    closed = await alice.CloseRun(pb.CloseRunRequest(run_id=run.run_id, result=struct(n=8)))
    assert closed.run.state == run_pb2.RUN_STATE_SUCCEEDED
    assert json_format.MessageToDict(closed.run.result) == {"n": 8}
    events = await asyncio.wait_for(live, 10)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert payloads(events) == [*values, {"a": 1}, {"b": 2}]
    assert events[0].state == run_pb2.RUN_STATE_RUNNING
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    assert await read_all(alice, run.run_id) == events
    again = await alice.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
    assert again.run.end_time == closed.run.end_time  # closing again changes nothing
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await append(alice, run.run_id, "late")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(refused.value).reason == "STREAM_CLOSED"


async def test_idempotent_producers_write_each_append_once(server: Harness) -> None:
    """A retried (epoch, seq) is answered as a duplicate and writes nothing; a gap and a
    stale epoch are refused with their reasons; a new epoch starts at 0."""
    alice = server.caller("alice")
    run = await start(alice, "external")
    p = {"producer_id": "p1"}
    await append(alice, run.run_id, "a", producer_epoch=0, producer_seq=0, **p)
    second = await append(alice, run.run_id, "b", producer_epoch=0, producer_seq=1, **p)
    retry = await append(alice, run.run_id, "b", producer_epoch=0, producer_seq=1, **p)
    assert retry.duplicate and retry.last_seq == second.last_seq and retry.producer_seq == 1
    with pytest.raises(grpc.aio.AioRpcError) as gap:
        await append(alice, run.run_id, "d", producer_epoch=0, producer_seq=3, **p)
    assert error_info(gap.value).reason == "PRODUCER_SEQ_GAP"
    assert error_info(gap.value).metadata["expected_seq"] == "2"
    await append(alice, run.run_id, "c", producer_epoch=1, producer_seq=0, **p)
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await append(alice, run.run_id, "zombie", producer_epoch=0, producer_seq=2, **p)
    assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(stale.value).reason == "PRODUCER_EPOCH_STALE"
    await append(alice, run.run_id, "x", producer_id="p2", producer_epoch=0, producer_seq=0)
    await alice.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
    assert payloads(await read_all(alice, run.run_id)) == ["a", "b", "c", "x"]


async def test_concurrent_producers_lose_nothing(server: Harness) -> None:
    """Eight producers appending at once, each retrying every append once: every value
    appears exactly once, and each producer's values in its order."""
    alice = server.caller("alice")
    run = await start(alice, "external")

    async def produce(name: str) -> None:
        for seq in range(15):
            for _ in range(2):  # the retry of a lost answer
                await append(
                    alice,
                    run.run_id,
                    {"p": name, "n": seq},
                    producer_id=name,
                    producer_epoch=0,
                    producer_seq=seq,
                )

    await asyncio.gather(*(produce(f"p{i}") for i in range(8)))
    await alice.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
    got = payloads(await read_all(alice, run.run_id))
    assert len(got) == 8 * 15
    for i in range(8):
        assert [v["n"] for v in got if v["p"] == f"p{i}"] == list(range(15))


async def test_others_cannot_see_or_feed_it_and_agent_runs_take_no_appends(
    server: Harness,
) -> None:
    """Another user's external run is NOT_FOUND for every call; appending to an agent's
    run is NOT_EXTERNAL; bad requests are INVALID_ARGUMENT with nothing written."""
    alice, bob = server.caller("alice"), server.caller("bob")
    run = await start(alice, "external")
    for call in (
        bob.AppendEvents(pb.AppendEventsRequest(run_id=run.run_id, events=[message(1)])),
        bob.CloseRun(pb.CloseRunRequest(run_id=run.run_id)),
        bob.GetRun(pb.GetRunRequest(run_id=run.run_id)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as hidden:
            await call
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    agent_run = await start(alice, "echo", text="hi")
    with pytest.raises(grpc.aio.AioRpcError) as agent:
        await append(alice, agent_run.run_id, 1)
    assert error_info(agent.value).reason == "NOT_EXTERNAL"
    for bad in (
        pb.AppendEventsRequest(run_id=run.run_id),
        pb.AppendEventsRequest(run_id=run.run_id, events=[message(1, "run.state")]),
        pb.AppendEventsRequest(run_id=run.run_id, events=[pb.EventInput(binary=b"\x00")]),
        pb.AppendEventsRequest(run_id=run.run_id, events=[message(1)], producer_seq=3),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await alice.AppendEvents(bad)
        assert refused.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    got = (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
    assert got.last_seq == 1  # only its RUNNING event


async def test_it_shows_in_listings_and_watches_and_may_be_deleted_open(server: Harness) -> None:
    """ListRuns and WatchRuns show it with its current last_seq; ListAgents lists the
    agent; DeleteRun takes it while open, and its subscribers end."""
    alice = server.caller("alice")
    agents = await alice.ListAgents(pb.ListAgentsRequest())
    assert "external" in [a.name for a in agents.agents]
    watch = alice.WatchRuns(pb.WatchRunsRequest())
    first = await watch.read()
    assert first.change == pb.RUN_CHANGE_SNAPSHOT_END
    run = await start(alice, "external")
    created = await watch.read()
    assert created.change == pb.RUN_CHANGE_CREATED and created.run.run_id == run.run_id
    await append(alice, run.run_id, "a", "b")
    listed = (await alice.ListRuns(pb.ListRunsRequest(agent="external"))).runs
    assert [r.run_id for r in listed] == [run.run_id] and listed[0].last_seq == 3
    reader = asyncio.create_task(read_all(alice, run.run_id))
    await read_until(alice, run.run_id, 1, 3)
    await alice.DeleteRun(pb.DeleteRunRequest(run_id=run.run_id))
    deleted = await watch.read()
    assert deleted.change == pb.RUN_CHANGE_DELETED
    watch.cancel()
    await asyncio.wait_for(reader, 10)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stop_ends_it_stopped(server: Harness) -> None:
    """StopRun ends an external run STOPPED with the reason; appends are then refused."""
    alice = server.caller("alice")
    run = await start(alice, "external")
    await append(alice, run.run_id, 1)
    stopped = (await alice.StopRun(pb.StopRunRequest(run_id=run.run_id, reason="enough"))).run
    assert stopped.state == run_pb2.RUN_STATE_STOPPED and stopped.stop_reason == "enough"
    events = await read_all(alice, run.run_id)
    assert events[-1].state == run_pb2.RUN_STATE_STOPPED and events[-1].seq == 3


async def test_open_streams_are_capped_per_user(make_server: Any) -> None:
    """--max-open-streams-per-user: one more is RESOURCE_EXHAUSTED until one closes."""
    server = await make_server(max_open_streams_per_user=2)
    alice = server.caller("alice")
    first = await start(alice, "external")
    await start(alice, "external")
    with pytest.raises(grpc.aio.AioRpcError) as capped:
        await start(alice, "external")
    assert capped.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(capped.value).reason == "TOO_MANY_OPEN_STREAMS"
    await start(server.caller("bob"), "external")  # others have caps of their own
    await alice.CloseRun(pb.CloseRunRequest(run_id=first.run_id))
    await start(alice, "external")


async def test_a_restart_leaves_it_open_and_appendable(
    make_server: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """External runs are not interrupted when the server restarts: they stay RUNNING,
    their log intact, and take appends again."""
    db: dict[str, str] = {}
    if request.config.getoption("--store") == "postgresql":  # both lives on one database
        pg = request.getfixturevalue("postgres")
        db["db"] = pg.url(pg.create_database())
    first = await make_server(**db)
    alice = first.caller("alice")
    run = await start(alice, "external", purpose="restart")
    await append(alice, run.run_id, "before")
    agent_run = await start(alice, "gated", gate="never", before=0)
    await first.channel.close()
    await first.app.stop()
    data_dir = tmp_path / "server0"
    again = await start_harness(data_dir, first.clock, **db)
    try:
        alice = again.caller("alice")
        got = (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
        assert got.state == run_pb2.RUN_STATE_RUNNING and got.last_seq == 2
        ended = (await alice.GetRun(pb.GetRunRequest(run_id=agent_run.run_id))).run
        assert ended.state == run_pb2.RUN_STATE_INTERRUPTED
        await append(alice, run.run_id, "after")
        await alice.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
        assert payloads(await read_all(alice, run.run_id)) == ["before", "after"]
    finally:
        await again.channel.close()
        await again.app.stop()


async def test_json_of_values_matches_what_was_sent(server: Harness) -> None:
    """Values round-trip exactly (nested, unicode, large integers within JSON's range)."""
    alice = server.caller("alice")
    run = await start(alice, "external")
    sent = [{"nested": {"list": [1, 2.5, "ü", None]}}, "\u2603", -3]
    await append(alice, run.run_id, *sent)
    events = await read_until(alice, run.run_id, 1, 4)
    assert [json.loads(json.dumps(v)) for v in payloads(events)] == sent


async def test_it_takes_a_retention_of_its_own(server: Harness) -> None:
    """StartRun's retention holds for external runs too: bounded, and shown as
    expire_time (end + retention) once closed."""
    alice = server.caller("alice")
    request = pb.StartRunRequest(agent="external")
    request.retention.FromSeconds(3600)
    run = (await alice.StartRun(request)).run
    assert not run.HasField("expire_time")
    closed = (await alice.CloseRun(pb.CloseRunRequest(run_id=run.run_id))).run
    assert closed.expire_time.seconds == closed.end_time.seconds + 3600
    request.retention.FromSeconds(10**9)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await alice.StartRun(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
