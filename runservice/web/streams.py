"""`/v1/streams/{path}`: the whole Durable Streams protocol, each stream an external run
(runtime/streams.py) of its caller. PUT creates (or forks), POST appends and closes, GET
reads (catch-up, long-poll, SSE), HEAD tells the tail, DELETE deletes.

A stream's path is its caller's: two users may each have a stream at one path. Its
offsets are its run's seqs (protocol.py); the run's own lifecycle events take positions
but carry no data, so an empty stream's tail is `..._0000000000000001`.

Messages: in JSON mode (`application/json`) each JSON value of an append is one event
(`value`), and an array body is flattened one level; otherwise each append is one event of
bytes (`text` for `text/*` content that is UTF-8, `binary` otherwise). Reads give back the
bytes, or the JSON array of the messages.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from google.protobuf import json_format

from runservice import jsonmap
from runservice.api.auth import current_principal
from runservice.api.limits import StreamLimiter
from runservice.api.status import describe
from runservice.domain.errors import (
    InvalidArgumentError,
    ProducerEpochStaleError,
    ProducerSeqGapError,
    RunServiceError,
    StreamClosedError,
    StreamError,
)
from runservice.domain.model import EncodedEvent
from runservice.domain.streams import MAX_SAFE_INTEGER, ProducerClaim, is_json, is_text
from runservice.runtime.manager import RunManager
from runservice.runtime.streams import (
    AppendAsk,
    CreateAsk,
    ExternalRuns,
    Message,
    Outcome,
    bytes_message,
)
from runservice.v1 import run_pb2
from runservice.web import protocol, sse
from runservice.web.events import STREAM_HEADERS, RunEvents, StreamSettings
from runservice.web.problems import problem_response

PREFIX = "/v1/streams/"
TTL = "Stream-TTL"
EXPIRES_AT = "Stream-Expires-At"
SEQ = "Stream-Seq"
FORKED_FROM = "Stream-Forked-From"
FORK_OFFSET = "Stream-Fork-Offset"
FORK_SUB_OFFSET = "Stream-Fork-Sub-Offset"
PRODUCER_ID = "Producer-Id"
PRODUCER_EPOCH = "Producer-Epoch"
PRODUCER_SEQ = "Producer-Seq"
EXPECTED_SEQ = "Producer-Expected-Seq"
RECEIVED_SEQ = "Producer-Received-Seq"
SSE_ENCODING = "Stream-SSE-Data-Encoding"
_WHOLE = re.compile(r"0|[1-9][0-9]*")
_DIGITS = re.compile(r"[0-9]+")
_FORK_OFFSET = re.compile(r"[0-9]+_[0-9]+")
MAX_PATH = 1024
T = TypeVar("T")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class StreamRoutes:
    """The handlers of `/v1/streams/{path}`."""

    def __init__(
        self, manager: RunManager, streams: StreamLimiter, settings: StreamSettings
    ) -> None:
        self._manager = manager
        self._streams = streams
        self._settings = settings

    def _external(self) -> ExternalRuns:
        external = self._manager.external
        if external is None:
            raise InvalidArgumentError("path", "this server keeps no streams")
        return external

    # -- PUT: create -----------------------------------------------------------------------

    async def put(self, request: web.Request) -> web.StreamResponse:
        """Creates the stream (201), or finds it as asked (200)."""
        try:
            path = _path(request)
            ask = await _create_ask(request)
            outcome = await self._external().create(current_principal(), path, ask)
        except RunServiceError as exc:
            return _refusal(exc)
        headers = _tail_headers(outcome)
        headers["Content-Type"] = outcome.record.content_type
        if outcome.created:
            headers["Location"] = str(request.url.with_query(None))
            return web.Response(status=201, headers=headers)
        return web.Response(status=200, headers=headers)

    # -- POST: append, close -------------------------------------------------------------

    async def post(self, request: web.Request) -> web.StreamResponse:
        """Appends (204; 200 for a producer's new append), closes, or both."""
        try:
            path = _path(request)
            producer = _producer(request)
            close = _flag(request, protocol.CLOSED)
            body = await request.read()
            external = self._external()
            principal = current_principal()
            try:
                messages = _append_messages(request, body, close)
            except InvalidArgumentError:
                await external.open(principal, path, touch=False)  # missing: 404
                raise
            ask = AppendAsk(
                messages=messages,
                close=close,
                producer=producer,
                stream_seq=request.headers.get(SEQ),
                content_type=request.headers.get("Content-Type"),
            )
            outcome = await external.append(principal, ask, path=path)
        except RunServiceError as exc:
            return _refusal(exc)
        headers = _tail_headers(outcome)
        state = outcome.producer
        if producer is not None:
            headers[PRODUCER_EPOCH] = str(state.epoch if state else producer.epoch)
            headers[PRODUCER_SEQ] = str(state.seq if state else producer.seq)
        fresh = producer is not None and not outcome.duplicate and messages
        return web.Response(status=200 if fresh else 204, headers=headers)

    # -- HEAD, DELETE ----------------------------------------------------------------------

    async def head(self, request: web.Request) -> web.StreamResponse:
        """The stream's tail and configuration; it does not count as an access."""
        try:
            outcome = await self._external().open(current_principal(), _path(request), touch=False)
        except RunServiceError as exc:
            return _refusal(exc)
        record = outcome.record
        headers = _tail_headers(outcome)
        headers.update({"Content-Type": record.content_type, "Cache-Control": "no-store"})
        headers["ETag"] = _etag(outcome, 0, outcome.run.last_seq, closed=outcome.closed)
        if record.ttl_s is not None:
            headers[TTL] = str(record.ttl_s)
        if record.expires_us is not None:
            at = datetime.fromtimestamp(record.expires_us / 1_000_000, UTC)
            headers[EXPIRES_AT] = at.isoformat().replace("+00:00", "Z")
        return web.Response(status=200, headers=headers)

    async def delete(self, request: web.Request) -> web.StreamResponse:
        """Deletes the stream (open or closed)."""
        try:
            await self._external().delete(current_principal(), path=_path(request))
        except RunServiceError as exc:
            return _refusal(exc)
        return web.Response(status=204)

    # -- GET -------------------------------------------------------------------------------

    async def get(self, request: web.Request) -> web.StreamResponse:
        """A read: catch-up, `live=long-poll` or `live=sse`."""
        try:
            mode = RunEvents.mode(request)
            if mode == "sse" and request.headers.get("Last-Event-ID", "").strip():
                offset = protocol.parse_offset(
                    request.headers["Last-Event-ID"].strip(), "Last-Event-ID"
                )
            else:
                offset = protocol.offset_param(
                    request.query.getall("offset", []), required=mode != "catch-up"
                )
            outcome = await self._external().open(current_principal(), _path(request), touch=True)
            if mode == "sse":
                return await self._sse(request, outcome, offset.at(outcome.run.last_seq))
            if mode == "long-poll":
                return await self._long_poll(request, outcome, offset)
            return await self._catch_up(request, outcome, offset)
        except RunServiceError as exc:
            return _refusal(exc)

    async def _catch_up(
        self, request: web.Request, outcome: Outcome, offset: protocol.Offset
    ) -> web.StreamResponse:
        tail = outcome.run.last_seq
        after = min(offset.at(tail), tail)
        chunk = await self._read(outcome, after, tail)
        headers = self._read_headers(outcome, chunk, tail)
        if offset.position is None:
            headers["Cache-Control"] = "no-store"
        else:
            headers["ETag"] = _etag(
                outcome, after, chunk.last, closed=_closed(outcome, chunk, tail)
            )
            headers["Cache-Control"] = "private, no-cache"
            if request.headers.get("If-None-Match") == headers["ETag"]:
                return web.Response(status=304, headers=headers)
        return web.Response(body=chunk.body(outcome), headers=headers)

    async def _long_poll(
        self, request: web.Request, outcome: Outcome, offset: protocol.Offset
    ) -> web.StreamResponse:
        tail = outcome.run.last_seq
        after = min(offset.at(tail), tail)
        cursor = protocol.next_cursor(request.query.get("cursor"))
        if after < tail:
            chunk = await self._read(outcome, after, tail)
            if chunk.data or chunk.terminal:
                return self._live_answer(outcome, chunk, tail, cursor)
            after = chunk.last
        if outcome.closed:
            return web.Response(status=204, headers=self._at_tail(after, closed=True))
        principal = current_principal()
        chunk = _Chunk(after)
        with self._streams.hold(principal.user):
            batches = await self._manager.subscribe(principal, outcome.run.run_id, after + 1)
            try:
                async with asyncio.timeout(self._settings.long_poll_timeout):
                    async for batch in batches:
                        chunk.add(batch, self._settings.chunk_bytes)
                        if chunk.data or chunk.terminal:
                            break
            except TimeoutError:
                pass
            finally:
                await sse.aclose(batches)
        if not chunk.data:
            headers = self._at_tail(chunk.last, closed=chunk.terminal)
            if not chunk.terminal:
                headers[protocol.CURSOR] = cursor
            return web.Response(status=204, headers=headers)
        return self._live_answer(outcome, chunk, chunk.last, cursor)

    def _live_answer(self, outcome: Outcome, chunk: _Chunk, tail: int, cursor: str) -> web.Response:
        headers = self._read_headers(outcome, chunk, tail)
        headers["Cache-Control"] = "no-store"
        if not chunk.terminal:
            headers[protocol.CURSOR] = cursor
        return web.Response(body=chunk.body(outcome), headers=headers)

    def _at_tail(self, position: int, *, closed: bool) -> dict[str, str]:
        headers = {
            protocol.NEXT_OFFSET: protocol.format_offset(position),
            protocol.UP_TO_DATE: "true",
            "Cache-Control": "no-store",
            **STREAM_HEADERS,
        }
        if closed:
            headers[protocol.CLOSED] = "true"
        return headers

    def _read_headers(self, outcome: Outcome, chunk: _Chunk, tail: int) -> dict[str, str]:
        headers = {
            "Content-Type": outcome.record.content_type,
            protocol.NEXT_OFFSET: protocol.format_offset(chunk.last),
            **STREAM_HEADERS,
        }
        if chunk.last >= tail:
            headers[protocol.UP_TO_DATE] = "true"
        if _closed(outcome, chunk, tail):
            headers[protocol.CLOSED] = "true"
        return headers

    async def _read(self, outcome: Outcome, after: int, tail: int) -> _Chunk:
        """The events after `after`, up to `tail`, within a chunk's bounds."""
        chunk = _Chunk(after)
        if after >= tail:
            return chunk
        principal = current_principal()
        batches = await self._manager.subscribe(principal, outcome.run.run_id, after + 1)
        try:
            async for batch in batches:
                full = chunk.add(batch, self._settings.chunk_bytes, until=tail)
                if full or chunk.last >= tail:
                    break
        finally:
            await sse.aclose(batches)
        return chunk

    # -- SSE -------------------------------------------------------------------------------

    async def _sse(self, request: web.Request, outcome: Outcome, after: int) -> web.StreamResponse:
        tail = outcome.run.last_seq
        after = min(after, tail)
        principal = current_principal()
        record = outcome.record
        binary = not (is_json(record.content_type) or is_text(record.content_type))
        headers = dict(STREAM_HEADERS)
        if binary:
            headers[SSE_ENCODING] = "base64"
        writer = _SseWriter(record.content_type, binary, request.query.get("cursor"), after, tail)
        with self._streams.hold(principal.user):
            stream = await sse.Stream.open(request, headers, self._settings.stall_timeout)
            if after >= tail:
                await stream.send(writer.control(closed=outcome.closed))
                if outcome.closed:
                    return stream.response
            batches = await self._manager.subscribe(principal, outcome.run.run_id, after + 1)
            paced = sse.Paced(batches)
            try:
                await self._follow(stream, paced, writer)
            except sse.ClientGoneError:
                pass
            finally:
                await paced.aclose()
        return stream.response

    async def _follow(
        self,
        stream: sse.Stream,
        paced: sse.Paced[Sequence[EncodedEvent]],
        writer: _SseWriter,
    ) -> None:
        settings = self._settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.sse_max_duration
        while (left := deadline - loop.time()) > 0:
            batch = await paced.next(min(settings.sse_heartbeat, left))
            if batch is None:
                return
            if isinstance(batch, sse.Idle):
                await stream.send(sse.HEARTBEAT)
                continue
            out = writer.batch(batch)
            if out:
                await stream.send(out)
            if writer.closed:
                return


@dataclass
class _Chunk:
    """Events read after a position: the data ones as payloads."""

    after: int
    data: list[run_pb2.RunEvent] = field(default_factory=list)
    last: int = 0
    terminal: bool = False
    size: int = 0

    def __post_init__(self) -> None:
        self.last = self.last or self.after

    def add(self, batch: Sequence[EncodedEvent], max_bytes: int, until: int | None = None) -> bool:
        """Takes the batch's events (up to seq `until`); True when the byte bound stopped it."""
        for encoded in batch:
            if until is not None and encoded.seq > until:
                return False
            if self.data and self.size + len(encoded.wire) > max_bytes:
                return True
            event = run_pb2.RunEvent.FromString(encoded.wire)
            if event.WhichOneof("payload") is not None and not event.type.startswith("run."):
                self.data.append(event)
                self.size += len(encoded.wire)
            self.last = encoded.seq
            self.terminal = encoded.terminal
        return False

    def body(self, outcome: Outcome) -> bytes:
        """The bytes of the messages, or their JSON array."""
        if outcome.record.json_mode:
            return ("[" + ",".join(_json_text(e) for e in self.data) + "]").encode()
        return b"".join(_bytes(e) for e in self.data)


class _SseWriter:
    """Turns a stream's events into SSE: a data event per message event, each followed
    by its control event; upToDate once at the tail; streamClosed at the end."""

    def __init__(
        self, content_type: str, binary: bool, cursor: str | None, after: int, tail: int
    ) -> None:
        self._json = is_json(content_type)
        self._binary = binary
        self._cursor = cursor
        self._position = after
        self._tail = tail
        self._controlled = after  # the offset of the last control sent
        self.closed = False

    def control(self, *, closed: bool) -> bytes:
        """The control event at the current position."""
        self._controlled = self._position
        self.closed = closed
        up_to_date = self._position >= self._tail
        cursor = None if closed else protocol.next_cursor(self._cursor)
        if cursor is not None:
            self._cursor = cursor
        text = protocol.control(
            protocol.format_offset(self._position), cursor, up_to_date=up_to_date, closed=closed
        )
        return sse.event("control", text)

    def batch(self, batch: Sequence[EncodedEvent]) -> bytes:
        """The events of a batch as one write."""
        out: list[bytes] = []
        for encoded in batch:
            event = run_pb2.RunEvent.FromString(encoded.wire)
            self._position = encoded.seq
            self._tail = max(self._tail, encoded.seq)
            if encoded.terminal:
                out.append(self.control(closed=True))
                break
            if event.WhichOneof("payload") is None or event.type.startswith("run."):
                continue
            out.append(sse.event("data", self._data(event)))
            out.append(self.control(closed=False))
        if not self.closed and self._position > self._controlled and self._position >= self._tail:
            out.append(self.control(closed=False))
        return b"".join(out)

    def _data(self, event: run_pb2.RunEvent) -> str:
        if self._json:
            return "[" + _json_text(event) + "]"
        if self._binary:
            return base64.b64encode(_bytes(event)).decode()
        return _bytes(event).decode("utf-8", "replace")


# -- requests ---------------------------------------------------------------------------------


def _path(request: web.Request) -> str:
    path = request.match_info["path"]
    if not path or len(path) > MAX_PATH or _CONTROL.search(path):
        raise InvalidArgumentError("path", f"must be 1 to {MAX_PATH} printable characters")
    return path


def _flag(request: web.Request, name: str) -> bool:
    return request.headers.get(name, "").strip().lower() == "true"


def _whole(request: web.Request, name: str, pattern: re.Pattern[str] = _WHOLE) -> int | None:
    text = request.headers.get(name)
    if text is None:
        return None
    if not pattern.fullmatch(text.strip()) or int(text) > MAX_SAFE_INTEGER:
        raise InvalidArgumentError(name, "must be a whole number, without sign or leading zeros")
    return int(text)


def _producer(request: web.Request) -> ProducerClaim | None:
    names = (PRODUCER_ID, PRODUCER_EPOCH, PRODUCER_SEQ)
    given = [name for name in names if name in request.headers]
    if not given:
        return None
    if len(given) != len(names):
        raise InvalidArgumentError("Producer-Id", "send Producer-Id, -Epoch and -Seq together")
    producer_id = request.headers[PRODUCER_ID]
    if not producer_id:
        raise InvalidArgumentError(PRODUCER_ID, "must not be empty")
    epoch = _whole(request, PRODUCER_EPOCH, _DIGITS)
    seq = _whole(request, PRODUCER_SEQ, _DIGITS)
    assert epoch is not None and seq is not None
    return ProducerClaim(producer_id, epoch, seq)


def _fork_source(text: str) -> str:
    """A Stream-Forked-From value as a path of the caller's namespace: a URL or an absolute
    path under /v1/streams/ names that stream; any other path is taken as a stream path."""
    if "://" in text:
        text = "/" + text.split("://", 1)[1].partition("/")[2]
    if text.startswith(PREFIX):
        return text[len(PREFIX) :]
    return text.lstrip("/")


async def _create_ask(request: web.Request) -> CreateAsk:
    ttl = _whole(request, TTL)
    expires_us = None
    if EXPIRES_AT in request.headers:
        if ttl is not None:
            raise InvalidArgumentError(EXPIRES_AT, f"give {TTL} or {EXPIRES_AT}, not both")
        try:
            at = datetime.fromisoformat(request.headers[EXPIRES_AT].strip())
        except ValueError:
            raise InvalidArgumentError(EXPIRES_AT, "must be an RFC 3339 timestamp") from None
        if at.tzinfo is None:
            raise InvalidArgumentError(EXPIRES_AT, "must give its time zone (Z or +00:00)")
        expires_us = int(at.timestamp() * 1_000_000)
    sub = _whole(request, FORK_SUB_OFFSET)
    fork_from = request.headers.get(FORKED_FROM)
    fork_seq = None
    if fork_from is None:
        if sub is not None or FORK_OFFSET in request.headers:
            raise InvalidArgumentError(FORK_SUB_OFFSET, f"only with {FORKED_FROM}")
    else:
        fork_from = _fork_source(fork_from.strip())
        if FORK_OFFSET in request.headers:
            text = request.headers[FORK_OFFSET].strip()
            if not _FORK_OFFSET.fullmatch(text):
                raise InvalidArgumentError(FORK_OFFSET, "must be an offset this server returned")
            fork_seq = protocol.parse_offset(text, FORK_OFFSET).at(0)
    content_type = request.headers.get("Content-Type")
    body = await request.read()
    messages: list[Message] = []
    if body:
        kind = content_type or "application/octet-stream"
        messages = _json_messages(body, allow_empty=True) if is_json(kind) else []
        if not is_json(kind):
            messages = [bytes_message(kind, body)]
    return CreateAsk(
        content_type=content_type,
        ttl_s=ttl,
        expires_us=expires_us,
        closed=_flag(request, protocol.CLOSED),
        body=messages,
        fork_from=fork_from,
        fork_seq=fork_seq,
        fork_sub=sub or 0,
    )


def _append_messages(request: web.Request, body: bytes, close: bool) -> list[Message]:
    if not body:
        if close:
            return []
        raise InvalidArgumentError("body", "empty: send data, or Stream-Closed: true to close")
    content_type = request.headers.get("Content-Type")
    if not content_type:
        raise InvalidArgumentError("Content-Type", "required with a body")
    if is_json(content_type):
        return _json_messages(body, allow_empty=False)
    return [bytes_message(content_type, body)]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_messages(body: bytes, *, allow_empty: bool) -> list[Message]:
    """The messages of a JSON body: an array's elements, or the one value."""
    try:
        value = json.loads(body.decode(), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError):
        raise InvalidArgumentError("body", "must be JSON (UTF-8)") from None
    values = value if isinstance(value, list) else [value]
    if not values and not allow_empty:
        raise InvalidArgumentError("body", "an empty array appends nothing")
    return [Message(value=json.dumps(v, separators=(",", ":"), ensure_ascii=False)) for v in values]


# -- responses --------------------------------------------------------------------------------


def _tail_headers(outcome: Outcome) -> dict[str, str]:
    headers = {protocol.NEXT_OFFSET: protocol.format_offset(outcome.run.last_seq)}
    if outcome.closed:
        headers[protocol.CLOSED] = "true"
    return headers


def _closed(outcome: Outcome, chunk: _Chunk, tail: int) -> bool:
    return chunk.terminal or (chunk.last >= tail and outcome.closed)


def _etag(outcome: Outcome, after: int, last: int, *, closed: bool) -> str:
    return f'"{outcome.run.run_id}:{after}:{last}{":c" if closed else ""}"'


def _json_text(event: run_pb2.RunEvent) -> str:
    """The message of an event as JSON (whole numbers as integers, as they were sent)."""
    kind = event.WhichOneof("payload")
    if kind == "value":
        return jsonmap.dumps(jsonmap.whole_numbers(json_format.MessageToDict(event.value)))
    if kind == "data":
        return jsonmap.dumps(jsonmap.whole_numbers(json_format.MessageToDict(event.data)))
    if kind == "text":
        return jsonmap.dumps(event.text)
    return jsonmap.dumps(base64.b64encode(event.binary).decode())


def _bytes(event: run_pb2.RunEvent) -> bytes:
    kind = event.WhichOneof("payload")
    if kind == "binary":
        return event.binary
    if kind == "text":
        return event.text.encode()
    return _json_text(event).encode()


def _refusal(exc: RunServiceError) -> web.Response:
    """The protocol's status for a refusal, with its headers; the body a problem+json."""
    found = describe(exc)
    if not isinstance(exc, StreamError):
        return problem_response(found)
    headers = dict(exc.headers)
    if isinstance(exc, StreamClosedError):
        headers[protocol.CLOSED] = "true"
        headers[protocol.NEXT_OFFSET] = protocol.format_offset(exc.last_seq)
    elif isinstance(exc, ProducerEpochStaleError):
        headers[PRODUCER_EPOCH] = str(exc.current)
    elif isinstance(exc, ProducerSeqGapError):
        headers[EXPECTED_SEQ] = str(exc.expected)
        headers[RECEIVED_SEQ] = str(exc.received)
    return problem_response(found, exc.http_status, headers)
