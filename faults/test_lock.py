"""A write lock held on the database from outside: short, longer than the writer's retries,
and through a SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc

from faults.checker import SeenLog, records_from_db, verify
from faults.harness import SCALE, Load, Node, load_on, state_name, wait_all_terminal
from faults.report import Row
from runservice.client.errors import error_info

DRAIN_S = 2.0
GRACE_S = 1.0
SLACK_S = 5.0
SHORT_LOCK_S = 2.0
LONG_LOCK_S = 25.0  # longer than the writer's retry budget (about 11 s of backoff)


class WriteLock:
    """BEGIN EXCLUSIVE on the database from another connection, held until released."""

    def __init__(self, db: Path) -> None:
        self._db = db
        self._release = threading.Event()
        self._held = threading.Event()
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        conn = sqlite3.connect(self._db, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            self._held.set()
            self._release.wait(120)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    async def __aenter__(self) -> WriteLock:
        self._thread.start()
        held = await asyncio.to_thread(self._held.wait, 30)
        assert held, "could not take the write lock within 30 s"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        await asyncio.to_thread(self._thread.join, 30)


async def start_during(
    load: Load, seconds: float, outcomes: Counter[str]
) -> list[asyncio.Task[None]]:
    """Calls StartRun every 0.3 s for `seconds` (not waiting for earlier calls); returns the
    calls, each counting its outcome (OK, or code:reason) when it ends. The caller ends the
    outage first, then waits for them: a call may wait for the outage to end."""

    async def one() -> None:
        try:
            run = await load.start("echo", "alice", text="during the outage")
            load.follow(run.run_id, "alice", give_up=120)
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            outcomes[f"{exc.code().name}:{info.reason if info else ''}"] += 1

    calls = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        calls.append(asyncio.create_task(one()))
        await asyncio.sleep(0.3)
    return calls


async def emitting_runs(load: Load, count: int = 3000) -> list[str]:
    """Runs that emit through the outage, each followed by a resuming subscriber."""
    ids = []
    for i in range(3 * SCALE):
        user = ("alice", "bob")[i % 2]
        run = await load.start("ticker", user, count=count, interval=0.01, size=100)
        load.follow(run.run_id, user, give_up=120)
        ids.append(run.run_id)
    return ids


async def lock_row(node: Node, row: Row, hold_s: float, *, count: int, stop: bool) -> list[str]:
    """Holds the lock `hold_s` while runs of `count` ticks emit and StartRun is called; then
    (`stop`) stops what is left, waits for every run to end and checks. The emitting runs."""
    node.args = ["--drain-timeout", f"{DRAIN_S}s", "--stop-grace", f"{GRACE_S}s"]
    await node.start()
    seen = SeenLog()
    starts: Counter[str] = Counter()
    async with load_on(node, seen) as load:
        ids = await emitting_runs(load, count)
        await asyncio.sleep(0.5)
        async with WriteLock(node.db):
            calls = await start_during(load, hold_s, starts)
        await asyncio.gather(*calls)
        for run_id in ids if stop else ():  # a long outage may end runs, never hang them
            with contextlib.suppress(grpc.aio.AioRpcError):
                await load.stop(run_id, load.owners[run_id])
        await wait_all_terminal(load, list(load.owners), limit=60)
        await asyncio.wait_for(load.followed(), 60)
        internal = load.server_internal_errors() + sum(
            n for key, n in starts.items() if key.startswith("INTERNAL")
        )
        errors = dict(load.errors)
        states = Counter([state_name((await load.get(i, load.owners[i])).state) for i in ids])
    exit_code = await node.terminate()
    figures = verify(records_from_db(node.db), seen, owners=load.owners)
    row.set(
        **figures.as_dict(),
        lock_s=hold_s,
        start_outcomes_during_lock=dict(starts),
        subscriber_errors=errors,
        internal_errors=internal,
        emitting_runs_ended=dict(states),
        exit_code=exit_code,
    )
    figures.assert_clean()
    assert internal == 0, f"INTERNAL reached clients: {errors} {dict(starts)}"
    assert exit_code == 0
    return ids


async def test_write_lock_held_briefly(node: Node, row: Row) -> None:
    """An outside connection holds BEGIN EXCLUSIVE for 2 s while runs emit and StartRun is
    called: every StartRun succeeds once the lock is gone (a lock is waited out for 5 s
    before the store counts as unavailable), the runs in flight all SUCCEED, every log is
    complete (checker), exit 0."""
    await lock_row(node, row, SHORT_LOCK_S, count=300, stop=False)
    outcomes = set(row.figures["start_outcomes_during_lock"])
    assert outcomes == {"OK"}, outcomes  # a lock shorter than the lock patience is waited out
    assert row.figures["emitting_runs_ended"] == {"SUCCEEDED": 3 * SCALE}


async def test_write_lock_held_longer_than_the_retry_budget(node: Node, row: Row) -> None:
    """An outside connection holds BEGIN EXCLUSIVE for 25 s, past the writer's retries, while
    runs emit: StartRun is refused cleanly (never INTERNAL), no log gets a hole, every run
    still ends with exactly one terminal event, subscribers never see INTERNAL."""
    await lock_row(node, row, LONG_LOCK_S, count=3000, stop=True)


@contextlib.contextmanager
def _released(lock: WriteLock) -> Iterator[None]:
    try:
        yield
    finally:
        lock._release.set()


async def test_sigterm_while_a_write_lock_is_held(node: Node, row: Row) -> None:
    """SIGTERM while an outside connection holds the write lock (for up to 120 s) and runs
    emit: the process ends within drain + grace + 5 s, not when the lock goes; after the lock
    is released a restart reconciles, and the checker passes."""
    node.args = ["--drain-timeout", f"{DRAIN_S}s", "--stop-grace", f"{GRACE_S}s"]
    await node.start()
    seen = SeenLog()
    async with load_on(node, seen) as load:
        await emitting_runs(load)
        await asyncio.sleep(0.5)
        lock = WriteLock(node.db)
        async with lock:
            with _released(lock):
                await asyncio.sleep(1.0)
                assert node.server is not None
                began = time.monotonic()
                node.server.proc.send_signal(signal.SIGTERM)
                try:
                    exit_code = await node.server.wait_exit(120)
                finally:
                    exit_s = time.monotonic() - began
                    row.set(exit_s=round(exit_s, 1), exit_bound_s=DRAIN_S + GRACE_S + SLACK_S)
        await node.start()
        await wait_all_terminal(load, list(load.owners), limit=60)
        await asyncio.wait_for(load.followed(), 60)
    await node.terminate()
    figures = verify(records_from_db(node.db), seen, owners=load.owners)
    row.set(**figures.as_dict(), exit_code=exit_code)
    figures.assert_clean()
    assert exit_s <= DRAIN_S + GRACE_S + SLACK_S
