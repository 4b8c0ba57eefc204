"""Load clients. Each public function runs in a worker process (see `Workers`) and returns
plain data; the same code drives runservice and the bare server (the bare one ignores the
token). Clients run on uvloop by default so that their cost per message stays small
beside the server's; both servers are measured with the same clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
from google.protobuf import struct_pb2
from sqlalchemy import create_engine

from runservice.cli import new_event_loop
from runservice.store import tables
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

T = TypeVar("T")

RUNNING = run_pb2.RUN_STATE_RUNNING
FIRST_TICK_SEQ = 2  # seq 1 is the RUNNING event, in runservice and in the bare server
STREAMS_PER_CHANNEL = 100  # HTTP/2 connections: one per 100 streams
CALL_LIMIT_S = 600.0
POLL_S = 0.05


def run(main: Callable[[], Coroutine[Any, Any, T]], loop: str) -> T:
    """Runs `main()` on a fresh event loop of the given kind ("uvloop" or "asyncio")."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(loop)) as runner:
        return runner.run(main())


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    """A Struct of `values`."""
    s = struct_pb2.Struct()
    s.update(values)
    return s


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Bearer-token metadata (the bare server ignores it)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def channels(addr: str, streams: int) -> list[grpc.aio.Channel]:
    """Enough channels, each its own TCP connection, for `streams` concurrent streams."""
    n = max(1, -(-streams // STREAMS_PER_CHANNEL))
    return [
        grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]


def _ts(t: Any) -> float:
    return float(t.seconds) + float(t.nanos) * 1e-9


# -- replay ------------------------------------------------------------------------------


def replay(addr: str, token: str, run_id: str, loop: str) -> dict[str, Any]:
    """Subscribes from seq 1 to a finished run; events, messages and time to the last one."""

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb_grpc.RunServiceStub(channel)  # type: ignore[no-untyped-call]
            events = messages = 0
            last = 0.0
            start = time.perf_counter()
            call = stub.Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=1),
                metadata=metadata(token),
                timeout=CALL_LIMIT_S,
            )
            async for response in call:
                messages += 1
                events += len(response.events)
            last = time.perf_counter()
            return {"events": events, "messages": messages, "seconds": last - start}

    return run(main, loop)


# -- live subscribers (fan-out, latency) -------------------------------------------------


def subscribe(
    addr: str,
    token: str,
    run_ids: Sequence[str],
    *,
    start_at: float,
    latency: bool,
    limit_s: float,
    loop: str,
) -> dict[str, Any]:
    """One Subscribe from seq 1 per id in `run_ids` (repeats allowed), each until its run ends.

    Returns tick and message counts, the last receipt time, the earliest tick's emit time,
    how many subscriptions were attached only after `start_at` ("late"), and with `latency`
    every tick's emit→receive latency in ms (array('d') bytes). Ticks emitted before their
    subscription was attached are not counted as latencies ("excluded").
    """

    async def main() -> dict[str, Any]:
        chans = channels(addr, len(run_ids))
        stubs = [pb_grpc.RunServiceStub(c) for c in chans]  # type: ignore[no-untyped-call]
        md = metadata(token)
        lat: array[float] = array("d")
        totals = {"ticks": 0, "messages": 0, "late": 0, "excluded": 0, "errors": 0}
        marks = {"last": 0.0, "first_tick": float("inf")}
        failures: dict[str, int] = {}

        async def follow(i: int, run_id: str) -> None:
            ready = 0.0
            ticks = messages = 0
            call = stubs[i % len(stubs)].Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=md, timeout=limit_s
            )
            try:
                async for response in call:
                    now = time.time()
                    messages += 1
                    for event in response.events:
                        if event.type == "tick":
                            ticks += 1
                            if event.seq == FIRST_TICK_SEQ:
                                marks["first_tick"] = min(marks["first_tick"], _ts(event.time))
                            if latency:
                                emitted = _ts(event.time)
                                if emitted >= ready:
                                    lat.append((now - emitted) * 1000.0)
                                else:
                                    totals["excluded"] += 1
                        elif event.state == RUNNING:
                            ready = now
                            if now > start_at:
                                totals["late"] += 1
                    marks["last"] = max(marks["last"], now)
            except grpc.aio.AioRpcError as exc:
                totals["errors"] += 1
                failures.setdefault(f"{exc.code().name}: {exc.details()}", 0)
                failures[f"{exc.code().name}: {exc.details()}"] += 1
            totals["ticks"] += ticks
            totals["messages"] += messages

        await asyncio.gather(*(follow(i, r) for i, r in enumerate(run_ids)))
        for c in chans:
            await c.close()
        return {
            **totals,
            **marks,
            "failures": failures,
            "latencies_ms": lat.tobytes(),
            "streams": len(run_ids),
        }

    return run(main, loop)


# -- StartRun ----------------------------------------------------------------------------


async def start_many(
    stub: Any, md: Any, requests: Sequence[pb.StartRunRequest], callers: int
) -> list[str]:
    """StartRun for every request, `callers` at a time; the run ids in request order."""
    ids: list[str] = [""] * len(requests)
    it = iter(range(len(requests)))

    async def caller() -> None:
        for i in it:
            ids[i] = (await stub.StartRun(requests[i], metadata=md, timeout=60)).run.run_id

    await asyncio.gather(*(caller() for _ in range(callers)))
    return ids


