"""Load clients of the HTTP edge scenario (bench/http_edge.py).

The functions named `*_readers` and `*_appenders` run in a worker process (see
`bench.clients.Workers`) and return plain data; the rest run in the bench's own process,
which sets streams up and plays the one producer of the live fan-out. One SSE client
reads runservice's `/v1/streams/{path}` and `/v1/runs/{id}/events` and the Node
reference server alike: the servers differ only in their answers.

Every message is a JSON object `{"i": k, "pad": "x" * size}`; a live message also
carries `"t"`, the wall time (`time.time()`) just before its append was sent, so that a
reader in another process measures append sent → event received without a handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf import struct_pb2

from bench.clients import CALL_LIMIT_S, channels, metadata, run
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

JSON = "application/json"
LIFECYCLE = "run.state"  # the type of runservice's own events in a run's log
OK = (200, 204)
# Each producer's loop also stops after this many appends, whatever the clock says.
MAX_APPENDS = 1_000_000
LIST_PAGES = 1_000  # the most pages of ListRuns read while looking for a stream's run


def message(i: int, size: int, sent: float | None = None) -> dict[str, Any]:
    """Message `i` with `size` pad bytes, and its send time when given."""
    out: dict[str, Any] = {"i": i, "pad": "x" * size}
    if sent is not None:
        out["t"] = sent
    return out


def auth(token: str) -> dict[str, str]:
    """The bearer token's header (none for the reference server, which has no auth)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def session(limit_s: float) -> aiohttp.ClientSession:
    """An HTTP/1.1 client session without a cap on connections (each SSE reader and
    each producer holds one of its own)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=limit_s),
    )


async def _until(wall: float) -> None:
    """Sleeps until the wall clock reads `wall`."""
    await asyncio.sleep(max(0.0, wall - time.time()))


def _write_ready(path: str, state: dict[str, int]) -> None:
    """Writes `state` to `path` whole: the coordinator, polling for the file, never
    reads it half-written."""
    part = Path(path + ".part")
    part.write_text(json.dumps(state))
    os.replace(part, path)


# -- SSE readers -------------------------------------------------------------------------


@dataclass
class _Tally:
    """What a worker's readers saw, together."""

    messages: list[int] = field(default_factory=list)  # per reader
    last: list[float] = field(default_factory=list)  # per reader: wall time of its last data
    latencies: array[float] = field(default_factory=lambda: array("d"))
    events: int = 0  # SSE data events (or gRPC responses)
    failures: dict[str, int] = field(default_factory=dict)
    ready: int = 0

    def fail(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1

    def result(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "last": self.last,
            "latencies_ms": self.latencies.tobytes(),
            "events": self.events,
            "failures": self.failures,
        }


class _SseReader:
    """Parses one SSE response (`\\n`-framed, as both servers write it) and counts it."""

    def __init__(self, tally: _Tally, run_events: bool, on_ready: asyncio.Event) -> None:
        self.tally = tally
        self.run_events = run_events  # items are RunEvents (a run's events), not messages
        self.on_ready = on_ready
        self.messages = 0
        self.last = 0.0
        self.closed = False
        self._ready = False

    async def read(self, response: aiohttp.ClientResponse) -> None:
        buf = b""
        async for chunk in response.content.iter_any():
            buf += chunk
            start = 0
            while (end := buf.find(b"\n\n", start)) >= 0:
                self._event(buf[start:end])
                start = end + 2
                if self.closed:
                    return
            buf = buf[start:]

    def _event(self, block: bytes) -> None:
        kind = b""
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[5:])
            elif line.startswith(b"event:"):
                kind = line[6:].strip()
        if kind == b"data":
            self._data(json.loads(b"\n".join(data)))
        elif kind == b"control":
            control = json.loads(b"\n".join(data))
            if not self._ready:
                self._ready = True
                self.tally.ready += 1
                self.on_ready.set()
            self.closed = bool(control.get("streamClosed"))

    def _data(self, items: list[Any]) -> None:
        now = time.time()
        self.tally.events += 1
        if self.run_events:
            items = [e["value"] for e in items if e.get("type") != LIFECYCLE]
        for item in items:
            if "t" in item:
                self.tally.latencies.append((now - item["t"]) * 1000.0)
        self.messages += len(items)
        self.last = now


