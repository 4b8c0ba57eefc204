"""Every run's log as a durable stream: `GET /v1/runs/{run_id}/events`, the read side of
the Durable Streams protocol in JSON mode (each message a RunEvent in the proto's JSON,
proto field names kept), over RunManager.subscribe: the same cursor, the same rules.

- Catch-up (no `live`): the events after the offset, a chunk bounded in count and bytes,
  never waiting: `Stream-Up-To-Date` once it reaches the committed tail, `Stream-Closed`
  once it reaches the terminal event.
- `live=long-poll`: the same, but at the tail it waits (up to the long-poll timeout) for
  the next commit; 204 when none came.
- `live=sse`: catch-up, then live, as `data` events (a JSON array, `id:` = the offset
  after it) each followed by a `control` event; heartbeats while idle; the stream ends
  after the terminal event, or after the SSE time bound (the client resumes by offset).
  With `snapshot=true` (SSE only) and no `Last-Event-ID`, a `snapshot` event comes first
  when the run has one at or after the offset: `{"seq": N, "data": ...}`, `id:` = the
  offset after seq N, where the events that follow it start.

Offsets are protocol.py's: position = the seq of the last event before it. An offset past
the tail is refused by subscribe's own rule (SEQ_OUT_OF_RANGE, HTTP 400).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from runservice import jsonmap
from runservice.api import convert
from runservice.api.auth import current_principal
from runservice.api.limits import StreamLimiter
from runservice.api.status import describe, until_expiry
from runservice.domain.errors import InvalidArgumentError, RunServiceError
from runservice.domain.model import EncodedEvent, Principal, Run, Snapshot
from runservice.runtime.manager import RunManager
from runservice.v1 import run_pb2
from runservice.web import protocol, sse
from runservice.web.problems import problem_text

logger = logging.getLogger(__name__)

JSON_TYPE = jsonmap.JSON_TYPE
CHUNK_EVENTS = 1000
CHUNK_BYTES = 1024 * 1024
"""A catch-up or long-poll answer holds at most this many events and bytes of JSON (and
one event at least, however large)."""
JSON_CACHE_BYTES = 8 * 1024 * 1024
CACHED_EVENT_BYTES = 16 * 1024
SHARED_CACHE = "private, max-age=60, stale-while-revalidate=300"  # runs are per user
TAIL_CACHE = "private, no-cache"  # may grow: revalidate (ETag) before each use
LIVE = ("long-poll", "sse")
STREAM_HEADERS = {"Cross-Origin-Resource-Policy": "cross-origin"}
"""On every read of a stream, as the protocol advises (§10.7): fetch() from another origin
may read it, where CORS allows (--http-cors-origin: server.Cors)."""


@dataclass(frozen=True)
class StreamSettings:
    """How the HTTP edge serves live reads (the options of the same names say more)."""

    long_poll_timeout: float
    sse_heartbeat: float
    sse_max_duration: float
    stall_timeout: float
    chunk_events: int = CHUNK_EVENTS
    chunk_bytes: int = CHUNK_BYTES


class EventJson:
    """A RunEvent's JSON (MessageToDict with proto field names: what grpcurl prints), made
    from its wire form. Events never change, so the text of small ones is kept, bounded
    in bytes, for the many readers of one run that ask for the same events."""

    def __init__(self, budget: int = JSON_CACHE_BYTES) -> None:
        self._texts: OrderedDict[bytes, str] = OrderedDict()
        self._budget = budget
        self._used = 0

    def __call__(self, wire: bytes) -> str:
        """The JSON text of the event whose wire form is `wire`."""
        text = self._texts.get(wire)
        if text is not None:
            self._texts.move_to_end(wire)
            return text
        text = jsonmap.to_text(run_pb2.RunEvent.FromString(wire))
        if len(wire) <= CACHED_EVENT_BYTES:
            self._keep(wire, text)
        return text

    def _keep(self, wire: bytes, text: str) -> None:
        self._texts[wire] = text
        self._used += len(wire) + len(text)
        while self._used > self._budget:
            old_wire, old_text = self._texts.popitem(last=False)
            self._used -= len(old_wire) + len(old_text)


@dataclass
class Chunk:
    """Consecutive events read after a position, as JSON texts."""

    after: int
    texts: list[str] = field(default_factory=list)
    last: int = 0  # the seq of the last event (or `after` when there is none)
    terminal: bool = False
    size: int = 0

    def __post_init__(self) -> None:
        self.last = self.last or self.after

    def add(
        self,
        batch: Sequence[EncodedEvent],
        to_json: EventJson,
        max_events: int | None = None,
        max_bytes: int | None = None,
    ) -> bool:
        """Appends the events of a batch, stopping at the bounds (always one event at
        least); True when a bound stopped it."""
        for event in batch:
            text = to_json(event.wire)
            full = (max_events is not None and len(self.texts) >= max_events) or (
                max_bytes is not None and self.size + len(text) > max_bytes
            )
            if full and self.texts:
                return True
            self.texts.append(text)
            self.size += len(text) + 1
            self.last = event.seq
            self.terminal = event.terminal
        return False

    def body(self) -> str:
        """The JSON array of the events."""
        return "[" + ",".join(self.texts) + "]"


@contextlib.asynccontextmanager
async def _closing(items: AsyncIterator[object]) -> AsyncIterator[None]:
    """Closes an async generator on the way out, so its subscription is released."""
    try:
        yield
    finally:
        await sse.aclose(items)


class RunEvents:
    """The handlers of `/v1/runs/{run_id}/events` (GET, HEAD)."""

    def __init__(
        self, manager: RunManager, streams: StreamLimiter, settings: StreamSettings
    ) -> None:
        self._manager = manager
        self._streams = streams
        self._settings = settings
        self._json = EventJson()
        self._limits = (settings.chunk_events, settings.chunk_bytes)

    @staticmethod
    def mode(request: web.Request) -> str:
        """`catch-up`, `long-poll` or `sse` (for metrics); InvalidArgumentError otherwise."""
        live = request.query.getall("live", [])
        if not live:
            return "catch-up"
        if len(live) > 1 or live[0] not in LIVE:
            raise InvalidArgumentError("live", "must be long-poll or sse (or absent: catch-up)")
        return live[0]

    async def head(self, request: web.Request) -> web.StreamResponse:
        """The stream's metadata: its tail offset, and whether it is closed."""
        run = await self._run(request)
        headers = {
            "Content-Type": JSON_TYPE,
            protocol.NEXT_OFFSET: protocol.format_offset(run.last_seq),
            "Cache-Control": "no-store",
            **STREAM_HEADERS,
        }
        if run.state.terminal:
            headers[protocol.CLOSED] = "true"
        return web.Response(headers=headers)

    async def get(self, request: web.Request) -> web.StreamResponse:
        """A read in the mode the query asks for."""
        mode = self.mode(request)
        snapshot = _snapshot_param(request)
        if mode == "sse":
            return await self._sse(request, snapshot=snapshot)
        if snapshot:
            raise InvalidArgumentError(
                "snapshot", "is only for live=sse (catch-up and long-poll answer events alone)"
            )
        response = await self._get(request, mode)
        response.headers.update(STREAM_HEADERS)
        return response

    async def _get(self, request: web.Request, mode: str) -> web.StreamResponse:
        offset = protocol.offset_param(
            request.query.getall("offset", []), required=mode != "catch-up"
        )
        run = await self._run(request)
        after = offset.at(run.last_seq)
        if mode == "long-poll" and after == run.last_seq:
            return await self._long_poll(request, run)
        chunk = await self._read(current_principal(), run, after)
        up_to_date = chunk.last >= run.last_seq
        closed = chunk.terminal or (up_to_date and run.state.terminal)
        headers = _read_headers(chunk, up_to_date=up_to_date, closed=closed)
        if mode == "long-poll" and not closed:
            headers[protocol.CURSOR] = protocol.next_cursor(request.query.get("cursor"))
        if offset.position is None:  # offset=now: the tail, which moves
            headers["Cache-Control"] = "no-store"
        else:
            headers["ETag"] = f'"{run.run_id}:{after}:{chunk.last}{":c" if closed else ""}"'
            headers["Cache-Control"] = SHARED_CACHE if closed or not up_to_date else TAIL_CACHE
            if request.headers.get("If-None-Match") == headers["ETag"]:
                return web.Response(status=304, headers=headers)
        return web.Response(
            body=chunk.body().encode(), headers={**headers, "Content-Type": JSON_TYPE}
        )

    # -- reading -----------------------------------------------------------------------

    async def _run(self, request: web.Request) -> Run:
        run_id = convert.run_id_from_proto(request.match_info["run_id"])
        return await self._manager.get_run(current_principal(), run_id)

    async def _read(self, principal: Principal, run: Run, after: int) -> Chunk:
        """The committed events after `after`, up to the tail `run` had, within a chunk's
        bounds; nothing (without waiting) at the tail. Past the tail: subscribe refuses."""
        chunk = Chunk(after)
        if after == run.last_seq:
            return chunk
        batches = await self._manager.subscribe(principal, run.run_id, after + 1)
        async with _closing(batches):
            async for batch in batches:
                if chunk.add(batch, self._json, *self._limits) or chunk.last >= run.last_seq:
                    break
        return chunk

    async def _long_poll(self, request: web.Request, run: Run) -> web.StreamResponse:
        """At the tail: the next commit's events, or 204 after the timeout (at once for a
        finished run)."""
        after = run.last_seq
        headers = {protocol.NEXT_OFFSET: protocol.format_offset(after), protocol.UP_TO_DATE: "true"}
        if run.state.terminal:
            return web.Response(status=204, headers={**headers, protocol.CLOSED: "true"})
        headers[protocol.CURSOR] = protocol.next_cursor(request.query.get("cursor"))
        headers["Cache-Control"] = "no-store"
        principal = current_principal()
        chunk = Chunk(after)
        with self._streams.hold(principal.user):
            batches = await self._manager.subscribe(principal, run.run_id, after + 1)
            async with _closing(batches):
                with contextlib.suppress(TimeoutError, StopAsyncIteration):
                    async with asyncio.timeout(_wait_for(request, self._settings)):
                        chunk.add(await anext(batches), self._json, *self._limits)
        if not chunk.texts:
            return web.Response(status=204, headers=headers)
        now = await self._manager.get_run(principal, run.run_id)
        up_to_date = chunk.last >= now.last_seq
        closed = chunk.terminal
        headers = _read_headers(chunk, up_to_date=up_to_date, closed=closed)
        if not closed:
            headers[protocol.CURSOR] = protocol.next_cursor(request.query.get("cursor"))
        headers["Cache-Control"] = SHARED_CACHE if closed or not up_to_date else TAIL_CACHE
        return web.Response(
            body=chunk.body().encode(), headers={**headers, "Content-Type": JSON_TYPE}
        )

    # -- SSE ---------------------------------------------------------------------------

    async def _sse(self, request: web.Request, *, snapshot: bool) -> web.StreamResponse:
        """Catch-up then live as SSE, until the terminal event or the time bound. A
        browser's EventSource reconnects with `Last-Event-ID` (the offset of the last data
        event it got), which wins over the URL's offset; at the end of a finished run the
        answer is 204, which tells EventSource to stop reconnecting. With `snapshot`, the
        run's latest snapshot comes first if it reaches the offset, unless the request
        resumes (Last-Event-ID): a client that resumes has the state, and needs the rest."""
        resume = request.headers.get("Last-Event-ID", "").strip()
        if resume:
            offset = protocol.parse_offset(resume, "Last-Event-ID")
        else:
            offset = protocol.offset_param(request.query.getall("offset", []), required=True)
        run = await self._run(request)
        after = offset.at(run.last_seq)
        if after == run.last_seq and run.state.terminal:
            headers = {
                protocol.NEXT_OFFSET: protocol.format_offset(after),
                protocol.UP_TO_DATE: "true",
                protocol.CLOSED: "true",
                **STREAM_HEADERS,
            }
            return web.Response(status=204, headers=headers)
        principal = current_principal()
        with self._streams.hold(principal.user):
            batches = await self._manager.subscribe(
                principal, run.run_id, after + 1, snapshot=snapshot and not resume
            )
            async with _closing(batches):
                stream = await sse.Stream.open(
                    request, STREAM_HEADERS, self._settings.stall_timeout
                )
                follower = _Follower(self._manager, self._json, self._settings, run, after)
                await follower.serve(stream, until_expiry(batches, principal), request)
                return stream.response


