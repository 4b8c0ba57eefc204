"""SIGKILL rows: at random points under load, twice during a restart, during a drain."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import statistics
import subprocess
import sys
import time

import grpc

from faults.checker import SeenLog, records_from_api, records_from_db, verify
from faults.harness import SCALE, Load, Node, isolation_leaks, load_on
from faults.report import Row
from tests.serverproc import server_env

ROUNDS = 6
RUNS_PER_ROUND = 6 * SCALE
USERS = ("alice", "bob")
ECHO_SHARE = 0.3  # of the runs start_mixed starts


async def start_mixed(load: Load, count: int) -> list[str]:
    """Starts `count` runs of random length for random users, each followed."""
    ids = []
    for _ in range(count):
        user = random.choice(USERS)
        if random.random() < ECHO_SHARE:
            run = await load.start("echo", user, text="a b c d e f g h", delay=0.05)
        else:
            n = random.randint(50, 3000)
            run = await load.start("ticker", user, count=n, interval=random.choice((0, 0.002)))
        load.follow(run.run_id, user)
        ids.append(run.run_id)
    return ids


async def keep_starting(load: Load, ids: list[str]) -> None:
    """Starts short runs back to back until cancelled; a failed StartRun is not followed."""
    while True:
        user = random.choice(USERS)
        try:
            run = await load.start("ticker", user, count=random.randint(1, 40))
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.05)
            continue
        ids.append(run.run_id)
        load.follow(run.run_id, user)


async def final_check(node: Node, load: Load, seen: SeenLog, ids: list[str], row: Row) -> None:
    """Every follower ends; the live API and, after SIGTERM, the file pass the checker."""
    streams = await asyncio.wait_for(load.followed(), 120)
    leaks = await isolation_leaks(load, ids)
    users = {u: node.tokens[u] for u in USERS}
    live = verify(await records_from_api(node.addr, users), owners=load.owners)
    exit_code = await node.terminate()
    figures = verify(records_from_db(node.db), seen, owners=load.owners)
    row.set(
        **figures.as_dict(),
        subscribers=len(streams),
        subscribers_without_terminal=sum(not s.saw_terminal for s in streams),
        isolation_leaks=len(leaks),
        exit_code=exit_code,
    )
    figures.assert_clean()
    live.assert_clean()
    assert not leaks, leaks
    assert all(s.saw_terminal for s in streams)
    assert exit_code == 0


async def test_sigkill_at_random_points_during_load(node: Node, row: Row) -> None:
    """Runs start, emit and are followed by resuming subscribers while the server is SIGKILLed
    at a random moment, ROUNDS times, and restarted on the same port each time. Afterwards
    every log is gap-free and ends with one terminal event, nothing a subscriber saw is
    missing or changed, no run is left active, users stay isolated. Reports restart time."""
    node.args = ["--stop-grace", "1s", "--drain-timeout", "2s"]
    await node.start()
    seen = SeenLog()
    ids: list[str] = []
    restarts: list[float] = []
    async with load_on(node, seen) as load:
        for _ in range(ROUNDS):
            ids += await start_mixed(load, RUNS_PER_ROUND)
            starter = asyncio.create_task(keep_starting(load, ids))
            await asyncio.sleep(random.uniform(0.2, 2.0))
            await node.kill()
            starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starter
            restarts.append(await node.start())
        row.set(
            kills=ROUNDS,
            runs_started=len(ids),
            restart_s_median=round(statistics.median(restarts), 2),
            restart_s_max=round(max(restarts), 2),
        )
        await final_check(node, load, seen, ids, row)


def spawn(node: Node) -> subprocess.Popen[bytes]:
    """`runservice serve` on the node's port, not waited for."""
    cmd = [sys.executable, "-m", "runservice", "serve", "--listen", node.addr]
    cmd += ["--data-dir", str(node.data_dir), *node.args]
    with (node.data_dir.parent / "double-kill.log").open("ab") as log:
        return subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=server_env()
        )


async def test_double_kill_during_restart(node: Node, row: Row) -> None:
    """SIGKILL under load, then SIGKILL again while the next process starts (anywhere from
    its imports to its reconciliation of the orphaned runs), several times; the process
    after that reconciles everything: the checker passes as after a single kill."""
    node.args = ["--stop-grace", "1s", "--drain-timeout", "2s"]
    first_start = await node.start()
    seen = SeenLog()
    ids: list[str] = []
    second_kill_at: list[float] = []
    async with load_on(node, seen) as load:
        for _ in range(ROUNDS):
            ids += await start_mixed(load, RUNS_PER_ROUND)
            await asyncio.sleep(random.uniform(0.2, 1.0))
            await node.kill()
            proc = spawn(node)
            delay = random.uniform(0.0, first_start * 1.2)
            await asyncio.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            second_kill_at.append(round(delay, 2))
            await node.start()
        row.set(rounds=ROUNDS, second_kill_after_s=second_kill_at, runs_started=len(ids))
        await final_check(node, load, seen, ids, row)


async def test_sigkill_during_drain(node: Node, row: Row) -> None:
    """SIGTERM with runs in flight and followers, then SIGKILL at a random moment of the drain
    (drain 3 s); the restarted process finishes the job: every run terminal with one terminal
    event, nothing seen lost, subscribers resume to the end."""
    node.args = ["--stop-grace", "1s", "--drain-timeout", "3s"]
    await node.start()
    seen = SeenLog()
    ids: list[str] = []
    kill_after: list[float] = []
    async with load_on(node, seen) as load:
        for _ in range(ROUNDS // 2):
            ids += await start_mixed(load, RUNS_PER_ROUND)
            for _ in range(2):  # some that outlast the drain
                run = await load.start("ticker", "alice", count=100_000, interval=0.01)
                load.follow(run.run_id, "alice")
                ids.append(run.run_id)
            await asyncio.sleep(0.5)
            assert node.server is not None
            node.server.proc.send_signal(signal.SIGTERM)
            delay = random.uniform(0.1, 3.5)
            await asyncio.sleep(delay)
            kill_after.append(round(delay, 2))
            await node.kill()
            began = time.monotonic()
            await node.start()
            row.set(restart_s=round(time.monotonic() - began, 2))
        row.set(kill_after_sigterm_s=kill_after, runs_started=len(ids))
        await final_check(node, load, seen, ids, row)
