"""Promise 7 against clients that stop reading: a stalled stream is bounded, ended, resumed.

The subscribers are real processes (tests/stall_subscriber.py) stopped with SIGSTOP: they
read nothing from their sockets, as a frozen or wedged client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from runservice.api.limits import StreamLimiter
from runservice.api.status import wrap_stream
from runservice.domain.model import Principal
from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.serverproc import (
    assert_gap_free,
    bearer,
    read_log,
    running_server,
    server_env,
    wait_for,
)

EVENTS = 30_000  # of PAD bytes each: ~33 MB, far more than a stopped client's socket takes
PAD = 1000
TOTAL = EVENTS + 2  # with the RUNNING and SUCCEEDED events
STALLED_LINE = "took nothing the server sent"
STUCK = 50
# Measured here: 0.33-0.38 MiB of server RSS per stuck subscriber (0.18 MiB with 200 of
# them, docs/performance.md); 4.0 MiB before a stuck stream was held to one response.
PER_STUCK_BOUND_MB = 1.0
MB = 1024 * 1024
REPO = Path(__file__).parent.parent


def struct(**values: object) -> struct_pb2.Struct:
    """A Struct of `values`."""
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def big_run(stub: Any, md: Any) -> str:
    """Starts a ticker run of EVENTS padded events and returns its id once it succeeded."""
    run = (
        await stub.StartRun(
            pb.StartRunRequest(agent="ticker", input=struct(count=EVENTS, size=PAD)), metadata=md
        )
    ).run

    async def succeeded() -> bool:
        got = (await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=md)).run
        return got.state == run_pb2.RUN_STATE_SUCCEEDED

    await wait_for(succeeded, limit=90, interval=0.1, message="the big run did not finish")
    return run.run_id


@contextlib.contextmanager
def subscriber(addr: str, token: str, run_id: str, mode: str, *args: str) -> Iterator[Any]:
    """A tests.stall_subscriber process; always killed and reaped on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.stall_subscriber", addr, token, run_id, mode, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=server_env(),
        text=True,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipes


async def line(proc: subprocess.Popen[str], limit: float = 60) -> str:
    """The process's next stdout line (bounded wait)."""
    assert proc.stdout is not None
    return await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), limit)


async def stop_until_stalled(proc: subprocess.Popen[str], server: Any) -> None:
    """Stops the subscriber once it has read something, resumes it once the server ended
    its stream as stalled, then lets it read on."""
    assert await line(proc) == "READY\n"
    proc.send_signal(signal.SIGSTOP)
    await wait_for(
        lambda: STALLED_LINE in server.log_text(),
        limit=30,
        interval=0.05,
        message="the server did not end the stopped subscriber's stream",
    )
    proc.send_signal(signal.SIGCONT)
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


async def stalled_report(tmp_path: Path, mode: str) -> dict[str, Any]:
    """What a subscriber of `mode` reports once it was stopped past a 2 s stall timeout
    on a big run, then let go."""
    data_dir = tmp_path / "data"
    token = add_token(data_dir / "tokens.toml", "alice", [])
    args = ["--stream-stall-timeout", "2s"]
    async with (
        running_server(data_dir, args=args) as server,
        grpc.aio.insecure_channel(server.addr) as channel,
    ):
        run_id = await big_run(pb_grpc.RunServiceStub(channel), bearer(token))
        with subscriber(server.addr, token, run_id, mode) as proc:
            await stop_until_stalled(proc, server)
            report: dict[str, Any] = json.loads(await line(proc))
    return report


async def test_a_stopped_subscriber_sees_its_data_then_unavailable_stream_stalled(
    tmp_path: Path,
) -> None:
    """A subscriber that stops reading is ended after --stream-stall-timeout; resumed, it
    reads the events it had been sent, gap-free from seq 1, then UNAVAILABLE STREAM_STALLED."""
    report = await stalled_report(tmp_path, "raw")
    print(f"read {report['count']} of {TOTAL} events before the status")
    assert (report["code"], report["reason"]) == ("UNAVAILABLE", "STREAM_STALLED")
    assert report["first"] == 1 and report["consecutive"]
    assert 1 < report["count"] < TOTAL


async def test_the_python_client_resumes_a_stalled_stream_and_gets_every_event_once(
    tmp_path: Path,
) -> None:
    """AsyncRunClient.subscribe rides through a STREAM_STALLED end: it resumes from its
    cursor and delivers every event of the run exactly once, in order."""
    report = await stalled_report(tmp_path, "client")
    assert report == {"count": TOTAL, "first": 1, "last": TOTAL, "consecutive": True}


