"""`/v1/streams/{path}`: streams as external runs of their creators. The protocol itself
is checked by the official conformance suite (`make conformance`); these tests check what
runservice adds: producers retrying through a proxy that cuts them, the same over gRPC,
streams as runs (ListRuns, Subscribe, read tokens, per-user paths), expiry swept without
any request, and metrics of the routes."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format

from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Caller, Harness
from tests.faults import CuttingProxy
from tests.helpers import error_info, read_all, read_until
from tests.serverproc import wait_for
from tests.test_external_runs import message
from tests.test_metrics import metrics_url, scrape

MakeServer = Callable[..., Awaitable[Harness]]
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@pytest.fixture
async def web(make_server: MakeServer) -> Harness:
    """A server with the HTTP edge."""
    return await make_server(http_listen="127.0.0.1:0")


def base(server: Harness, port: int | None = None) -> str:
    """The base URL of the server's streams (or of a proxy to it)."""
    return f"http://127.0.0.1:{port or server.app.http_port}/v1/streams"


def auth(server: Harness, user: str) -> dict[str, str]:
    """The user's Authorization header."""
    return {"Authorization": f"Bearer {server.tokens[user]}"}


def values(events: list[run_pb2.RunEvent]) -> list[Any]:
    """The JSON values of the events that carry one."""
    return [
        json_format.MessageToDict(e.value) for e in events if e.WhichOneof("payload") == "value"
    ]


async def run_of(server: Harness, user: str, path: str) -> run_pb2.Run:
    """The external run of the user's stream at `path`."""
    listed = await server.caller(user).ListRuns(pb.ListRunsRequest(agent="external"))
    found = [r for r in listed.runs if r.input["stream"] == path]
    assert len(found) == 1, [r.input for r in listed.runs]
    return found[0]


async def test_a_producer_retrying_through_cuts_writes_every_message_once(
    web: Harness, session: aiohttp.ClientSession
) -> None:
    """150 appends with Producer-Id/-Epoch/-Seq through a proxy cut at random, each
    retried until answered: the log holds each message exactly once, in order. A stale
    epoch is then refused with 403 and the current epoch."""
    url = f"{base(web)}/jobs/feed"
    headers = auth(web, "alice")
    async with session.put(url, headers={**headers, **JSON}) as created:
        assert created.status == 201
    proxy = await CuttingProxy("127.0.0.1", web.app.http_port).start()
    stop = asyncio.Event()

    async def cutter() -> None:
        while not stop.is_set():
            await asyncio.sleep(random.uniform(0.02, 0.08))
            proxy.cut()

    cutting = asyncio.create_task(cutter())
    retries = 0
    try:
        for seq in range(150):
            producer = {"Producer-Id": "feeder", "Producer-Epoch": "1", "Producer-Seq": str(seq)}
            while True:
                try:
                    async with session.post(
                        f"{base(web, proxy.port)}/jobs/feed",
                        data=json.dumps({"n": seq}),
                        headers={**headers, **JSON, **producer},
                    ) as answer:
                        assert answer.status in (200, 204), await answer.text()
                        assert answer.headers["Producer-Seq"] == str(seq)
                        break
                except (TimeoutError, aiohttp.ClientError):
                    retries += 1
    finally:
        stop.set()
        await cutting
        await proxy.close()
    assert proxy.cuts > 5 and retries > 0, (proxy.cuts, retries)
    async with session.post(
        url,
        data=b'"zombie"',
        headers={**headers, **JSON, "Producer-Id": "feeder"}
        | {"Producer-Epoch": "0", "Producer-Seq": "150"},
    ) as stale:
        assert stale.status == 403 and stale.headers["Producer-Epoch"] == "1"
    async with session.get(url, headers=headers) as read:
        assert [m["n"] for m in await read.json()] == list(range(150))
    run = await run_of(web, "alice", "jobs/feed")  # open: read it up to its tail
    logged = values(await read_until(web.caller("alice"), run.run_id, 1, run.last_seq))
    assert [v["n"] for v in logged] == list(range(150))