def sse_readers(
    urls: Sequence[str],
    token: str,
    *,
    start_at: float,
    ready_path: str,
    run_events: bool,
    limit_s: float,
    loop: str,
) -> dict[str, Any]:
    """One SSE GET per url (repeats allowed), all sent once the wall clock reaches
    `start_at`, each read until its stream's closing control event (or `limit_s`).

    With `ready_path`, writes it once every reader has had its first control event (or
    failed). `run_events`: the urls are `/v1/runs/{id}/events` (items are RunEvents,
    lifecycle ones not counted). Returns per reader the messages received and the wall
    time of its last data event, every message's latency in ms (array('d') bytes) when
    messages carry `t`, the data events, and failures by kind.
    """

    async def main() -> dict[str, Any]:
        tally = _Tally()
        changed = asyncio.Event()
        headers = {**auth(token), "Accept": "text/event-stream"}
        async with session(limit_s) as http:

            async def follow(url: str) -> None:
                reader = _SseReader(tally, run_events, changed)
                try:
                    async with http.get(url, headers=headers) as response:
                        if response.status != 200:  # noqa: PLR2004 - SSE answers 200
                            tally.fail(f"HTTP {response.status}")
                        else:
                            await reader.read(response)
                            if not reader.closed:
                                tally.fail("ended before its closing control event")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    tally.fail(type(exc).__name__)
                tally.messages.append(reader.messages)
                tally.last.append(reader.last)
                changed.set()

            await _until(start_at)
            tasks = [asyncio.create_task(follow(u)) for u in urls]
            if ready_path:
                await _signal_ready(tally, len(urls), changed, ready_path, limit_s)
            await asyncio.gather(*tasks)
        return tally.result()

    return run(main, loop)


async def _signal_ready(
    tally: _Tally, readers: int, changed: asyncio.Event, path: str, limit_s: float
) -> None:
    """Writes `path` once every reader is ready or done (or after `limit_s`)."""
    deadline = time.monotonic() + limit_s
    while tally.ready + len(tally.messages) < readers and time.monotonic() < deadline:
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
    await asyncio.to_thread(_write_ready, path, {"ready": tally.ready, "readers": readers})


# -- gRPC readers ------------------------------------------------------------------------


def grpc_readers(
    addr: str,
    token: str,
    run_ids: Sequence[str],
    *,
    start_at: float,
    ready_path: str,
    limit_s: float,
    loop: str,
) -> dict[str, Any]:
    """One Subscribe from seq 1 per id (repeats allowed), all sent once the wall clock
    reaches `start_at`, each read until its run's stream ends: what `sse_readers` returns,
    over gRPC. A reader is ready once its first response (the RUNNING event) arrived."""

    async def main() -> dict[str, Any]:
        tally = _Tally()
        changed = asyncio.Event()
        chans = channels(addr, len(run_ids))
        stubs = [pb_grpc.RunServiceStub(c) for c in chans]  # type: ignore[no-untyped-call]
        md = metadata(token)

        async def follow(i: int, run_id: str) -> None:
            got, last, ready = 0, 0.0, False
            call = stubs[i % len(stubs)].Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=md, timeout=limit_s
            )
            try:
                async for response in call:
                    now = time.time()
                    tally.events += 1
                    if not ready:
                        ready = True
                        tally.ready += 1
                        changed.set()
                    got += _count_events(response.events, now, tally.latencies)
                    last = now if got else last
            except grpc.aio.AioRpcError as exc:
                tally.fail(exc.code().name)
            tally.messages.append(got)
            tally.last.append(last)
            changed.set()

        await _until(start_at)
        tasks = [asyncio.create_task(follow(i, r)) for i, r in enumerate(run_ids)]
        if ready_path:
            await _signal_ready(tally, len(run_ids), changed, ready_path, limit_s)
        await asyncio.gather(*tasks)
        for c in chans:
            await c.close()
        return tally.result()

    return run(main, loop)


