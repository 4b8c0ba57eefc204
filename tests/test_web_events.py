"""Every run's log as a durable stream over HTTP (GET /v1/runs/{id}/events), and WatchRuns
as SSE: catch-up chunks, long-poll, SSE with Last-Event-ID, heartbeats, many readers,
readers behind a proxy that cuts them, and subscriptions released when clients leave.

The events read over HTTP are compared with what Subscribe gives for the same run, as
JSON: the same messages, in the proto's JSON mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format

from tests.conftest import Harness, wait_for
from tests.fakes import gate
from tests.faults import CuttingProxy
from tests.helpers import read_all
from tests.test_web_api import Http

MakeServer = Callable[..., Awaitable[Harness]]
START = "0000000000000000_0000000000000000"


def offset(seq: int) -> str:
    """The offset after event `seq`."""
    return f"{0:016d}_{seq:016d}"


async def subscribed(server: Harness, run_id: str, user: str = "alice") -> list[dict[str, Any]]:
    """The run's whole log as Subscribe (gRPC) delivers it, each event as JSON."""
    events = await read_all(server.caller(user), run_id)
    return [json_format.MessageToDict(e, preserving_proto_field_name=True) for e in events]


def seqs(events: list[dict[str, Any]]) -> list[int]:
    """The seqs of events in JSON (where int64 is a string)."""
    return [int(event["seq"]) for event in events]


@dataclass
class Event:
    """One server-sent event."""

    kind: str
    data: str
    id: str | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Reading:
    """What an SSE reader got: the events, and the comment lines in between."""

    events: list[Event] = field(default_factory=list)
    comments: int = 0

    @property
    def data(self) -> list[dict[str, Any]]:
        """The messages of every data event, in order."""
        return [message for e in self.events if e.kind == "data" for message in e.json]

    @property
    def controls(self) -> list[dict[str, Any]]:
        return [e.json for e in self.events if e.kind == "control"]


async def sse_events(response: aiohttp.ClientResponse, reading: Reading) -> AsyncIterator[Event]:
    """The complete events of an SSE response as they arrive (one cut mid-event is not
    one); counts comment lines in `reading`."""
    fields: dict[str, list[str]] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            reading.comments += 1
        elif line == "":
            if fields:
                event_id = fields.get("id", [None])[0]
                yield Event(fields["event"][0], "\n".join(fields.get("data", [])), event_id)
            fields = {}
        else:
            name, _, value = line.partition(":")
            if name in ("id", "event"):
                value = value.removeprefix(" ")
            fields.setdefault(name, []).append(value)


def sse_url(http: Http, run_id: str, start: str = "-1", **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"offset": start, "live": "sse", **params}.items())
    return f"{http.base}/v1/runs/{run_id}/events?{query}"


async def read_sse(
    http: Http, run_id: str, start: str = "-1", *, headers: dict[str, str] | None = None
) -> Reading:
    """An SSE reading of the run from `start` until the server ends the stream."""
    reading = Reading()
    sent = {**http.auth("alice"), **(headers or {})}
    async with http.session.get(sse_url(http, run_id, start), headers=sent) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        assert "Content-Length" not in response.headers
        async for event in sse_events(response, reading):
            reading.events.append(event)
    return reading


def check_framing(reading: Reading) -> None:
    """Each data event carries `id:` = the offset after it and is followed by a control
    with that offset; offsets strictly increase; the last control closes the stream and
    has no cursor."""
    kinds = [e.kind for e in reading.events if e.kind in ("data", "control")]
    data = [e for e in reading.events if e.kind == "data"]
    for i, event in enumerate(reading.events):
        if event.kind == "data":
            assert event.id == offset(int(event.json[-1]["seq"]))
            assert reading.events[i + 1].kind == "control"
            assert reading.events[i + 1].json["streamNextOffset"] == event.id
    assert kinds.count("data") == len(data) and data
    offsets = [c["streamNextOffset"] for c in reading.controls]
    assert offsets == sorted(set(offsets))
    last = reading.controls[-1]
    assert last["streamClosed"] is True and last["upToDate"] is True
    assert "streamCursor" not in last
    assert all(c["streamCursor"].isdigit() for c in reading.controls[:-1])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session without a cap on its connections."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


