"""Limits: one user's excess is refused or contained while other users carry on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from runservice.app import ConfigError
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness, start_harness, wait_for
from tests.fakes import gate
from tests.helpers import error_info, read_all, start, struct

MakeServer = Callable[..., Awaitable[Harness]]


async def _bob_still_served(server: Harness) -> None:
    bob = server.caller("bob")
    run = await start(bob, "echo", text="still here")
    assert run.owner == "bob"
    assert (await bob.ListAgents(pb.ListAgentsRequest(), timeout=5)).agents


async def test_too_many_streams_from_one_user_are_refused(make_server: MakeServer) -> None:
    """Past --max-streams-per-user, Subscribe and WatchRuns are RESOURCE_EXHAUSTED."""
    server = await make_server(max_streams_per_user=3)
    alice = server.caller("alice")
    run = await start(alice, "gated", gate="streams")
    open_calls = [alice.Subscribe(pb.SubscribeRequest(run_id=run.run_id)) for _ in range(3)]
    for call in open_calls:
        await call.read()  # the RUNNING event: the stream is open and counted
    refused = alice.WatchRuns(pb.WatchRunsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refused.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "TOO_MANY_STREAMS"
    await _bob_still_served(server)
    bob_stream = server.caller("bob").WatchRuns(pb.WatchRunsRequest())
    assert (await bob_stream.read()).change  # bob has his own allowance
    bob_stream.cancel()
    open_calls[0].cancel()

    async def reopened() -> bool:
        call = alice.Subscribe(pb.SubscribeRequest(run_id=run.run_id))
        try:
            await call.read()
            return True
        except grpc.aio.AioRpcError:
            return False
        finally:
            call.cancel()

    await wait_for(reopened)  # a slot frees once a stream closes
    gate("streams").set()


async def test_an_oversize_message_is_refused_by_grpc(server: Harness) -> None:
    """A request above the receive limit is RESOURCE_EXHAUSTED before any handler runs."""
    alice = server.caller("alice")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.StartRun(pb.StartRunRequest(agent="echo", input=struct(text="x" * 6_000_000)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await _bob_still_served(server)


async def test_a_metadata_flood_is_refused(server: Harness) -> None:
    """Request metadata beyond --max-metadata-size is refused; others are unaffected."""
    alice = server.caller("alice")
    flood = (*alice.metadata, *((f"x-flood-{i}", "y" * 200) for i in range(200)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.raw(None)._stub.ListAgents(pb.ListAgentsRequest(), metadata=flood)
    assert caught.value.code() in (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
    )
    await _bob_still_served(server)


async def test_streams_that_are_never_read_are_contained(server: Harness) -> None:
    """A client that opens streams on a chatty run and never reads them costs the others nothing."""
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=5_000, size=200)
    stalled = [alice.Subscribe(pb.SubscribeRequest(run_id=run.run_id)) for _ in range(20)]
    await asyncio.gather(*(call.initial_metadata() for call in stalled))
    for _ in range(5):
        await _bob_still_served(server)
    done = await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))
    assert done.run.run_id == run.run_id
    for call in stalled:
        call.cancel()


async def test_an_event_over_max_event_size_is_refused_at_emit_with_a_clear_error(
    make_server: Any,
) -> None:
    """With --max-event-size 2KiB, an agent emitting a 3,000-byte event gets an error at
    emit that takes no seq; left uncaught, the run fails with a message naming the limit;
    a result over the limit fails the run the same way."""
    server = await make_server(max_event_size=2048)
    alice = server.caller("alice")
    run = await start(alice, "echo", text="x" * 3000)
    events = await read_all(alice, run.run_id)
    assert [e.seq for e in events] == [1, 2]
    assert events[-1].state == run_pb2.RUN_STATE_FAILED
    message = events[-1].error.message
    assert "exceeds this server's limit of 2048 bytes (--max-event-size)" in message
    assert "unexpectedly" not in message

    words = await start(alice, "echo", text=" ".join(["word"] * 600))
    events = await read_all(alice, words.run_id)
    assert [e.type for e in events].count("token") == 600
    assert events[-1].state == run_pb2.RUN_STATE_FAILED
    assert "result of" in events[-1].error.message
    assert "--max-event-size" in events[-1].error.message


async def test_events_are_held_to_what_fits_in_a_response(make_server: Any) -> None:
    """With --max-send-message-size 1MiB, events are limited to 1MiB less 64KiB whatever
    --max-event-size says, so every event an agent emits can be sent."""
    server = await make_server(max_send_message_size=1024 * 1024)
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=1, size=1_000_000)
    events = await read_all(alice, run.run_id)
    assert events[-1].state == run_pb2.RUN_STATE_FAILED
    assert "limit of 983040 bytes (--max-event-size)" in events[-1].error.message
    fits = await start(alice, "ticker", count=1, size=900_000)
    assert (await read_all(alice, fits.run_id))[-1].state == run_pb2.RUN_STATE_SUCCEEDED


async def test_a_send_limit_too_small_for_any_event_is_refused_at_start(
    tmp_path: Path, clock: Any
) -> None:
    """A --max-send-message-size that leaves no room for a 1KiB event stops the server."""
    with pytest.raises(ConfigError, match="--max-send-message-size"):
        await start_harness(tmp_path, clock, max_send_message_size=32 * 1024)