def _count_events(events: Sequence[run_pb2.RunEvent], now: float, lat: array[float]) -> int:
    """The messages among `events` (lifecycle events aside), each one's latency added."""
    got = 0
    for event in events:
        if event.type == LIFECYCLE:
            continue
        got += 1
        fields = event.value.struct_value.fields
        if "t" in fields:
            lat.append((now - fields["t"].number_value) * 1000.0)
    return got


# -- appenders ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """When a load starts (wall clock), how long it warms up and how long it counts."""

    start_at: float
    warmup: float
    duration: float

    @property
    def begin(self) -> float:
        """The wall time from which appends count."""
        return self.start_at + self.warmup

    @property
    def end(self) -> float:
        """The wall time after which no append starts, and none that ends counts."""
        return self.begin + self.duration


class _Appends:
    """The appends of a worker's producers: latencies of those that counted, errors."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.latencies: array[float] = array("d")
        self.failures: dict[str, int] = {}

    def took(self, t0: float, t1: float) -> None:
        if t0 >= self.window.begin and t1 <= self.window.end:
            self.latencies.append((t1 - t0) * 1000.0)

    def fail(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1

    def result(self) -> dict[str, Any]:
        return {
            "appends": len(self.latencies),
            "latencies_ms": self.latencies.tobytes(),
            "failures": self.failures,
        }


def http_appenders(
    urls: Sequence[str],
    token: str,
    producer_ids: Sequence[str],
    *,
    window: Window,
    payload: int,
    loop: str,
) -> dict[str, Any]:
    """One producer per url (repeats allowed: several producers on one stream), each
    POSTing one JSON message at a time, the next once the last was answered, from
    `window.start_at` to `window.end` (and at most MAX_APPENDS). With `producer_ids`
    (one per url), each append carries the idempotent-producer headers (epoch 0, seq
    0, 1, ...). Counts the appends that started after the warm-up and ended in the
    window; their latencies in ms (array('d') bytes)."""

    async def main() -> dict[str, Any]:
        tally = _Appends(window)
        async with session(window.end - time.time() + CALL_LIMIT_S) as http:

            async def produce(j: int, url: str) -> None:
                headers = {**auth(token), "Content-Type": JSON}
                for k in range(MAX_APPENDS):
                    t0 = time.time()
                    if t0 >= window.end:
                        return
                    if producer_ids:
                        headers["Producer-Id"] = producer_ids[j]
                        headers["Producer-Epoch"] = "0"
                        headers["Producer-Seq"] = str(k)
                    body = json.dumps(message(k, payload)).encode()
                    try:
                        async with http.post(url, data=body, headers=headers) as response:
                            await response.read()
                            status = response.status
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        tally.fail(type(exc).__name__)
                        return
                    if status not in OK:
                        tally.fail(f"HTTP {status}")
                        return
                    tally.took(t0, time.time())

            await _until(window.start_at)
            await asyncio.gather(*(produce(j, u) for j, u in enumerate(urls)))
        return tally.result()

    return run(main, loop)


def grpc_appenders(
    addr: str,
    token: str,
    run_ids: Sequence[str],
    *,
    idempotent: bool,
    window: Window,
    payload: int,
    loop: str,
) -> dict[str, Any]:
    """`http_appenders` over gRPC: one producer per external run id, each calling
    AppendEvents with one message (a `value`) at a time; `idempotent`: with producer
    fields (its own producer id, epoch 0, seq 0, 1, ...)."""

    async def main() -> dict[str, Any]:
        tally = _Appends(window)
        chans = channels(addr, len(run_ids))
        stubs = [pb_grpc.RunServiceStub(c) for c in chans]  # type: ignore[no-untyped-call]
        md = metadata(token)

        async def produce(j: int, run_id: str) -> None:
            stub = stubs[j % len(stubs)]
            for k in range(MAX_APPENDS):
                t0 = time.time()
                if t0 >= window.end:
                    return
                request = append_request(run_id, message(k, payload))
                if idempotent:
                    request.producer_id = f"producer-{j}"
                    request.producer_seq = k
                try:
                    await stub.AppendEvents(request, metadata=md, timeout=CALL_LIMIT_S)
                except grpc.aio.AioRpcError as exc:
                    tally.fail(exc.code().name)
                    return
                tally.took(t0, time.time())

        await _until(window.start_at)
        await asyncio.gather(*(produce(j, r) for j, r in enumerate(run_ids)))
        for c in chans:
            await c.close()
        return tally.result()

    return run(main, loop)


def append_request(run_id: str, *values: dict[str, Any]) -> pb.AppendEventsRequest:
    """AppendEvents of `values`, each one event with a JSON `value` (as an HTTP append
    in JSON mode makes it)."""
    events = []
    for v in values:
        value = struct_pb2.Value()
        value.struct_value.update(v)
        events.append(pb.EventInput(value=value))
    return pb.AppendEventsRequest(run_id=run_id, events=events)


# -- the bench's own process: setting streams up, and the live producer ------------------


class StreamsClient:
    """The Durable Streams calls the bench makes itself (create, fill, close, find the
    run of a stream) against one server's `/v1/streams/`, as `token`'s user."""

    def __init__(self, http: aiohttp.ClientSession, base: str, token: str) -> None:
        self.http = http
        self.base = base.rstrip("/") + "/v1/streams/"
        self.token = token

    def url(self, path: str) -> str:
        """The stream's URL."""
        return self.base + path

    async def _call(self, method: str, path: str, body: bytes, **headers: str) -> None:
        async with self.http.request(
            method, self.url(path), data=body, headers={**auth(self.token), **headers}
        ) as response:
            text = await response.text()
            if response.status not in (*OK, 201):
                raise RuntimeError(f"{method} {self.url(path)}: {response.status} {text[:300]}")

    async def create(self, path: str) -> None:
        """Creates an empty JSON-mode stream."""
        await self._call("PUT", path, b"", **{"Content-Type": JSON})

    async def append(self, path: str, values: Sequence[dict[str, Any]]) -> None:
        """Appends `values` in one POST (an array body: one message each)."""
        await self._call("POST", path, json.dumps(list(values)).encode(), **{"Content-Type": JSON})

    async def close(self, path: str) -> None:
        """Closes the stream."""
        await self._call("POST", path, b"", **{"Stream-Closed": "true"})

    async def fill(self, path: str, count: int, batch: int, payload: int) -> None:
        """Creates the stream, appends `count` messages, `batch` per POST, and closes it."""
        await self.create(path)
        for first in range(0, count, batch):
            last = min(count, first + batch)
            await self.append(path, [message(i, payload) for i in range(first, last)])
        await self.close(path)

    async def produce(
        self, path: str, *, count: int, rate: float, payload: int, start_at: float
    ) -> float:
        """Appends `count` messages, one per POST, on an absolute schedule of `rate` a
        second from `start_at` (a late append goes at once), then closes the stream; the
        rate achieved (messages/s)."""
        await _until(start_at)
        for i in range(count):
            await _until(start_at + i / rate)
            await self.append(path, [message(i, payload, time.time())])
        achieved = count / max(time.time() - start_at, 1e-9)
        await self.close(path)
        return achieved


