"""Graceful shutdown of a real server process: drain, interrupt, persist, exit 0."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runservice.config import EVENT_LOOPS
from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.serverproc import (
    assert_gap_free,
    bearer,
    error_reason,
    read_log,
    running_server,
    wait_for,
)

ROOT = Path(__file__).parent.parent
ARGS = ["--drain-timeout", "3s", "--stop-grace", "2s", "--agent", "gated=tests.fakes:gated"]


def _request(agent: str, **input: object) -> pb.StartRunRequest:
    struct = struct_pb2.Struct()
    struct.update(input)
    return pb.StartRunRequest(agent=agent, input=struct)


@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
async def test_sigterm_drains_finishes_what_it_can_and_interrupts_the_rest(
    tmp_path: Path, event_loop: str
) -> None:
    """SIGTERM with three runs in flight: one SUCCEEDS in the drain window, two end INTERRUPTED
    with their partial output; every subscriber sees its terminal event; exit code 0; a
    restart reports the same states and logs. On either event loop (--event-loop)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    md = bearer(add_token(data_dir / "tokens.toml", "alice", []))
    env = {"PYTHONPATH": str(ROOT)}
    args = [*ARGS, "--event-loop", event_loop]
    async with running_server(data_dir, args=args, env=env) as server:
        channel = grpc.aio.insecure_channel(server.addr)
        stub = pb_grpc.RunServiceStub(channel)
        quick = (
            await stub.StartRun(_request("echo", text="a b c d e", delay=0.2), metadata=md)
        ).run
        stuck = (await stub.StartRun(_request("gated", gate="never", before=3), metadata=md)).run
        ticking = (
            await stub.StartRun(_request("ticker", count=10_000, interval=0.02), metadata=md)
        ).run
        runs = (quick, stuck, ticking)
        readers = [asyncio.create_task(read_log(stub, md, r.run_id, deadline=30)) for r in runs]

        async def ticked() -> bool:
            got = await stub.GetRun(pb.GetRunRequest(run_id=ticking.run_id), metadata=md)
            return got.run.last_seq >= 5

        await wait_for(ticked, limit=10)
        server.proc.send_signal(signal.SIGTERM)

        health = health_pb2_grpc.HealthStub(channel)

        async def not_serving() -> bool:
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            return answer.status == health_pb2.HealthCheckResponse.NOT_SERVING

        await wait_for(not_serving, limit=10)
        try:
            await stub.StartRun(_request("echo", text="late"), metadata=md, timeout=5)
            raise AssertionError("StartRun during the drain must be refused")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert error_reason(exc) == "SERVER_DRAINING"

        seen = await asyncio.gather(*readers)
        assert await server.wait_exit() == 0
        await channel.close()

    _check_logs(seen)
    await _check_after_restart(data_dir, md, runs, seen, env)


def _check_logs(seen: list[list[run_pb2.RunEvent]]) -> None:
    for events in seen:
        assert_gap_free(events)
        assert events[-1].type == "run.state"
    quick_log, stuck_log, tick_log = seen
    assert quick_log[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    assert [e.text for e in quick_log if e.type == "token"] == ["a", "b", "c", "d", "e"]
    assert stuck_log[-1].state == run_pb2.RUN_STATE_INTERRUPTED
    assert stuck_log[-2].type == "cleanup"  # the agent's cleanup ran and was persisted
    assert dict(stuck_log[-1].data) == {"partial": True}
    assert "server shutdown" in stuck_log[-1].error.message
    assert tick_log[-1].state == run_pb2.RUN_STATE_INTERRUPTED
    assert sum(1 for e in tick_log if e.type == "tick") >= 5


async def _check_after_restart(
    data_dir: Path,
    md: tuple[tuple[str, str]],
    runs: tuple[run_pb2.Run, ...],
    seen: list[list[run_pb2.RunEvent]],
    env: dict[str, str],
) -> None:
    stuck = runs[1]
    async with running_server(data_dir, args=ARGS, env=env) as server:
        channel = grpc.aio.insecure_channel(server.addr)
        stub = pb_grpc.RunServiceStub(channel)
        for run, events in zip(runs, seen, strict=True):
            after = (await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=md)).run
            assert after.state == events[-1].state
            assert after.last_seq == events[-1].seq
            assert await read_log(stub, md, run.run_id) == events
        stuck_after = (await stub.GetRun(pb.GetRunRequest(run_id=stuck.run_id), metadata=md)).run
        assert dict(stuck_after.result) == {"partial": True}
        assert stuck_after.stop_reason == "server shutdown"
        await channel.close()


async def test_sigterm_while_another_process_holds_the_write_lock_ends_in_bounded_time(
    tmp_path: Path,
) -> None:
    """SIGTERM while another process holds the database's write lock (for longer than the
    whole shutdown): the server still exits 0 within drain + grace + 5 s, and once the lock
    is gone a restart reconciles the run INTERRUPTED with a gap-free log."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    md = bearer(add_token(data_dir / "tokens.toml", "alice", []))
    args = ["--drain-timeout", "1s", "--stop-grace", "1s"]
    async with running_server(data_dir, args=args) as server:
        async with grpc.aio.insecure_channel(server.addr) as channel:
            stub = pb_grpc.RunServiceStub(channel)
            run = (
                await stub.StartRun(_request("ticker", count=100_000, interval=0.005), metadata=md)
            ).run

            async def ticked() -> bool:
                got = await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=md)
                return got.run.last_seq >= 10

            await wait_for(ticked, limit=10)
        holder = sqlite3.connect(data_dir / "runservice.db", timeout=30, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            began = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            code = await server.wait_exit(limit=1 + 1 + 5)
            took = time.monotonic() - began
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert code == 0 and took <= 7, (code, took)
    async with (
        running_server(data_dir, args=args) as server,
        grpc.aio.insecure_channel(server.addr) as channel,
    ):
        stub = pb_grpc.RunServiceStub(channel)
        after = (await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=md)).run
        assert after.state == run_pb2.RUN_STATE_INTERRUPTED
        events = await read_log(stub, md, run.run_id)
        assert_gap_free(events)
        assert events[-1].seq == after.last_seq and events[-1].state == after.state
