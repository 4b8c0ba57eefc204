"""The Python client against a live server: every call, typed errors, blocking twin."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import json_format

from runservice.client import (
    AlreadyExistsError,
    AsyncRunClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    RunClient,
    UnauthenticatedError,
)
from runservice.v1 import run_pb2
from tests.conftest import Harness, start_harness
from tests.fakes import FakeClock


async def test_every_call_works_through_the_async_client(server: Harness) -> None:
    """start, get, list (across pages), subscribe, wait, stop, delete and agents all work."""
    async with AsyncRunClient(server.address, token=server.tokens["alice"]) as client:
        runs = [await client.start_run("echo", {"text": f"run {i}"}) for i in range(5)]
        listed = [r.run_id async for r in client.list_runs(page_size=2)]
        assert listed == [r.run_id for r in reversed(runs)]
        assert [r.run_id async for r in client.list_runs(page_size=2, limit=3)] == listed[:3]
        final = await client.wait(runs[0].run_id)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED
        events = [e async for e in client.subscribe(runs[0].run_id)]
        assert [e.text for e in events if e.type == "token"] == ["run", "0"]
        live = await client.start_run("gated", {"gate": "never"})
        stopped = await client.stop_run(live.run_id, "enough")
        assert stopped.state == run_pb2.RUN_STATE_STOPPED
        await client.delete_run(stopped.run_id)
        with pytest.raises(NotFoundError) as caught:
            await client.get_run(stopped.run_id)
        assert caught.value.reason == "RUN_NOT_FOUND"
        assert {a.name for a in await client.list_agents()} >= {"echo", "ticker"}


async def test_a_producer_feeds_an_external_run_through_the_client(server: Harness) -> None:
    """producer() numbers its appends; a retried seq is a duplicate; close_run ends it;
    a producer of an older epoch is refused with its reason."""
    async with AsyncRunClient(server.address, token=server.tokens["alice"]) as client:
        run = await client.start_run("external")
        producer = client.producer(run.run_id, "p")
        await producer.append({"n": 0}, "text value")
        last = await producer.append([1, 2], close=False)
        again = await client.append_events(run.run_id, [[1, 2]], producer_id="p", producer_seq=1)
        assert again.duplicate and again.last_seq == last
        await client.producer(run.run_id, "p", epoch=1).append(None)
        with pytest.raises(FailedPreconditionError) as stale:
            await producer.append("zombie")
        assert stale.value.reason == "PRODUCER_EPOCH_STALE"
        closed = await client.close_run(run.run_id, {"ok": True})
        assert closed.state == run_pb2.RUN_STATE_SUCCEEDED
        events = [e async for e in client.subscribe(run.run_id)]
        values = [json_format.MessageToDict(e.value) for e in events if e.HasField("value")]
        assert values == [{"n": 0}, "text value", [1, 2], None]


async def test_failures_raise_typed_errors_with_their_reasons(server: Harness) -> None:
    """Status codes become exception classes; ErrorInfo reasons and metadata come along."""
    async with AsyncRunClient(server.address, token=server.tokens["alice"]) as client:
        with pytest.raises(InvalidArgumentError) as bad:
            await client.start_run("no-such-agent")
        assert bad.value.reason == "UNKNOWN_AGENT"
        run = await client.start_run("echo", {"text": "x"})
        await client.wait(run.run_id)
        with pytest.raises(OutOfRangeError) as past:
            async for _ in client.subscribe(run.run_id, from_seq=99):
                pass
        assert past.value.metadata["last_seq"] == "3"
        await client.start_run("echo", request_id="r1")
        with pytest.raises(AlreadyExistsError):
            await client.start_run("echo", {"text": "other"}, request_id="r1")
    async with AsyncRunClient(server.address, token="wrong") as stranger:
        with pytest.raises(UnauthenticatedError) as denied:
            await stranger.list_agents()
        assert denied.value.reason == "CREDENTIALS_INVALID"


async def test_a_token_provider_is_asked_before_every_call(server: Harness) -> None:
    """A provider (sync or async) is called per call, so a rotated token is picked up."""
    tokens = iter(["wrong", server.tokens["alice"], server.tokens["bob"]])
    calls = []

    async def provider() -> str:
        calls.append(1)
        return next(tokens)

    async with AsyncRunClient(server.address, token_provider=provider) as client:
        with pytest.raises(UnauthenticatedError):
            await client.list_agents()
        alice_run = await client.start_run("echo")
        assert alice_run.owner == "alice"
        bob_run = await client.start_run("echo")
        assert bob_run.owner == "bob"
    assert len(calls) == 3


def test_the_blocking_client_runs_the_same_calls(threaded_server: ThreadedServer) -> None:
    """RunClient offers the same calls without asyncio, iterators included."""
    with RunClient(threaded_server.address, token=threaded_server.tokens["alice"]) as client:
        run = client.start_run("ticker", {"count": 5})
        events = list(client.subscribe(run.run_id))
        assert [e.seq for e in events] == list(range(1, 8))
        assert client.wait(run.run_id).state == run_pb2.RUN_STATE_SUCCEEDED
        assert [r.run_id for r in client.list_runs()] == [run.run_id]
        first = next(iter(client.subscribe(run.run_id, from_seq=3)))
        assert first.seq == 3  # abandoning an iterator early is fine
        with pytest.raises(NotFoundError):
            client.get_run("01a1fff3-2f8b-7815-b825-f69d9cf5db07")


@dataclass
class ThreadedServer:
    """A live server running on its own event loop in another thread."""

    address: str
    tokens: dict[str, str]


@pytest.fixture
def threaded_server(tmp_path: Path) -> Iterator[ThreadedServer]:
    """A server the blocking client can call from this (loop-less) thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server")
    thread.start()
    harness = asyncio.run_coroutine_threadsafe(start_harness(tmp_path, FakeClock()), loop).result(
        30
    )
    try:
        yield ThreadedServer(harness.address, harness.tokens)
    finally:

        async def stop() -> None:
            await harness.channel.close()
            await harness.app.stop()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
