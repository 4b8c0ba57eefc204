"""The isolation scenario's load clients: a paced victim and one abuser, each in a worker
process of its own (see `Workers`), run at the same time, phase by phase.

The two coordinate through a `Handshake` of two cross-process events, not through sleeps:
the abuser sets up its abuse (streams held open, runs started), sets `ready` and keeps
abusing until the victim sets `done`; the victim measures only once `ready` is set. So
every victim call of a phase overlaps the abuse, and if the two were ever run one after
the other (too few workers), the first would time out waiting instead of measuring
nothing.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.agents import ticks
from bench.clients import channels, metadata, run, struct
from runservice.config import Settings
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

PHASES = {
    "quiet": "no abuse",
    "oversize": "oversize messages",
    "metadata": "metadata flood",
    "streams": "too many streams",
    "unread": "unread streams",
}
"""Each phase and what the abuser does: the victim alone first (the baseline), then each
abuse in turn."""

CALL_DEADLINE_S = 5.0  # every victim and abuser call; a starved victim call ends at this
ABUSE_CALLERS = 8  # concurrent loops of a repeated abuse (oversize, metadata, streams)
HOLD_S = 900.0  # how long the abuser's runs may hold; each is stopped when its phase ends
STOP_DEADLINE_S = 60.0  # StopRun returns once the run has ended: before the next phase
KB = 1024

# The default limits the isolation server keeps, and how far past them the abuser goes.
LIMITS = Settings()
OVERSIZE_BYTES = LIMITS.max_receive_message_size + 64 * KB
FLOOD_HEADER_VALUE = 200  # bytes per flood header; gRPC counts name + value + 32 each
FLOOD_HEADERS = 2 * LIMITS.max_metadata_size // FLOOD_HEADER_VALUE  # twice the limit

# The run the unread streams follow: 50 ticks/s of 32 KiB each, well under what the
# writer commits, so the phase measures unread streams, not an overloaded writer.
BUSY_RUN = {"count": 100_000, "interval": 0.02, "size": 32 * KB}
VICTIM_RUN = pb.StartRunRequest(agent="ticker", input=struct({"count": 0}))

Metadata = tuple[tuple[str, str], ...]


async def outcome(call: Awaitable[object]) -> str:
    """The status code name a call ended with ("OK" when it succeeded)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


@dataclass(frozen=True)
class Handshake:
    """`ready`: the abuse is in place; `done`: the victim has finished measuring.

    Both are manager events (`Workers.event`), shared by the two worker processes.
    """

    ready: threading.Event
    done: threading.Event
    limit_s: float

    async def wait(self, event: threading.Event, what: str) -> None:
        """Waits for `event`; TimeoutError after `limit_s` seconds."""
        if not await asyncio.to_thread(event.wait, self.limit_s):
            raise TimeoutError(
                f"{what} did not happen within {self.limit_s:g}s: the victim and the abuser "
                "must run at the same time, each in a worker process of its own"
            )


# -- the victim --------------------------------------------------------------------------


def failed(statuses: dict[str, int]) -> dict[str, int]:
    """The victim's calls that did not succeed, per RPC and status."""
    return {key: n for key, n in statuses.items() if not key.endswith(" OK")}


@dataclass
class Victim:
    """Paced calls of the well-behaved user: every call's latency and status."""

    stub: Any
    md: Metadata
    run_id: str  # a finished run of the victim's own, for GetRun
    latencies: array[float] = field(default_factory=lambda: array("d"))
    statuses: Counter[str] = field(default_factory=Counter)

    def start_run(self) -> Awaitable[object]:
        """StartRun of a run that ends at once."""
        call: Awaitable[object] = self.stub.StartRun(
            VICTIM_RUN, metadata=self.md, timeout=CALL_DEADLINE_S
        )
        return call

    def get_run(self) -> Awaitable[object]:
        """GetRun of the victim's finished run."""
        request = pb.GetRunRequest(run_id=self.run_id)
        call: Awaitable[object] = self.stub.GetRun(
            request, metadata=self.md, timeout=CALL_DEADLINE_S
        )
        return call

    async def timed(self, rpc: str, call: Callable[[], Awaitable[object]]) -> None:
        """Makes one call; records its latency (ms) and '<rpc> <status>', whatever it ended
        with."""
        t0 = time.perf_counter()
        status = await outcome(call())
        self.latencies.append((time.perf_counter() - t0) * 1000.0)
        self.statuses[f"{rpc} {status}"] += 1

    async def paced(self, seconds: float, rate: float) -> None:
        """`rate` calls a second for `seconds`, StartRun and GetRun alternately, each sent
        on schedule whether or not the previous ones have ended; waits for them all."""
        calls = (("StartRun", self.start_run), ("GetRun", self.get_run))
        tasks = [
            asyncio.create_task(self.timed(*calls[k % 2]))
            async for k in ticks(max(1, round(seconds * rate)), 1.0 / rate, 0.0)
        ]
        await asyncio.gather(*tasks)


def victim(
    addr: str, token: str, run_id: str, sync: Handshake, *, seconds: float, rate: float, loop: str
) -> dict[str, Any]:
    """Once the abuse is in place, `rate` paced calls a second for `seconds`; then `done`.

    Returns every call's latency in ms (array('d') bytes) and the calls per RPC and
    status ("StartRun OK", "GetRun DEADLINE_EXCEEDED", ...).
    """

    async def main() -> dict[str, Any]:
        try:
            async with grpc.aio.insecure_channel(addr) as channel:
                stub = pb_grpc.RunServiceStub(channel)  # type: ignore[no-untyped-call]
                me = Victim(stub, metadata(token), run_id)
                await me.get_run()  # connected before the clock starts
                await sync.wait(sync.ready, "the abuse")
                await me.paced(seconds, rate)
                return {"latencies_ms": me.latencies.tobytes(), "statuses": dict(me.statuses)}
        finally:
            sync.done.set()

    return run(main, loop)