def start_calls(
    addr: str,
    token: str,
    agent: str,
    input: dict[str, Any],
    *,
    callers: int,
    warmup: float,
    duration: float,
    loop: str,
) -> dict[str, Any]:
    """`callers` concurrent StartRun loops; calls that start after `warmup` and end within
    `duration` count. Returns the count and each call's latency in ms."""

    async def main() -> dict[str, Any]:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb_grpc.RunServiceStub(channel)  # type: ignore[no-untyped-call]
            md = metadata(token)
            request = pb.StartRunRequest(agent=agent, input=struct(input))
            lat: array[float] = array("d")
            errors = 0
            begin = time.perf_counter() + warmup
            end = begin + duration

            async def caller() -> None:
                nonlocal errors
                while True:
                    t0 = time.perf_counter()
                    if t0 >= end:
                        return
                    try:
                        await stub.StartRun(request, metadata=md, timeout=30)
                    except grpc.aio.AioRpcError:
                        errors += 1
                        continue
                    t1 = time.perf_counter()
                    if t0 >= begin and t1 <= end:
                        lat.append((t1 - t0) * 1000.0)

            await asyncio.gather(*(caller() for _ in range(callers)))
            return {"calls": len(lat), "errors": errors, "latencies_ms": lat.tobytes()}

    return run(main, loop)


# -- capacity ----------------------------------------------------------------------------


def hold_streams(
    addr: str,
    token: str,
    run_ids: Sequence[str],
    *,
    ready_path: str,
    release_path: str,
    limit_s: float,
    loop: str,
) -> dict[str, Any]:
    """Opens one Subscribe per run, waits until each has delivered its tick, writes
    `ready_path`, keeps every stream open until `release_path` exists, then closes them."""

    async def main() -> dict[str, Any]:
        chans = channels(addr, len(run_ids))
        stubs = [pb_grpc.RunServiceStub(c) for c in chans]  # type: ignore[no-untyped-call]
        md = metadata(token)
        ready = 0
        errors = 0
        all_ready = asyncio.Event()

        async def follow(i: int, run_id: str) -> None:
            nonlocal ready, errors
            call = stubs[i % len(stubs)].Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=md, timeout=limit_s
            )
            try:
                async for response in call:
                    if any(e.type == "tick" for e in response.events):
                        ready += 1
                        if ready == len(run_ids):
                            all_ready.set()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors += 1
                    if ready + errors >= len(run_ids):
                        all_ready.set()

        tasks = [asyncio.create_task(follow(i, r)) for i, r in enumerate(run_ids)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_ready.wait(), limit_s)
        state = json.dumps({"ready": ready, "errors": errors})
        await asyncio.to_thread(Path(ready_path).write_text, state)
        deadline = time.monotonic() + limit_s
        # The release is a file the coordinator (another process) creates: poll for it.
        while time.monotonic() < deadline:
            if await asyncio.to_thread(os.path.exists, release_path):
                break
            await asyncio.sleep(POLL_S)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in chans:
            await c.close()
        return {"ready": ready, "errors": errors}

    return run(main, loop)


# -- raw sqlite3 ingest baseline ---------------------------------------------------------

INSERT_EVENT = (
    "INSERT INTO run_events (run_id, seq, at_us, type, payload_kind, payload, state, error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def raw_ingest(db_path: str, runs: int, events: int, size: int, batch: int) -> dict[str, Any]:
    """Inserts runs x events tick rows (interleaved across runs, as the group-commit writer
    sees them) with sqlite3 executemany, one transaction per `batch` rows, into the schema
    of runservice/store/tables.py with runservice's pragmas. Rows are built before timing."""
    engine = create_engine(f"sqlite:///{db_path}")
    tables.metadata.create_all(engine)
    engine.dispose()
    pad = "x" * size
    now_us = time.time_ns() // 1000
    run_ids = [f"00000000-0000-7000-8000-{r:012d}" for r in range(runs)]
    rows = [
        (
            run_id,
            k + 1,
            now_us,
            "tick",
            1,
            json.dumps({"i": k, "pad": pad} if pad else {"i": k}, separators=(",", ":")).encode(),
            None,
            None,
        )
        for k in range(1, events + 1)
        for run_id in run_ids
    ]
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        conn.execute("BEGIN")
        conn.executemany(INSERT_EVENT, rows[i : i + batch])
        conn.execute("COMMIT")
    seconds = time.perf_counter() - start
    conn.close()
    return {"rows": len(rows), "seconds": seconds}


# -- the worker pool ---------------------------------------------------------------------


def _warm() -> int:
    return os.getpid()


class Workers:
    """A small pool of warm client processes (spawned, so no gRPC state is forked).

    Calls awaited together run at the same time only while there are at most `n` of them:
    the rest wait for a free worker.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._pool = ProcessPoolExecutor(max_workers=n, mp_context=get_context("spawn"))
        self._manager: SyncManager | None = None
        for f in [self._pool.submit(_warm) for _ in range(n)]:
            f.result()

    def event(self) -> threading.Event:
        """An event the workers can share (held by a manager process, started on first use)."""
        if self._manager is None:
            self._manager = get_context("spawn").Manager()
        return self._manager.Event()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Runs fn(*args, **kwargs) in a worker."""
        future = self._pool.submit(fn, *args, **kwargs)
        return await asyncio.wrap_future(future)

    def cpu_seconds(self) -> float:
        """User + system CPU time the worker processes consumed so far."""
        total = 0.0
        for pid in list(getattr(self._pool, "_processes", None) or {}):
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            total += float(t.user + t.system)
        return total

    def close(self) -> None:
        """Stops the workers (and the manager)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._manager is not None:
            self._manager.shutdown()
