"""SIGTERM with runs and subscribers: drain, interrupt, every stream ends, exit 0, in time."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc

from faults.checker import SeenLog, SeenStream, records_from_db, verify
from faults.harness import SCALE, Load, Node, isolation_leaks, load_on
from faults.report import Row
from runservice.v1 import run_service_pb2 as pb

DRAIN_S = 2.0
GRACE_S = 1.0
SLACK_S = 5.0
SUBSCRIBERS_PER_RUN = 3


async def read_once(load: Load, run_id: str, user: str, stream: SeenStream) -> str:
    """One Subscribe call, no resuming: the status name it ended with."""
    call = load.stub.Subscribe(
        pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=load.node.md(user), timeout=60
    )
    try:
        async for response in call:
            for event in response.events:
                stream.add(event)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    code: grpc.StatusCode = await call.code()
    return code.name


async def test_sigterm_with_runs_and_subscribers(node: Node, row: Row) -> None:
    """SIGTERM while short runs (ending inside the drain) and long ones (outlasting it) emit,
    each with SUBSCRIBERS_PER_RUN subscribers: the process exits 0 within drain + grace + 5 s,
    every subscriber's single stream ends OK right after a terminal event, and the file the
    process leaves passes the checker with no run active (before any restart)."""
    node.args = ["--drain-timeout", f"{DRAIN_S}s", "--stop-grace", f"{GRACE_S}s"]
    await node.start()
    seen = SeenLog()
    async with load_on(node, seen) as load:
        runs = []
        for i in range(4 * SCALE):
            user = ("alice", "bob")[i % 2]
            runs.append((await load.start("echo", user, text="a b c d e", delay=0.1), user))
            runs.append((await load.start("ticker", user, count=10**6, interval=0.005), user))
            runs.append((await load.start("ticker", user, count=5000, size=200), user))
        readers = [
            asyncio.create_task(read_once(load, run.run_id, user, seen.stream(run.run_id)))
            for run, user in runs
            for _ in range(SUBSCRIBERS_PER_RUN)
        ]
        await asyncio.sleep(0.5)
        assert node.server is not None
        began = time.monotonic()
        node.server.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.wait_for(asyncio.gather(*readers), DRAIN_S + GRACE_S + SLACK_S + 10)
        exit_code = await node.server.wait_exit(DRAIN_S + GRACE_S + SLACK_S + 30)
        exit_s = time.monotonic() - began
        ids = [run.run_id for run, _ in runs]
    figures = verify(records_from_db(node.db), seen, owners=load.owners)
    await node.start()
    async with load_on(node) as probe:
        probe.owners = dict(load.owners)
        leaks = await isolation_leaks(probe, ids)
    await node.terminate()
    without_terminal = sum(not s.saw_terminal for s in seen.streams)
    not_ok = [c for c in codes if c != "OK"]
    row.set(
        **figures.as_dict(),
        subscribers=len(readers),
        subscribers_not_ended_ok=len(not_ok),
        subscribers_without_terminal=without_terminal,
        exit_code=exit_code,
        exit_s=round(exit_s, 2),
        exit_bound_s=DRAIN_S + GRACE_S + SLACK_S,
        isolation_leaks=len(leaks),
    )
    figures.assert_clean()
    assert exit_code == 0
    assert exit_s <= DRAIN_S + GRACE_S + SLACK_S
    assert not not_ok, f"streams ended {sorted(set(not_ok))}"
    assert without_terminal == 0
    assert not leaks, leaks