@pytest.fixture
async def http(make_server: MakeServer, session: aiohttp.ClientSession) -> Http:
    """A server with the HTTP edge, a small catch-up chunk and fast heartbeats."""
    server = await make_server(http_listen="127.0.0.1:0", http_sse_heartbeat=0.05)
    return Http(server, session)


async def no_subscriptions(server: Harness) -> None:
    """Waits until the server holds no open subscription."""
    await wait_for(lambda: server.app.manager.stats().subscriptions == 0, message="leaked")


# -- catch-up -------------------------------------------------------------------------------


async def test_catch_up_reads_chunks_from_the_start_to_the_closed_end(http: Http) -> None:
    """From -1, each answer is a chunk with the offset after it; only the last says
    Stream-Up-To-Date and Stream-Closed; together they are Subscribe's log; an answer is
    cached by its ETag (304); offset=now and the tail answer [] at once."""
    run = await http.start("ticker", input={"count": 2500})
    await http.finished(run["run_id"])
    path = f"/v1/runs/{run['run_id']}/events"
    got: list[dict[str, Any]] = []
    at, answers = "-1", []
    while True:
        answer = await http.call("GET", path, params=[("offset", at)])
        assert answer.status == 200 and answer.headers["Content-Type"] == "application/json"
        answers.append(answer)
        got += answer.body
        at = answer.headers["Stream-Next-Offset"]
        if "Stream-Up-To-Date" in answer.headers:
            break
    assert len(answers) == 3  # 2,502 events in chunks of at most 1,000
    assert at == offset(2502) and got == await subscribed(http.server, run["run_id"])
    assert all("Stream-Closed" not in a.headers for a in answers[:-1])
    assert answers[-1].headers["Stream-Closed"] == "true"
    assert answers[0].headers["Cache-Control"].startswith("private")

    etag = answers[1].headers["ETag"]
    previous = answers[0].headers["Stream-Next-Offset"]
    cached = await http.call(
        "GET", path, params=[("offset", previous)], headers={"If-None-Match": etag}
    )
    assert cached.status == 304 and cached.body is None

    for start in (at, "now"):
        tail = await http.call("GET", path, params=[("offset", start)])
        assert (tail.status, tail.body) == (200, [])
        assert tail.headers["Stream-Next-Offset"] == at
        assert tail.headers["Stream-Up-To-Date"] == tail.headers["Stream-Closed"] == "true"
    assert (await http.call("GET", path, params=[("offset", "now")])).headers[
        "Cache-Control"
    ] == "no-store"
    head = await http.call("HEAD", path)
    assert head.headers["Stream-Next-Offset"] == at and head.headers["Stream-Closed"] == "true"
    assert await http.call("GET", path) == await http.call("GET", path, params=[("offset", START)])


async def test_offsets_that_are_malformed_or_past_the_tail_are_refused(http: Http) -> None:
    """Malformed offsets, repeated or empty ones, and a live mode without an offset: 400
    INVALID_ARGUMENT; an offset past the tail: 400 SEQ_OUT_OF_RANGE, Subscribe's rule."""
    run = await http.start("echo", input={"text": "a b"})
    await http.finished(run["run_id"])
    path = f"/v1/runs/{run['run_id']}/events"
    for params in (
        [("offset", "")],
        [("offset", "12")],
        [("offset", "0_1 ")],
        [("offset", "../1")],
        [("offset", "1_0000000000000001")],
        [("offset", "-1"), ("offset", "now")],
        [("live", "long-poll")],
        [("live", "sse")],
        [("offset", "-1"), ("live", "websocket")],
    ):
        answer = await http.call("GET", path, params=params)
        assert (answer.status, answer.problem["reason"]) == (400, "INVALID_ARGUMENT"), params
    beyond = await http.call("GET", path, params=[("offset", offset(5))])
    assert (beyond.status, beyond.problem["reason"]) == (400, "SEQ_OUT_OF_RANGE")
    assert beyond.problem["code"] == "OUT_OF_RANGE"
    other = await http.call("GET", path, user="bob")
    assert (other.status, other.problem["reason"]) == (404, "RUN_NOT_FOUND")
    ignored = await http.call("GET", path, params=[("offset", "-1"), ("foo", "bar")])
    assert ignored.status == 200 and len(ignored.body) == 4


