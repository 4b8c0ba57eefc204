"""PostgreSQL under faults: the server SIGKILLed under load, the database restarted, out of
reach for a while (with a SIGTERM meanwhile), its sessions ended.

Each row runs a real `runservice serve --db postgresql+asyncpg://...` on a database of its
own on the session's private PostgreSQL (faults/pg.py), and ends with the shared checker
reading that database.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from faults.checker import SeenLog, records_from_api, verify
from faults.harness import (
    SCALE,
    Load,
    Node,
    isolation_leaks,
    load_on,
    state_name,
    wait_all_terminal,
)
from faults.pg import FaultPg
from faults.report import Row
from faults.test_kill import USERS, keep_starting, start_mixed
from faults.test_lock import DRAIN_S, GRACE_S, SLACK_S, emitting_runs
from runservice.client.errors import error_info
from runservice.v1 import run_service_pb2
from tests.serverproc import wait_for

SERVICE_NAME = run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name
KILL_ROUNDS = 4
RUNS_PER_ROUND = 6 * SCALE
RESTARTS = 3
RESTART_EVERY_S = 1.0
OUTAGE_S = 10.0
SESSION_KILLS = 20
SESSION_KILL_EVERY_S = 0.15
START_EVERY_S = 0.3
RECOVERY_LIMIT_S = 30.0
# What StartRun may answer while the database is away: accepted, or refused as unavailable.
START_OUTCOMES_ALLOWED = frozenset({"OK", "UNAVAILABLE:STORE_UNAVAILABLE"})


class Readiness:
    """Polls the RunService's readiness (grpc.health.v1) every 0.2 s while open; records
    each change of what it answers, with the time of the change."""

    def __init__(self, node: Node) -> None:
        self._channel = grpc.aio.insecure_channel(node.addr)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self.changes: list[tuple[float, str]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Readiness:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._channel.close()

    @property
    def seen(self) -> list[str]:
        """The statuses answered, each change once, in order."""
        return [status for _, status in self.changes]

    async def check(self) -> str:
        """SERVING, NOT_SERVING, or the code of a failed check."""
        try:
            reply = await self._stub.Check(  # type: ignore[attr-defined]  # stubs lack it
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def _poll(self) -> None:
        while True:
            status = await self.check()
            if not self.changes or self.changes[-1][1] != status:
                self.changes.append((time.monotonic(), status))
            await asyncio.sleep(0.2)

    async def serving_again(self, limit: float = RECOVERY_LIMIT_S) -> float:
        """Waits until readiness answers SERVING; returns when it did (monotonic)."""

        async def serving() -> bool:
            return await self.check() == "SERVING"

        await wait_for(serving, limit=limit, interval=0.1, message="readiness stayed down")
        return time.monotonic()


async def start_while(load: Load, fault: asyncio.Task[None], outcomes: Counter[str]) -> None:
    """Calls StartRun every START_EVERY_S (not waiting for earlier calls) until `fault` is
    done, counting each call's outcome (OK, or code:reason); returns once every call has
    ended. Started runs are followed."""

    async def one() -> None:
        try:
            run = await load.start("echo", "alice", text="during the fault")
            load.follow(run.run_id, "alice", give_up=120)
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            outcomes[f"{exc.code().name}:{info.reason if info else ''}"] += 1

    calls = []
    while not fault.done():
        calls.append(asyncio.create_task(one()))
        await asyncio.sleep(START_EVERY_S)
    await fault
    await asyncio.gather(*calls)


async def fault_under_load(
    node: Node, row: Row, fault: Callable[[], Coroutine[Any, Any, None]], *, count: int
) -> None:
    """Runs of `count` ticks emit, followed by resuming subscribers, while `fault` is done to
    the database and StartRun is called throughout; then the server must recover on its own
    (readiness SERVING, a new run accepted), every run must end SUCCEEDED, no INTERNAL may
    have reached a client, every log must pass the checker, and SIGTERM must exit 0."""
    node.args = ["--drain-timeout", f"{DRAIN_S}s", "--stop-grace", f"{GRACE_S}s"]
    await node.start()
    seen = SeenLog()
    starts: Counter[str] = Counter()
    async with load_on(node, seen) as load, Readiness(node) as readiness:
        ids = await emitting_runs(load, count)
        await asyncio.sleep(0.5)
        began = time.monotonic()
        await start_while(load, asyncio.create_task(fault()), starts)
        fault_s = time.monotonic() - began
        back = time.monotonic()
        recovered_s = await readiness.serving_again() - back
        after = await load.start("echo", "bob", text="after the fault")
        load.follow(after.run_id, "bob")
        await wait_all_terminal(load, list(load.owners), limit=120)
        streams = await asyncio.wait_for(load.followed(), 120)
        states = Counter([state_name((await load.get(i, load.owners[i])).state) for i in ids])
        leaks = await isolation_leaks(load, list(load.owners))
        internal = load.server_internal_errors() + sum(
            n for key, n in starts.items() if key.startswith("INTERNAL")
        )
        errors = dict(load.errors)
    exit_code = await node.terminate()
    figures = verify(await node.records(), seen, owners=load.owners)
    row.set(
        **figures.as_dict(),
        fault_s=round(fault_s, 1),
        commit_failures_logged=commit_failures(node),
        start_outcomes_during_fault=dict(starts),
        readiness_seen=readiness.seen,
        serving_again_after_s=round(recovered_s, 2),
        emitting_runs_ended=dict(states),
        subscriber_errors=errors,
        internal_errors=internal,
        isolation_leaks=len(leaks),
        exit_code=exit_code,
    )
    figures.assert_clean()
    assert internal == 0, f"INTERNAL reached clients: {errors} {dict(starts)}"
    assert set(starts) <= START_OUTCOMES_ALLOWED, dict(starts)
    assert states == {"SUCCEEDED": len(ids)}, dict(states)
    assert all(s.saw_terminal for s in streams)
    assert not leaks, leaks
    assert exit_code == 0


def commit_failures(node: Node) -> dict[str, int]:
    """How many streaks of failed commits the server logged, by the cause it named."""
    assert node.server is not None
    causes = re.findall(r"the store took no commit \((.*?)\); retrying", node.server.log_text())
    return dict(Counter(causes))


def database_of(node: Node) -> str:
    """The name of the node's PostgreSQL database."""
    assert node.db_url is not None
    name = make_url(node.db_url).database
    assert name
    return name