async def test_a_grpc_producer_retrying_through_cuts_writes_every_event_once(
    web: Harness,
) -> None:
    """The same over AppendEvents through the cutting proxy: every retry of an (epoch,
    seq) that was already taken is answered as a duplicate, none is written twice."""
    alice = web.caller("alice")
    run = (await alice.StartRun(pb.StartRunRequest(agent="external"))).run
    proxy = await CuttingProxy("127.0.0.1", web.app.port).start()
    stop = asyncio.Event()

    async def cutter() -> None:
        while not stop.is_set():
            await asyncio.sleep(random.uniform(0.01, 0.05))
            proxy.cut()

    cutting = asyncio.create_task(cutter())
    duplicates = 0
    channel = grpc.aio.insecure_channel(proxy.address)
    try:
        through = Caller(channel, web.tokens["alice"])
        for seq in range(150):
            while True:
                try:
                    answer = await through.AppendEvents(
                        pb.AppendEventsRequest(
                            run_id=run.run_id,
                            events=[message({"n": seq})],
                            producer_id="feeder",
                            producer_epoch=0,
                            producer_seq=seq,
                        ),
                        timeout=5,
                    )
                    duplicates += answer.duplicate
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.INTERNAL,
                    ), exc
    finally:
        stop.set()
        await cutting
        await channel.close()
        await proxy.close()
    assert proxy.cuts > 5
    retry = await alice.AppendEvents(
        pb.AppendEventsRequest(
            run_id=run.run_id, events=[message(0)], producer_id="feeder", producer_seq=149
        )
    )
    assert retry.duplicate and retry.producer_seq == 149
    await alice.AppendEvents(  # a new instance of the producer: epoch 1, from seq 0
        pb.AppendEventsRequest(
            run_id=run.run_id, events=[message({"n": 150})], producer_id="feeder", producer_epoch=1
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as stale:  # the old instance, fenced
        await alice.AppendEvents(
            pb.AppendEventsRequest(
                run_id=run.run_id, events=[message(0)], producer_id="feeder", producer_seq=150
            )
        )
    assert error_info(stale.value).reason == "PRODUCER_EPOCH_STALE"
    await alice.CloseRun(pb.CloseRunRequest(run_id=run.run_id))
    got = [v["n"] for v in values(await read_all(alice, run.run_id))]
    assert got == list(range(151)), (len(got), duplicates)


async def test_streams_are_runs_of_their_creators(
    web: Harness, session: aiohttp.ClientSession
) -> None:
    """A stream is an external run: listed, subscribed to over gRPC with each message a
    `value` event, ended SUCCEEDED when closed. Paths are per user: another user's path
    is not found, and the same path is free for them."""
    url = f"{base(web)}/chat/1"
    alice, bob = auth(web, "alice"), auth(web, "bob")
    async with session.put(url, data=b'[{"a":1},"two"]', headers={**alice, **JSON}) as put:
        assert put.status == 201
        tail = put.headers["Stream-Next-Offset"]
    run = await run_of(web, "alice", "chat/1")
    assert (
        run.state == run_pb2.RUN_STATE_RUNNING and run.input["content_type"] == JSON["Content-Type"]
    )
    assert tail == f"{0:016d}_{run.last_seq:016d}"
    for method in ("GET", "HEAD", "DELETE"):
        async with session.request(method, url, headers=bob) as hidden:
            assert hidden.status == 404
    async with session.post(url, data=b"[3]", headers={**bob, **JSON}) as hidden:
        assert hidden.status == 404
    async with session.put(url, headers={**bob, "Content-Type": "text/plain"}) as own:
        assert own.status == 201  # bob's own stream at the same path
    async with session.post(
        url, data=b"[3]", headers={**alice, **JSON, "Stream-Closed": "true"}
    ) as closed:
        assert closed.status == 204 and closed.headers["Stream-Closed"] == "true"
    async with session.get(f"{url}?offset=-1", headers=alice) as read:  # whole numbers
        assert await read.text() == '[{"a":1},"two",3]'  # stay integers
    events = await read_all(web.caller("alice"), run.run_id)
    assert values(events) == [{"a": 1}, "two", 3]
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    assert (await run_of(web, "bob", "chat/1")).run_id != run.run_id


async def test_a_read_token_reads_its_stream_and_nothing_else(
    web: Harness, session: aiohttp.ClientSession
) -> None:
    """A read token of a stream's run reads the stream (catch-up, HEAD) as access_token,
    and is refused any write and any other stream."""
    alice = auth(web, "alice")
    for path in ("a", "b"):
        async with session.put(
            f"{base(web)}/{path}", data=b"hi", headers={**alice, "Content-Type": "text/plain"}
        ) as put:
            assert put.status == 201
    run = await run_of(web, "alice", "a")
    token = (
        await web.caller("alice").CreateReadToken(pb.CreateReadTokenRequest(run_id=run.run_id))
    ).token
    query = {"access_token": token}
    async with session.get(f"{base(web)}/a", params=query) as read:
        assert read.status == 200 and await read.text() == "hi"
    async with session.head(f"{base(web)}/a", params=query) as head:
        assert head.status == 200
    async with session.get(f"{base(web)}/b", params=query) as other:
        assert other.status == 404
    bearer = {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}
    for method in ("POST", "PUT", "DELETE"):
        async with session.request(method, f"{base(web)}/a", data=b"x", headers=bearer) as write:
            assert write.status == 403, method
            assert (await write.json())["reason"] == "READ_TOKEN_SCOPE"


async def test_expired_streams_are_swept_without_any_request(
    web: Harness, session: aiohttp.ClientSession
) -> None:
    """A stream whose TTL passed leaves ListRuns, and watchers see it DELETED, within
    about a second, though nobody asked for it; one read renews a sliding TTL."""
    alice = auth(web, "alice")
    caller = web.caller("alice")
    for path in ("short", "kept"):
        async with session.put(
            f"{base(web)}/{path}", headers={**alice, **JSON, "Stream-TTL": "60"}
        ) as put:
            assert put.status == 201
    short = await run_of(web, "alice", "short")
    watch = caller.WatchRuns(pb.WatchRunsRequest())
    while (await watch.read()).change != pb.RUN_CHANGE_SNAPSHOT_END:
        pass
    web.clock.advance(40)
    async with session.get(f"{base(web)}/kept", headers=alice) as read:  # renews it
        assert read.status == 200
    web.clock.advance(30)  # short: 70 s since its last access; kept: 30 s

    async def listed() -> list[str]:
        runs = await caller.ListRuns(pb.ListRunsRequest(agent="external"))
        return [r.input["stream"] for r in runs.runs]

    await wait_for(lambda: _without(listed, "short"), limit=5, message="not swept")
    deleted = await asyncio.wait_for(watch.read(), 5)
    assert deleted.change == pb.RUN_CHANGE_DELETED and deleted.run.run_id == short.run_id
    watch.cancel()
    assert await listed() == ["kept"]
    async with session.head(f"{base(web)}/short", headers=alice) as gone:
        assert gone.status == 404


async def _without(listed: Callable[[], Awaitable[list[str]]], path: str) -> bool:
    return path not in await listed()


async def test_stream_requests_are_counted_by_route(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """The metrics name each stream route (never a path)."""
    web = await make_server(http_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
    alice = auth(web, "alice")
    async with session.put(f"{base(web)}/m", headers={**alice, **JSON}) as put:
        assert put.status == 201
    async with session.post(f"{base(web)}/m", data=b"[1]", headers={**alice, **JSON}):
        pass
    async with session.get(f"{base(web)}/m", headers=alice):
        pass
    text = await scrape(metrics_url(web))
    for route in ("StreamPut", "StreamPost", "StreamGet"):
        assert f'route="{route}"' in text, route
    assert "/v1/streams/m" not in text