async def test_a_live_run_reads_as_open_until_its_terminal_event(http: Http) -> None:
    """Catch-up on a running run reaches the tail (Stream-Up-To-Date) without waiting and
    without Stream-Closed; once the run ends, the rest arrives and the stream is closed."""
    run = await http.start("gated", input={"gate": "open-end", "before": 3, "after": 2})
    path = f"/v1/runs/{run['run_id']}/events"

    async def four_events() -> Any:
        answer = await http.call("GET", path)
        return answer if len(answer.body) == 4 else None

    live = await wait_for(four_events)
    assert live.headers["Stream-Up-To-Date"] == "true" and "Stream-Closed" not in live.headers
    assert live.headers["Cache-Control"] == "private, no-cache"
    gate("open-end").set()
    await http.finished(run["run_id"])
    rest = await http.call("GET", path, params=[("offset", live.headers["Stream-Next-Offset"])])
    assert seqs(rest.body) == [5, 6, 7] and rest.headers["Stream-Closed"] == "true"
    assert live.body + rest.body == await subscribed(http.server, run["run_id"])


# -- long-poll ------------------------------------------------------------------------------


async def test_long_poll_returns_new_events_as_they_come_and_204_on_timeout(http: Http) -> None:
    """At the tail, a long-poll waits: 204 with the same offset and a cursor when nothing
    came within its `timeout`; the next commit's events as soon as they are committed;
    at the end of a finished run, 204 Stream-Closed at once. Followed from -1, the polls
    give Subscribe's log."""
    run = await http.start("gated", input={"gate": "poll", "before": 2, "after": 3})
    path = f"/v1/runs/{run['run_id']}/events"
    manager = http.server.app.manager

    async def three_events() -> Any:
        answer = await http.call("GET", path, params=[("offset", "-1"), ("live", "long-poll")])
        return answer if len(answer.body) == 3 else None

    first = await wait_for(three_events)
    tail = first.headers["Stream-Next-Offset"]
    assert first.headers["Stream-Cursor"].isdigit()
    idle = await http.call(
        "GET", path, params=[("offset", tail), ("live", "long-poll"), ("timeout", "0.1")]
    )
    assert idle.status == 204 and idle.headers["Stream-Next-Offset"] == tail
    assert idle.headers["Stream-Up-To-Date"] == "true" and "Stream-Closed" not in idle.headers
    cursor = idle.headers["Stream-Cursor"]
    again = await http.call(
        "GET",
        path,
        params=[("offset", "now"), ("live", "long-poll"), ("timeout", "0.1"), ("cursor", cursor)],
    )
    assert again.status == 204 and int(again.headers["Stream-Cursor"]) > int(cursor)

    got = list(first.body)
    waiting = asyncio.create_task(
        http.call("GET", path, params=[("offset", tail), ("live", "long-poll")])
    )
    await wait_for(lambda: manager.stats().subscriptions == 1, message="the poll is not waiting")
    gate("poll").set()
    woken = await waiting
    assert woken.status == 200 and woken.body and int(woken.body[0]["seq"]) == 4
    got += woken.body
    at = woken.headers["Stream-Next-Offset"]
    while "Stream-Closed" not in woken.headers:
        woken = await http.call("GET", path, params=[("offset", at), ("live", "long-poll")])
        got += woken.body if woken.status == 200 else []
        at = woken.headers["Stream-Next-Offset"]
    assert got == await subscribed(http.server, run["run_id"])
    ended = await http.call(
        "GET", path, params=[("offset", offset(len(got))), ("live", "long-poll")]
    )
    assert ended.status == 204 and ended.headers["Stream-Closed"] == "true"
    await no_subscriptions(http.server)


