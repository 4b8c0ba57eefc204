"""Server-sent events: the framing, a stream that writes them with a bound on how long a
write may wait, and a pacer that lets a stream send heartbeats while it waits.

Framing follows what the Durable Streams suite parses (conformance/NOTES.md §3.12): an
`event:` line with a space after the colon, `data:` lines with none, the payload split on
every line break so that no payload can forge an event, and a blank line after each event.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from aiohttp import web

T = TypeVar("T")

CONTENT_TYPE = "text/event-stream"
HEARTBEAT = b": keep-alive\n\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def event(kind: str, data: str, event_id: str | None = None) -> bytes:
    """One event: `id:` (if any), `event:`, then each line of `data` on a `data:` line."""
    lines = [f"id: {event_id}\n"] if event_id is not None else []
    lines.append(f"event: {kind}\n")
    lines.extend(f"data:{line}\n" for line in _LINE_BREAK.split(data))
    lines.append("\n")
    return "".join(lines).encode()


class ClientGoneError(Exception):
    """The client of an SSE stream left, or stopped reading for longer than the stall
    timeout (`stalled`); the stream ends without another word."""

    def __init__(self, message: str, *, stalled: bool = False) -> None:
        super().__init__(message)
        self.stalled = stalled


class Stream:
    """An open SSE response. Each write is whole events (a data and control pair, a
    burst, a heartbeat) and must be taken within the stall timeout: a client that reads
    nothing for that long is dropped (its connection aborted, so nothing waits on it),
    as a gRPC stream that stalls is ended."""

    def __init__(self, request: web.Request, response: web.StreamResponse, stall: float) -> None:
        self._request = request
        self.response = response
        self._stall = stall

    @classmethod
    async def open(
        cls, request: web.Request, headers: dict[str, str], stall_timeout: float
    ) -> Stream:
        """Sends the headers at once (clients wait for them to know the stream is open):
        chunked, never compressed, and not buffered by a proxy that honours
        X-Accel-Buffering."""
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": CONTENT_TYPE,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **headers,
            },
        )
        await response.prepare(request)
        return cls(request, response, stall_timeout)

    async def send(self, data: bytes) -> None:
        """Writes `data`; ClientGoneError when the client has left or stalled."""
        try:
            async with asyncio.timeout(self._stall):
                await self.response.write(data)
        except TimeoutError:
            self._drop()
            message = f"took nothing for {self._stall:g}s and was dropped"
            raise ClientGoneError(message, stalled=True) from None
        except ConnectionError as exc:  # reset, or the transport is closing
            raise ClientGoneError(str(exc) or type(exc).__name__) from None

    async def send_last(self, data: bytes) -> None:
        """Writes a last event (an `error`), if the client still takes it."""
        with contextlib.suppress(ClientGoneError):
            await self.send(data)

    def _drop(self) -> None:
        transport = self._request.transport
        if transport is not None:
            transport.abort()


class Idle:
    """What `Paced.next` returns when no item came within its timeout."""


IDLE = Idle()


class Paced(Generic[T]):
    """Takes the items of an async iterator one at a time, giving up each wait after a
    timeout without losing the item being fetched: the fetch goes on in a task, and the
    next call waits for it again. (Cancelling the fetch would end the iterator.)"""

    def __init__(self, items: AsyncIterator[T]) -> None:
        self._items = items
        self._pending: asyncio.Task[T] | None = None

    async def next(self, within: float) -> T | Idle | None:
        """The next item; IDLE when none came within `within` seconds; None at the end."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._items))
        done, _ = await asyncio.wait({self._pending}, timeout=max(within, 0.0))
        if not done:
            return IDLE
        task, self._pending = self._pending, None
        try:
            return task.result()
        except StopAsyncIteration:
            return None

    async def aclose(self) -> None:
        """Stops the fetch in flight and closes the iterator (its `finally` runs)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            await asyncio.wait({pending})
            if not pending.cancelled():
                with contextlib.suppress(Exception):
                    pending.result()  # retrieved, so asyncio does not log it as lost
        await aclose(self._items)


async def aclose(items: object) -> None:
    """Closes an async generator (its `finally` runs: a subscription is released); other
    iterators are left as they are."""
    close = getattr(items, "aclose", None)
    if close is not None:
        await close()