async def grpc_produce(
    stub: Any, md: Any, run_id: str, *, count: int, rate: float, payload: int, start_at: float
) -> float:
    """`StreamsClient.produce` over gRPC: AppendEvents of one message at a time, then
    CloseRun; the rate achieved."""
    await _until(start_at)
    for i in range(count):
        await _until(start_at + i / rate)
        request = append_request(run_id, message(i, payload, time.time()))
        await stub.AppendEvents(request, metadata=md, timeout=CALL_LIMIT_S)
    achieved = count / max(time.time() - start_at, 1e-9)
    await stub.CloseRun(pb.CloseRunRequest(run_id=run_id), metadata=md, timeout=CALL_LIMIT_S)
    return achieved


async def stream_run_id(stub: Any, md: Any, path: str) -> str:
    """The id of the external run behind the caller's stream at `path` (ListRuns)."""
    token = ""
    for _ in range(LIST_PAGES):
        request = pb.ListRunsRequest(agent="external", page_size=1000, page_token=token)
        page = await stub.ListRuns(request, metadata=md, timeout=CALL_LIMIT_S)
        for r in page.runs:
            stream = r.input.fields.get("stream")
            if stream is not None and stream.string_value == path:
                return str(r.run_id)
        token = page.next_page_token
        if not token:
            break
    raise RuntimeError(f"no external run has the stream {path!r}")