# -- SSE ------------------------------------------------------------------------------------


async def test_sse_resumed_with_last_event_id_mid_run_is_gap_free_and_identical_to_subscribe(
    http: Http,
) -> None:
    """A reader leaves mid-run; it comes back as a browser's EventSource does, with the
    page's original URL (offset=-1) and Last-Event-ID = the last id it got, which wins;
    it follows to the end. The two readings, joined, are Subscribe's log exactly."""
    run = await http.start("ticker", input={"count": 300, "interval": 0.005})
    first = Reading()
    url = sse_url(http, run["run_id"])
    async with http.session.get(url, headers=http.auth("alice")) as response:
        async for event in sse_events(response, first):
            first.events.append(event)
            if event.kind == "data" and len(first.data) >= 60:
                break
    last_id = [e.id for e in first.events if e.kind == "data"][-1]
    assert last_id is not None and int(last_id.split("_")[1]) < 302
    rest = await read_sse(http, run["run_id"], "-1", headers={"Last-Event-ID": last_id})
    check_framing(rest)
    joined = first.data + rest.data
    assert seqs(joined) == list(range(1, 303))
    assert joined == await subscribed(http.server, run["run_id"])
    whole = await read_sse(http, run["run_id"])
    check_framing(whole)
    assert whole.data == joined
    await no_subscriptions(http.server)


async def test_sse_at_the_tail_says_where_it_is_and_heartbeats_while_idle(http: Http) -> None:
    """offset=now on a waiting run: a first control (upToDate, the tail's offset), then
    keep-alive comments while nothing happens, then the new events and the end. At the
    end of a finished run, SSE answers 204 (EventSource stops reconnecting)."""
    run = await http.start("gated", input={"gate": "idle", "before": 1, "after": 1})
    await wait_for(lambda: http.server.app.manager.stats().active_runs == 1)

    async def two_events() -> bool:
        return len((await http.call("GET", f"/v1/runs/{run['run_id']}/events")).body) == 2

    await wait_for(two_events)
    reading = Reading()

    async def open_after_heartbeats() -> None:
        await wait_for(lambda: reading.comments >= 3, message="no heartbeats")
        gate("idle").set()

    opener = asyncio.create_task(open_after_heartbeats())
    async with http.session.get(
        sse_url(http, run["run_id"], "now"), headers=http.auth("alice")
    ) as response:
        async for event in sse_events(response, reading):
            reading.events.append(event)
    await opener
    first = reading.controls[0]
    assert first["streamNextOffset"] == offset(2) and first["upToDate"] is True
    assert reading.comments >= 3
    assert seqs(reading.data) == [3, 4] and reading.controls[-1]["streamClosed"] is True
    finished = await http.call(
        "GET", f"/v1/runs/{run['run_id']}/events", params=[("offset", "now"), ("live", "sse")]
    )
    assert finished.status == 204 and finished.headers["Stream-Closed"] == "true"