class _Follower:
    """Writes one SSE response of a run's events: a data and a control event per batch,
    heartbeats while idle, until the terminal event or the time bound."""

    def __init__(
        self,
        manager: RunManager,
        to_json: EventJson,
        settings: StreamSettings,
        run: Run,
        after: int,
    ) -> None:
        self._manager = manager
        self._json = to_json
        self._settings = settings
        self._run_id = run.run_id
        self._position = after
        self._tail = run.last_seq  # the committed tail as last known
        self._cursor: str | None = None

    async def serve(
        self,
        stream: sse.Stream,
        batches: AsyncIterator[Snapshot | Sequence[EncodedEvent]],
        request: web.Request,
    ) -> None:
        """Writes until the end; every way out closes `batches` (and its subscription).
        An error (an expired token, a store that failed) ends it with an `error` event."""
        self._cursor = request.query.get("cursor")
        paced = sse.Paced(batches)
        try:
            await self._follow(stream, paced)
        except sse.ClientGoneError as exc:
            level = logging.INFO if exc.stalled else logging.DEBUG
            logger.log(level, "an SSE stream of run %s ended: the client %s", self._run_id, exc)
        except Exception as exc:
            await stream.send_last(sse.event("error", problem_text(describe(exc))))
        finally:
            await paced.aclose()

    async def _follow(
        self, stream: sse.Stream, paced: sse.Paced[Snapshot | Sequence[EncodedEvent]]
    ) -> None:
        settings = self._settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.sse_max_duration
        if self._position == self._tail:  # offset=now, or at the tail: say where it is
            await stream.send(self._control(up_to_date=True, closed=False))
        while (left := deadline - loop.time()) > 0:
            batch = await paced.next(min(settings.sse_heartbeat, left))
            if batch is None:
                return
            if isinstance(batch, sse.Idle):
                await stream.send(sse.HEARTBEAT)
                continue
            if isinstance(batch, Snapshot):
                await self._send_snapshot(stream, batch)
                continue
            chunk = Chunk(self._position)
            chunk.add(batch, self._json)
            self._position = chunk.last
            up_to_date = await self._reached_tail()
            data = sse.event("data", chunk.body(), protocol.format_offset(chunk.last))
            await stream.send(data + self._control(up_to_date=up_to_date, closed=chunk.terminal))
            if chunk.terminal:
                return

    async def _send_snapshot(self, stream: sse.Stream, snapshot: Snapshot) -> None:
        """A `snapshot` event, `id:` the offset after its seq (where the events that follow
        start), and a control event."""
        self._position = snapshot.seq
        up_to_date = await self._reached_tail()
        data = f'{{"seq":{snapshot.seq},"data":{snapshot.data}}}'
        event = sse.event("snapshot", data, protocol.format_offset(snapshot.seq))
        await stream.send(event + self._control(up_to_date=up_to_date, closed=False))

    async def _reached_tail(self) -> bool:
        """Whether the position is the committed tail. Read again (from memory) while the
        run is in this server's memory; otherwise the tail this stream last knew, which is
        only advisory while following live (SSE clients follow on regardless)."""
        if self._position >= self._tail and self._manager.in_memory(self._run_id):
            with contextlib.suppress(RunServiceError):
                run = await self._manager.get_run(current_principal(), self._run_id)
                self._tail = run.last_seq
        self._tail = max(self._tail, self._position)
        return self._position >= self._tail

    def _control(self, *, up_to_date: bool, closed: bool) -> bytes:
        offset = protocol.format_offset(self._position)
        cursor = protocol.next_cursor(self._cursor)
        return sse.event(
            "control", protocol.control(offset, cursor, up_to_date=up_to_date, closed=closed)
        )


def _read_headers(chunk: Chunk, *, up_to_date: bool, closed: bool) -> dict[str, str]:
    headers = {protocol.NEXT_OFFSET: protocol.format_offset(chunk.last)}
    if up_to_date:
        headers[protocol.UP_TO_DATE] = "true"
    if closed:
        headers[protocol.CLOSED] = "true"
    return headers


def _snapshot_param(request: web.Request) -> bool:
    """The `snapshot` query parameter: true or false (absent: false)."""
    values = request.query.getall("snapshot", [])
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false"):
        raise InvalidArgumentError("snapshot", "must be true or false, given once")
    return values[0] == "true"


def _wait_for(request: web.Request, settings: StreamSettings) -> float:
    """How long a long-poll waits: the `timeout` query parameter (seconds), at most the
    server's long-poll timeout."""
    text = request.query.get("timeout")
    if text is None:
        return settings.long_poll_timeout
    try:
        asked = float(text)
    except ValueError:
        asked = -1.0
    if not 0 < asked < float("inf"):
        raise InvalidArgumentError("timeout", "must be a positive number of seconds")
    return min(asked, settings.long_poll_timeout)