# -- the abuser --------------------------------------------------------------------------


@functools.cache
def oversize_request() -> pb.StartRunRequest:
    """A StartRun larger than the server's receive limit."""
    return pb.StartRunRequest(agent="echo", input=struct({"text": "x" * OVERSIZE_BYTES}))


def flood(md: Metadata) -> Metadata:
    """`md` and headers worth twice the server's metadata limit (past gRPC's hard limit)."""
    return (*md, *((f"x-flood-{i}", "y" * FLOOD_HEADER_VALUE) for i in range(FLOOD_HEADERS)))


@dataclass
class Abuser:
    """The abusing user's connections, the streams it holds and what its calls got."""

    stubs: list[Any]
    md: Metadata
    cap: int  # the server's --max-streams-per-user
    counts: Counter[str] = field(default_factory=Counter)
    held: list[Any] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    async def start(self, **values: float) -> str:
        """Starts a run of the bench agent (stopped at `close`); its id."""
        request = pb.StartRunRequest(agent="paced", input=struct(dict(values)))
        reply = await self.stubs[0].StartRun(request, metadata=self.md, timeout=CALL_DEADLINE_S)
        self.run_ids.append(reply.run.run_id)
        return str(reply.run.run_id)

    def subscribe(self, i: int) -> Any:
        """A Subscribe to the abuser's last run, on connection i."""
        request = pb.SubscribeRequest(run_id=self.run_ids[-1], from_seq=1)
        return self.stubs[i % len(self.stubs)].Subscribe(request, metadata=self.md)

    async def hold(self, attached: Callable[[Any], Awaitable[object]]) -> None:
        """Opens `cap` streams to the last run and waits until each is `attached`."""
        self.held = [self.subscribe(i) for i in range(self.cap)]
        await asyncio.gather(*(attached(call) for call in self.held))
        self.counts["streams held"] = len(self.held)

    async def repeat(
        self, attempt: Callable[[Abuser], Awaitable[object]], stop: asyncio.Future[None]
    ) -> None:
        """Makes `attempt` again and again until `stop` is done, counting the statuses."""
        while not stop.done():
            self.counts[await outcome(attempt(self))] += 1

    async def close(self) -> None:
        """Closes the held streams and stops the runs."""
        for call in self.held:
            call.cancel()
        for run_id in self.run_ids:
            request = pb.StopRunRequest(run_id=run_id, reason="phase over")
            await self.stubs[0].StopRun(request, metadata=self.md, timeout=STOP_DEADLINE_S)


async def one_more_stream(me: Abuser) -> None:
    """A stream past the cap: refused at its first read (cancelled if it was accepted)."""
    call = me.subscribe(0)
    try:
        await call.read()
    finally:
        call.cancel()


async def hold_quiet_streams(me: Abuser) -> None:
    """`cap` streams on a run that ticks once and holds, each read up to its first event."""
    await me.start(count=1, hold=HOLD_S)
    await me.hold(lambda call: call.read())


async def hold_unread_streams(me: Abuser) -> None:
    """`cap` streams on a busy run, opened (initial metadata received) and never read."""
    await me.start(**BUSY_RUN)
    await me.hold(lambda call: call.initial_metadata())


async def no_setup(me: Abuser) -> None:
    """Nothing to set up."""


SETUPS: dict[str, Callable[[Abuser], Awaitable[None]]] = {
    "streams": hold_quiet_streams,
    "unread": hold_unread_streams,
}
ATTEMPTS: dict[str, Callable[[Abuser], Awaitable[object]]] = {
    "oversize": lambda me: me.stubs[0].StartRun(
        oversize_request(), metadata=me.md, timeout=CALL_DEADLINE_S
    ),
    "metadata": lambda me: me.stubs[0].ListAgents(
        pb.ListAgentsRequest(), metadata=flood(me.md), timeout=CALL_DEADLINE_S
    ),
    "streams": one_more_stream,
}


async def abuse(me: Abuser, phase: str, sync: Handshake) -> None:
    """Sets the phase's abuse up, says `ready`, and goes on until the victim is done."""
    try:
        await SETUPS.get(phase, no_setup)(me)
    finally:
        sync.ready.set()  # even on failure: the victim must not wait for nothing
    stop = asyncio.ensure_future(sync.wait(sync.done, "the victim's end"))
    attempt = ATTEMPTS.get(phase)
    loops: Sequence[Awaitable[None]] = (
        [me.repeat(attempt, stop) for _ in range(ABUSE_CALLERS)] if attempt else []
    )
    await asyncio.gather(stop, *loops)


def abuser(
    phase: str, addr: str, token: str, sync: Handshake, *, cap: int, loop: str
) -> dict[str, int]:
    """The abuse of `phase` (one of PHASES) until the victim is done; the calls per status
    (and how many streams were held open)."""

    async def main() -> dict[str, int]:
        chans = channels(addr, cap)
        stubs = [pb_grpc.RunServiceStub(c) for c in chans]  # type: ignore[no-untyped-call]
        me = Abuser(stubs, metadata(token), cap)
        try:
            await abuse(me, phase, sync)
        finally:
            await me.close()
            for channel in chans:
                await channel.close()
        return dict(me.counts)

    return run(main, loop)