async def test_sse_ends_after_its_time_bound_and_resumes_by_last_event_id(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """With --http-sse-max-duration, a stream of a long run ends without closing it; a
    reader that reconnects with its Last-Event-ID each time ends with the whole log."""
    server = await make_server(http_listen="127.0.0.1:0", http_sse_max_duration=0.2)
    http = Http(server, session)
    run = await http.start("ticker", input={"count": 150, "interval": 0.01})
    got: list[dict[str, Any]] = []
    last_id, connections = "", 0
    while True:
        connections += 1
        headers = {"Last-Event-ID": last_id} if last_id else {}
        async with session.get(
            sse_url(http, run["run_id"]), headers={**http.auth("alice"), **headers}
        ) as response:
            if response.status == 204:
                break
            reading = Reading()
            async for event in sse_events(response, reading):
                reading.events.append(event)
        got += reading.data
        last_id = (
            [e.id for e in reading.events if e.kind == "data"][-1] if reading.data else last_id
        )
        if reading.controls and reading.controls[-1].get("streamClosed"):
            break
    assert connections > 1
    assert got == await subscribed(server, run["run_id"])


async def test_two_hundred_concurrent_sse_readers_receive_the_identical_sequence(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """200 SSE readers of one live run, from the start: each gets 1..N, the same messages
    as Subscribe, and their subscriptions are all released at the end."""
    server = await make_server(http_listen="127.0.0.1:0", max_streams_per_user=0)
    http = Http(server, session)
    run = await http.start("ticker", input={"count": 300, "interval": 0.005})
    began = time.perf_counter()
    readings = await asyncio.gather(*(read_sse(http, run["run_id"]) for _ in range(200)))
    seconds = time.perf_counter() - began
    expected = await subscribed(server, run["run_id"])
    assert seqs(expected) == list(range(1, 303))
    for reading in readings:
        assert reading.data == expected
    check_framing(readings[0])
    print(f"200 SSE readers x {len(expected)} events in {seconds:.2f}s")
    await no_subscriptions(server)


async def test_readers_cut_at_random_by_the_proxy_resume_to_the_complete_sequence(
    http: Http,
) -> None:
    """Through the fault proxy, which resets every connection at random moments, SSE
    readers resuming with their last id end with the complete log, for a live run and
    for a finished one replayed."""
    proxy = await CuttingProxy("127.0.0.1", http.server.app.http_port).start()
    rng = random.Random(20261205)
    progress = asyncio.Event()

    async def cutter() -> None:
        while True:
            for _ in range(rng.randint(1, 5)):
                progress.clear()
                await progress.wait()
            await asyncio.sleep(rng.uniform(0, 0.005))
            proxy.cut()

    async def read_through(run_id: str) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        last_id = ""
        for _ in range(1000):
            headers = {**http.auth("alice"), **({"Last-Event-ID": last_id} if last_id else {})}
            url = f"http://{proxy.address}/v1/runs/{run_id}/events?offset=-1&live=sse"
            reading = Reading()
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                async with http.session.get(url, headers=headers) as response:
                    if response.status == 204:
                        return got
                    async for event in sse_events(response, reading):
                        if event.kind == "data":
                            got += event.json
                            last_id = event.id or last_id
                            progress.set()
                        if event.kind == "control" and event.json.get("streamClosed"):
                            return got
        raise AssertionError("did not reach the end")

    cutting = asyncio.create_task(cutter())
    try:
        live = await http.start("ticker", input={"count": 400, "interval": 0.002})
        replay = await http.start("ticker", input={"count": 3000, "size": 16})
        await http.finished(replay["run_id"])
        for run in (live, replay):
            got = await read_through(run["run_id"])
            assert got == await subscribed(http.server, run["run_id"])
    finally:
        cutting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cutting
        await proxy.close()
    assert proxy.cuts >= 30, f"only {proxy.cuts} cuts"
    await no_subscriptions(http.server)


async def test_subscriptions_are_released_when_clients_leave(http: Http) -> None:
    """An SSE reader or a long-poll whose client goes away releases its subscription at
    once (the server's count of open subscriptions goes back to 0)."""
    run = await http.start("gated", input={"gate": "leave"})
    manager = http.server.app.manager
    reading = Reading()
    async with http.session.get(
        sse_url(http, run["run_id"]), headers=http.auth("alice")
    ) as response:
        async for event in sse_events(response, reading):
            if event.kind == "control":
                break
        assert manager.stats().subscriptions == 1
    await no_subscriptions(http.server)

    path = f"/v1/runs/{run['run_id']}/events"
    poll = asyncio.create_task(
        http.call("GET", path, params=[("offset", "now"), ("live", "long-poll")])
    )
    await wait_for(lambda: manager.stats().subscriptions == 1)
    poll.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await poll
    await no_subscriptions(http.server)
    gate("leave").set()


# -- WatchRuns ------------------------------------------------------------------------------


async def test_watch_runs_streams_changes_as_sse(http: Http) -> None:
    """GET /v1/runs:watch: the snapshot, its end, then each change as a `change` event
    holding a WatchRunsResponse in JSON; all_users without admin is refused before the
    stream opens; a watch that falls behind ends with an `error` event (WATCH_LAGGED)."""
    refused = await http.call("GET", "/v1/runs:watch", params=[("all_users", "true")])
    assert (refused.status, refused.problem["reason"]) == (403, "ADMIN_ONLY")
    early = await http.start("gated", input={"gate": "watched"})
    reading = Reading()
    url = f"{http.base}/v1/runs:watch?agent=gated"
    async with http.session.get(url, headers=http.auth("alice")) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        async for event in sse_events(response, reading):
            reading.events.append(event)
            change = event.json.get("change") if event.kind == "change" else None
            if change == "RUN_CHANGE_SNAPSHOT_END":
                gate("watched").set()
            finished = event.kind == "change" and event.json.get("run", {}).get("state")
            if change == "RUN_CHANGE_STATE_CHANGED" and finished == "RUN_STATE_SUCCEEDED":
                http.server.app.manager._feed.lag_all()  # as if it had missed changes
    changes = [e.json for e in reading.events if e.kind == "change"]
    assert changes[0]["change"] == "RUN_CHANGE_EXISTING"
    assert changes[0]["run"]["run_id"] == early["run_id"]
    assert changes[1] == {"change": "RUN_CHANGE_SNAPSHOT_END"}
    assert changes[-1]["run"]["state"] == "RUN_STATE_SUCCEEDED"
    error = reading.events[-1]
    assert error.kind == "error" and error.json["reason"] == "WATCH_LAGGED"
    assert error.json["status"] == 409
    await wait_for(lambda: http.server.app.manager.stats().watches == 0)


async def test_shutdown_closes_the_port_and_ends_streams_with_their_runs_terminal_events(
    http: Http,
) -> None:
    """At shutdown the HTTP port closes at once and a request on a connection opened
    before gets 503 SERVER_DRAINING, while an SSE reader of a run that the drain ends
    still gets the run's terminal event (INTERRUPTED) and a closing control."""
    run = await http.start("gated", input={"gate": "never", "before": 1})
    app = http.server.app
    reading = Reading()
    async with aiohttp.ClientSession() as kept_session, aiohttp.ClientSession() as fresh:
        kept = Http(http.server, kept_session)
        await kept.ok("GET", "/v1/agents")  # its connection stays open, idle
        url = sse_url(http, run["run_id"])
        async with http.session.get(url, headers=http.auth("alice")) as response:
            stopping: asyncio.Task[None] | None = None
            async for event in sse_events(response, reading):
                reading.events.append(event)
                if stopping is None and event.kind == "control":
                    stopping = asyncio.create_task(app.stop())
                    await wait_for(lambda: app.manager.draining)
                    with pytest.raises(aiohttp.ClientConnectionError):  # a new connection
                        await Http(http.server, fresh).call("GET", "/v1/agents")
                    refused = await kept.call("GET", "/v1/agents")
                    assert (refused.status, refused.problem["reason"]) == (
                        503,
                        "SERVER_DRAINING",
                    )
            assert stopping is not None
            await stopping
    assert reading.data[-1]["state"] == "RUN_STATE_INTERRUPTED"
    assert reading.controls[-1]["streamClosed"] is True


async def test_an_sse_client_that_stops_reading_is_dropped_after_the_stall_timeout(
    make_server: MakeServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that opens an SSE stream of a long log and reads nothing holds the server
    for --stream-stall-timeout at most: then its connection is dropped and its
    subscription released, as a stalled gRPC stream is ended."""
    caplog.set_level(logging.INFO, "runservice.web")
    server = await make_server(http_listen="127.0.0.1:0", stream_stall_timeout=0.3)
    http = Http(server, session)
    run = await http.start("ticker", input={"count": 3000, "size": 4096})
    await http.finished(run["run_id"])
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", server.app.http_port))
        request = (
            f"GET /v1/runs/{run['run_id']}/events?offset=-1&live=sse HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {server.tokens['alice']}\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        await wait_for(lambda: server.app.manager.stats().subscriptions == 1)
        await no_subscriptions(server)
    assert "took nothing for 0.3s and was dropped" in caplog.text
