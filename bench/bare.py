"""The baseline: a bare grpc.aio server that speaks RunService with nothing behind it.

No registry, no store, no auth, no interceptors: StartRun builds a `Run` and (if the
input asks for ticks) starts an in-memory emitter that runs the same schedule as the
bench agent (bench/agents.py) and appends pre-built `SubscribeResponse` messages, one
`RunEvent` each, to a list; Subscribe streams that list from `from_seq`, one event per
message, and waits on a future when it is caught up. Same generated messages, same
server options (runservice.app.server_options) and the same event loop as `runservice
serve` (uvloop unless `--event-loop asyncio`), so the clients cannot tell the two apart
except by speed.

Run as `python -m bench.bare --listen 127.0.0.1:0`; prints `PORT <n>` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
import uuid
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from bench.agents import schedule, tick_data, ticks
from runservice.app import server_options
from runservice.cli import new_event_loop
from runservice.config import EVENT_LOOPS, Settings
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


def now_ts() -> timestamp_pb2.Timestamp:
    """The wall time now, as runservice stamps events (microseconds)."""
    us = time.time_ns() // 1000
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)


class BareRun:
    """A run's events as pre-built responses, and a future to wake caught-up readers."""

    def __init__(self, run: run_pb2.Run, inline: dict[str, Any] | None = None) -> None:
        self.run = run
        self.items: list[pb.SubscribeResponse] = []
        self.finished = False
        self.inline = inline  # the schedule, when each Subscribe generates its own events
        self._waiters: list[asyncio.Future[None]] = []

    def add(self, event: run_pb2.RunEvent, *, terminal: bool = False) -> None:
        """Appends one event (as its own response) and wakes the readers."""
        self.items.append(pb.SubscribeResponse(events=[event]))
        self.run.last_seq = event.seq
        if terminal:
            self.finished = True
            self.run.state = event.state
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters.clear()

    async def wait_beyond(self, n: int) -> None:
        """Returns once there are more than `n` events, or the run finished."""
        while len(self.items) <= n and not self.finished:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def event(self, type: str, **fields: Any) -> run_pb2.RunEvent:
        """A new event with the next seq, stamped now."""
        return run_pb2.RunEvent(
            run_id=self.run.run_id, seq=len(self.items) + 1, type=type, time=now_ts(), **fields
        )


async def inline(run: BareRun, input: dict[str, Any]) -> Any:
    """One subscriber's events generated in its own handler, on the run's schedule: the
    plainest way to serve a live stream (a timer per stream, build, yield). Used for scenario 3,
    where each run has exactly one subscriber."""
    count, interval, _size, start_at, hold = schedule(input)
    template = struct_pb2.Struct()
    template.update(tick_data(0, "x" * int(input.get("size", 0))))

    def event(seq: int, type: str, **fields: Any) -> pb.SubscribeResponse:
        return pb.SubscribeResponse(
            events=[
                run_pb2.RunEvent(run_id=run.run.run_id, seq=seq, type=type, time=now_ts(), **fields)
            ]
        )

    yield event(1, "run.state", state=run_pb2.RUN_STATE_RUNNING)
    async for k in ticks(count, interval, start_at):
        response = event(k + 1, "tick", data=template)
        response.events[0].data.fields["i"].number_value = k
        yield response
    if hold:
        await asyncio.sleep(hold)
    last = event(count + 2, "run.state", state=run_pb2.RUN_STATE_SUCCEEDED)
    last.events[0].data.update({"count": count})
    yield last


async def emit(run: BareRun, input: dict[str, Any]) -> None:
    """The bench agent's schedule, with the lifecycle events runservice adds around it."""
    count, interval, size, start_at, hold = schedule(input)
    # A template copied per tick (in C) instead of Struct.update (Python) per tick: the
    # baseline should cost as little as the bare stack allows.
    template = struct_pb2.Struct()
    template.update(tick_data(0, "x" * size))
    run.add(run.event("run.state", state=run_pb2.RUN_STATE_RUNNING))
    async for k in ticks(count, interval, start_at):
        event = run.event("tick", data=template)
        event.data.fields["i"].number_value = k
        run.add(event)
    if hold:
        await asyncio.sleep(hold)
    last = run.event("run.state", state=run_pb2.RUN_STATE_SUCCEEDED)
    last.data.update({"count": count})
    run.add(last, terminal=True)


class BareServicer(pb_grpc.RunServiceServicer):
    """StartRun, GetRun and Subscribe over a dict of in-memory runs."""

    def __init__(self) -> None:
        self._runs: dict[str, BareRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def StartRun(self, request: pb.StartRunRequest, context: Context) -> pb.StartRunResponse:
        run = run_pb2.Run(
            run_id=str(uuid.uuid4()),
            owner="bench",
            agent=request.agent,
            state=run_pb2.RUN_STATE_PENDING,
            create_time=now_ts(),
        )
        fields = request.input.fields
        if "count" in fields and (fields["count"].number_value or "hold" in fields):
            values = {k: v.number_value for k, v in fields.items()}
            if values.get("inline"):
                self._runs[run.run_id] = BareRun(run, values)
                return pb.StartRunResponse(run=run)
            bare = BareRun(run)
            self._runs[run.run_id] = bare
            task = asyncio.create_task(emit(bare, values))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return pb.StartRunResponse(run=run)

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        bare = self._runs.get(request.run_id)
        if bare is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such run")
        return pb.GetRunResponse(run=bare.run)

    async def Subscribe(self, request: pb.SubscribeRequest, context: Context) -> Any:
        bare = self._runs.get(request.run_id)
        if bare is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such run")
        if bare.inline is not None:
            async for response in inline(bare, bare.inline):
                yield response
            return
        i = max(request.from_seq, 1) - 1
        while True:
            items = bare.items
            while i < len(items):
                yield items[i]
                i += 1
            if bare.finished:
                return
            await bare.wait_beyond(i)


async def serve(listen: str) -> None:
    """Serves until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=server_options(Settings()))
    pb_grpc.add_RunServiceServicer_to_server(BareServicer(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    """Entry point: `python -m bench.bare --listen HOST:PORT`."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="uvloop")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=lambda: new_event_loop(args.event_loop)) as runner:
        runner.run(serve(args.listen))


if __name__ == "__main__":
    main()