async def test_sigkill_at_random_points_during_load_on_postgresql(pg_node: Node, row: Row) -> None:
    """On PostgreSQL: runs start, emit and are followed by resuming subscribers while the
    server is SIGKILLed at a random moment, 4 times, and restarted on the same
    port each time. Afterwards every log in the database is gap-free and ends with one
    terminal event, nothing a subscriber saw is missing or changed, no run is left active,
    users stay isolated. Reports restart time."""
    node = pg_node
    node.args = ["--stop-grace", "1s", "--drain-timeout", "2s"]
    await node.start()
    seen = SeenLog()
    ids: list[str] = []
    restarts: list[float] = []
    async with load_on(node, seen) as load:
        for _ in range(KILL_ROUNDS):
            ids += await start_mixed(load, RUNS_PER_ROUND)
            starter = asyncio.create_task(keep_starting(load, ids))
            await asyncio.sleep(random.uniform(0.2, 2.0))
            await node.kill()
            starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starter
            restarts.append(await node.start())
        row.set(
            kills=KILL_ROUNDS,
            runs_started=len(ids),
            restart_s_median=round(statistics.median(restarts), 2),
            restart_s_max=round(max(restarts), 2),
        )
        streams = await asyncio.wait_for(load.followed(), 120)
        leaks = await isolation_leaks(load, ids)
        users = {u: node.tokens[u] for u in USERS}
        live = verify(await records_from_api(node.addr, users), owners=load.owners)
    exit_code = await node.terminate()
    figures = verify(await node.records(), seen, owners=load.owners)
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