async def steady_rss(process: psutil.Process) -> int:
    """The process's RSS once it has stopped moving (four samples within 1 MiB)."""
    samples: list[int] = []

    def settled() -> bool:
        samples.append(process.memory_info().rss)
        recent = samples[-4:]
        return len(recent) == 4 and max(recent) - min(recent) < MB

    await wait_for(settled, limit=60, interval=0.5, message="server RSS did not settle")
    return samples[-1]


async def test_stuck_subscribers_cost_little_server_memory_and_others_keep_working(
    tmp_path: Path,
) -> None:
    """STUCK subscribers that read nothing hold < PER_STUCK_BOUND_MB of server RSS each,
    and meanwhile other users start, follow and replay runs as usual."""
    data_dir = tmp_path / "data"
    token = add_token(data_dir / "tokens.toml", "alice", [])
    other = bearer(add_token(data_dir / "tokens.toml", "bob", []))
    args = ["--stream-stall-timeout", "10m"]  # measure them stuck, not ended
    async with (
        running_server(data_dir, args=args) as server,
        grpc.aio.insecure_channel(server.addr) as channel,
    ):
        stub = pb_grpc.RunServiceStub(channel)
        run_id = await big_run(stub, bearer(token))
        assert len(await read_log(stub, bearer(token), run_id, deadline=60)) == TOTAL  # warm-up
        server_proc = psutil.Process(server.pid)
        baseline = await steady_rss(server_proc)
        with subscriber(server.addr, token, run_id, "many", str(STUCK)) as proc:
            assert await line(proc) == "READY\n"
            proc.send_signal(signal.SIGSTOP)
            stuck = await steady_rss(server_proc)
            started = time.monotonic()
            echo = (
                await stub.StartRun(
                    pb.StartRunRequest(agent="echo", input=struct(text="still here")),
                    metadata=other,
                )
            ).run
            assert (await read_log(stub, other, echo.run_id))[-1].state == (
                run_pb2.RUN_STATE_SUCCEEDED
            )
            replay = await read_log(stub, bearer(token), run_id, deadline=60)
            others_s = time.monotonic() - started
    per_stuck_mb = (stuck - baseline) / STUCK / MB
    print(
        f"baseline {baseline / MB:.1f} MiB, with {STUCK} stuck subscribers {stuck / MB:.1f} "
        f"MiB: {per_stuck_mb * 1024:.0f} KiB each; others' calls took {others_s:.2f}s"
    )
    assert len(replay) == TOTAL
    assert_gap_free(replay)
    assert per_stuck_mb < PER_STUCK_BOUND_MB


class StuckContext:
    """A servicer context whose writes are never taken, as with a client that reads nothing."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.status: tuple[grpc.StatusCode, Any] | None = None

    async def send_initial_metadata(self, metadata: Any) -> None:
        """Headers are not flow-controlled: sent at once."""

    async def write(self, item: Any) -> None:
        """Never completes."""
        self.written.append(item)
        await asyncio.Event().wait()

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        """Records the status, then raises as grpc.aio does."""
        self.status = (code, dict(trailing))
        raise grpc.aio.AbortError("aborted")


async def test_any_stream_whose_write_is_not_taken_ends_unavailable_stream_stalled() -> None:
    """The stream wrapper (Subscribe and WatchRuns alike) ends a stream whose write is not
    taken within the stall timeout with UNAVAILABLE STREAM_STALLED, and releases the
    producer and the user's stream slot first."""
    closed = asyncio.Event()

    async def updates(request: Any, context: Any) -> Any:
        try:
            for n in range(1000):
                yield n
        finally:
            closed.set()

    limiter = StreamLimiter(1)
    handler = wrap_stream(updates, lambda _: Principal("alice"), limiter, 0.05)
    context = StuckContext()
    with pytest.raises(grpc.aio.AbortError):
        await handler(object(), context)
    assert context.written == [0]
    assert closed.is_set()
    with limiter.hold("alice"):  # the slot is free again
        pass
    assert context.status is not None
    code, trailing = context.status
    details = status_pb2.Status.FromString(trailing["grpc-status-details-bin"]).details
    info = error_details_pb2.ErrorInfo()
    details[0].Unpack(info)
    assert (code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_STALLED")