async def test_postgresql_restarted_under_load(pg_node: Node, postgres: FaultPg, row: Row) -> None:
    """`pg_ctl restart -m fast` of the database, 3 times 1 s apart, while runs emit,
    subscribers follow and StartRun is called every 0.3 s: StartRun answers OK or
    UNAVAILABLE (STORE_UNAVAILABLE), never INTERNAL; the runs in flight all SUCCEED once the
    database is back; readiness is SERVING again on its own and a new run is accepted;
    checker clean; exit 0."""

    async def restart() -> None:
        for n in range(RESTARTS):
            await asyncio.sleep(RESTART_EVERY_S if n else 0)
            await asyncio.to_thread(postgres.restart)

    await fault_under_load(pg_node, row, restart, count=1000)


async def test_postgresql_unreachable_for_10_s(pg_node: Node, postgres: FaultPg, row: Row) -> None:
    """`pg_ctl stop -m immediate` of the database for 10 s, then started again (it recovers
    from its write-ahead log), while runs emit, subscribers follow and StartRun is called
    every 0.3 s: readiness NOT_SERVING meanwhile and SERVING again on its own, StartRun OK
    or UNAVAILABLE (STORE_UNAVAILABLE), never INTERNAL; the runs in flight all SUCCEED with
    nothing lost; checker clean; exit 0."""

    async def outage() -> None:
        await asyncio.to_thread(postgres.stop_now)
        try:
            await asyncio.sleep(OUTAGE_S)
        finally:
            await asyncio.to_thread(postgres.resume)

    await fault_under_load(pg_node, row, outage, count=1500)
    assert "NOT_SERVING" in row.figures["readiness_seen"], row.figures["readiness_seen"]


async def test_postgresql_sessions_ended_under_load(
    pg_node: Node, postgres: FaultPg, row: Row
) -> None:
    """`pg_terminate_backend` of every session on the server's database, 20 times
    0.15 s apart, while runs emit, subscribers follow and StartRun is called: the pool opens
    new connections, StartRun answers OK or UNAVAILABLE, never INTERNAL; the runs all
    SUCCEED with nothing lost; checker clean; exit 0."""
    name = database_of(pg_node)
    ended: list[int] = []

    async def end_sessions() -> None:
        for _ in range(SESSION_KILLS):
            ended.append(await asyncio.to_thread(postgres.end_sessions, name))
            await asyncio.sleep(SESSION_KILL_EVERY_S)

    await fault_under_load(pg_node, row, end_sessions, count=500)
    row.set(sessions_ended=ended)


async def test_sigterm_while_postgresql_is_unreachable(
    pg_node: Node, postgres: FaultPg, row: Row
) -> None:
    """SIGTERM while the database is stopped (`pg_ctl stop -m immediate`) and runs emit: the
    process ends within drain + grace + 5 s, not when the database returns; once it is back
    a restart reconciles the runs, subscribers resume to their terminal events, and the
    checker passes."""
    node = pg_node
    node.args = ["--drain-timeout", f"{DRAIN_S}s", "--stop-grace", f"{GRACE_S}s"]
    await node.start()
    seen = SeenLog()
    bound = DRAIN_S + GRACE_S + SLACK_S
    async with load_on(node, seen) as load:
        ids = await emitting_runs(load)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(postgres.stop_now)
        try:
            await asyncio.sleep(2.0)  # the writer retries, readiness goes NOT_SERVING
            assert node.server is not None
            began = time.monotonic()
            node.server.proc.send_signal(signal.SIGTERM)
            try:
                exit_code = await node.server.wait_exit(60)
            finally:
                exit_s = time.monotonic() - began
                row.set(exit_s=round(exit_s, 1), exit_bound_s=bound)
        finally:
            await asyncio.to_thread(postgres.resume)
        await node.start()
        await wait_all_terminal(load, list(load.owners), limit=60)
        streams = await asyncio.wait_for(load.followed(), 60)
        states = Counter([state_name((await load.get(i, load.owners[i])).state) for i in ids])
        internal = load.server_internal_errors()
    await node.terminate()
    figures = verify(await node.records(), seen, owners=load.owners)
    row.set(
        **figures.as_dict(),
        exit_code=exit_code,
        runs_ended=dict(states),
        internal_errors=internal,
    )
    figures.assert_clean()
    assert exit_s <= bound
    assert all(s.saw_terminal for s in streams)
    assert internal == 0, dict(load.errors)
