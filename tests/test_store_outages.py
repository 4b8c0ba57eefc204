"""A store that stops taking writes: runs keep their promises through the outage.

A real server over a real SQLite file; outages are a write lock held from outside (a
second SQLite connection) or a FailingStore in front of the real store.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runservice import app as app_module
from runservice.app import SERVICE_NAME
from runservice.domain.model import Run, RunState, Scope
from runservice.runtime.lifecycle import reconcile_orphans
from runservice.store import open_store
from runservice.store.engine import sqlite_url
from runservice.store.sql import unavailable_cause
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness
from tests.fakes import FailingStore, FakeClock, gate
from tests.helpers import TERMINAL, error_info, read_all, seqs, start, struct
from tests.serverproc import wait_for

TERMINAL_VALUES = {s.value for s in RunState if s.terminal}
DISK_FULL = "the disk holding the database is full"


@pytest.fixture
async def failing(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[FailingStore]]:
    """Every server the test starts gets a FailingStore in front of its real store."""
    made: list[FailingStore] = []

    async def open_failing(url: str, *args: Any, **kwargs: Any) -> Any:
        store = FailingStore(await open_store(url, *args, **kwargs))
        made.append(store)
        return store

    monkeypatch.setattr(app_module, "open_store", open_failing)
    yield made
    for store in made:
        store.down = None


def _stored_log(data_dir: Path, run_id: str) -> list[tuple[int, str, str | None]]:
    with sqlite3.connect(data_dir / "runservice.db") as conn:
        rows = conn.execute(
            "SELECT seq, type, state FROM run_events WHERE run_id = ? ORDER BY seq", (run_id,)
        ).fetchall()
    return [(int(s), str(t), st) for s, t, st in rows]


def _stored_row(data_dir: Path, run_id: str) -> tuple[str, int]:
    with sqlite3.connect(data_dir / "runservice.db") as conn:
        state, last_seq = conn.execute(
            "SELECT state, last_seq FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
    return str(state), int(last_seq)


def _assert_complete(data_dir: Path, run_id: str) -> list[tuple[int, str, str | None]]:
    """The stored log is 1..N with one terminal event, last, and the row agrees with it."""
    log = _stored_log(data_dir, run_id)
    assert [seq for seq, _, _ in log] == list(range(1, len(log) + 1))
    ends = [i for i, (_, _, state) in enumerate(log) if state in TERMINAL_VALUES]
    assert ends == [len(log) - 1]
    assert _stored_row(data_dir, run_id) == (log[-1][2], len(log))
    return log


async def _state(server: Harness, run_id: str) -> int:
    reply = await server.caller("alice").GetRun(pb.GetRunRequest(run_id=run_id))
    return int(reply.run.state)


async def _ends(server: Harness, run_id: str) -> Callable[[], Awaitable[bool]]:
    async def ended() -> bool:
        return await _state(server, run_id) in TERMINAL

    return ended


async def _health(server: Harness, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def test_a_start_run_whose_caller_gives_up_during_the_commit_still_ends(
    make_server: Callable[..., Awaitable[Harness]], tmp_path: Path
) -> None:
    """StartRun cancelled by its deadline while the database is locked from outside: once
    the lock goes, the run that was committed runs to its end (never RUNNING forever)."""
    server = await make_server()
    holder = sqlite3.connect(tmp_path / "server0" / "runservice.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    alice = server.caller("alice")
    request = pb.StartRunRequest(agent="echo", input=struct(text="a b c"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.StartRun(request, timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    holder.execute("COMMIT")
    holder.close()

    async def listed() -> list[run_pb2.Run]:
        return list((await alice.ListRuns(pb.ListRunsRequest())).runs)

    runs = await wait_for(listed, limit=10, message="the run was never committed")
    for run in runs:
        await wait_for(await _ends(server, run.run_id), limit=10, message="run never ended")
        events = await read_all(alice, run.run_id)
        assert seqs(events) == list(range(1, len(events) + 1))
        assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED


async def test_start_runs_cut_short_by_tiny_deadlines_all_end(
    make_server: Callable[..., Awaitable[Harness]],
) -> None:
    """100 StartRun calls with deadlines of 0.5-10 ms: every run that was committed ends,
    and StopRun on any of them returns it terminal."""
    server = await make_server()
    alice = server.caller("alice")
    rng = random.Random(7)

    async def one() -> None:
        request = pb.StartRunRequest(agent="ticker", input=struct(count=3, interval=0.05))
        try:
            await alice.StartRun(request, timeout=rng.uniform(0.0005, 0.01))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    await asyncio.gather(*(one() for _ in range(100)))
    runs = list((await alice.ListRuns(pb.ListRunsRequest(page_size=1000))).runs)
    for run in runs[: len(runs) // 2]:
        stopped = (await alice.StopRun(pb.StopRunRequest(run_id=run.run_id))).run
        assert stopped.state in TERMINAL
    for run in runs:
        await wait_for(await _ends(server, run.run_id), limit=20, message="run never ended")
        events = await read_all(alice, run.run_id)
        assert seqs(events) == list(range(1, len(events) + 1))
        assert events[-1].state in TERMINAL


async def test_a_long_outage_leaves_every_log_complete_and_recovers_on_its_own(
    make_server: Callable[..., Awaitable[Harness]], failing: list[FailingStore], tmp_path: Path
) -> None:
    """A store down for longer than any retry budget (7 s of a full disk) while a run emits
    and a subscriber follows: readiness goes NOT_SERVING (liveness stays SERVING), StartRun
    is refused UNAVAILABLE / STORE_UNAVAILABLE naming the cause, the subscriber waits; once
    the disk has room again everything recovers and the log is complete, gap-free, once."""
    server = await make_server()
    store = failing[0]
    alice = server.caller("alice")
    run = await start(alice, "ticker", count=400, interval=0.01)
    reader = asyncio.create_task(read_all(alice, run.run_id))

    async def ticked() -> bool:
        return (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run.last_seq >= 20

    await wait_for(ticked, limit=10)
    began = time.monotonic()
    store.down = DISK_FULL
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING, 2)

    async def unready() -> bool:
        return await _health(server, SERVICE_NAME) == not_serving

    await wait_for(unready, limit=10, message="readiness never went NOT_SERVING")
    assert await _health(server, "") == serving
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start(alice, "echo", text="refused")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None and info.reason == "STORE_UNAVAILABLE"
    assert "disk" in (caught.value.details() or "") and "full" in (caught.value.details() or "")
    assert (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run.state == (
        run_pb2.RUN_STATE_RUNNING
    )
    await wait_for(lambda: time.monotonic() - began >= 7, limit=10)
    assert not reader.done()
    store.down = None

    async def ready() -> bool:
        return await _health(server, SERVICE_NAME) == serving

    await wait_for(ready, limit=10, message="readiness never came back")
    events = await asyncio.wait_for(reader, 30)
    assert seqs(events) == list(range(1, 403))
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    assert [e.type for e in events].count("tick") == 400
    _assert_complete(tmp_path / "server0", run.run_id)
    await read_all(alice, (await start(alice, "echo", text="accepted again")).run_id)


async def test_a_run_started_while_the_disk_fills_is_withdrawn_whole(
    make_server: Callable[..., Awaitable[Harness]], failing: list[FailingStore], tmp_path: Path
) -> None:
    """StartRun caught by the outage waits at most about a second, then is refused
    STORE_UNAVAILABLE, and nothing of that run is ever stored, even after recovery."""
    server = await make_server()
    store = failing[0]
    alice = server.caller("alice")
    store.down = DISK_FULL
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start(alice, "echo", text="never stored")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info is not None and info.reason == "STORE_UNAVAILABLE"
    store.down = None

    async def ready() -> bool:
        return await _health(server, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING

    await wait_for(ready, limit=10, message="readiness never came back")
    run = await start(alice, "echo", text="stored")
    await read_all(alice, run.run_id)
    listed = (await alice.ListRuns(pb.ListRunsRequest())).runs
    assert [r.run_id for r in listed] == [run.run_id]


async def test_a_run_whose_events_are_refused_for_good_ends_failed_at_the_next_seq(
    make_server: Callable[..., Awaitable[Harness]], failing: list[FailingStore], tmp_path: Path
) -> None:
    """The store refuses one run's event for good: that run ends FAILED with its terminal
    event right after its last committed one (no hole, nothing after it), subscribers end
    OK on that event, memory and store agree; another run is untouched."""
    server = await make_server()
    failing[0].refuse = "poison"
    alice = server.caller("alice")
    bystander = await start(alice, "ticker", count=50, interval=0.005)
    run = await start(alice, "poisoned", before=5, after=5, gate="poison-now")
    await wait_for(lambda: _stored_log(tmp_path / "server0", run.run_id)[-1:] != [], limit=5)

    async def stepped() -> bool:
        return (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run.last_seq >= 6

    await wait_for(stepped, limit=10)
    reader = asyncio.create_task(read_all(alice, run.run_id))
    gate("poison-now").set()
    events = await asyncio.wait_for(reader, 20)
    assert seqs(events) == list(range(1, 8))
    assert [e.type for e in events] == ["run.state"] + ["step"] * 5 + ["run.state"]
    assert events[-1].state == run_pb2.RUN_STATE_FAILED
    assert "could not store" in events[-1].error.message
    got = (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
    assert (got.state, got.last_seq) == (run_pb2.RUN_STATE_FAILED, 7)
    log = _assert_complete(tmp_path / "server0", run.run_id)
    assert log[-1] == (7, "run.state", RunState.FAILED.value)
    other = await read_all(alice, bystander.run_id)
    assert other[-1].state == run_pb2.RUN_STATE_SUCCEEDED and len(other) == 52


def test_a_full_disk_is_named_as_such() -> None:
    """SQLite's "database or disk is full" (a real one, from a capped database) is reported
    as a full disk, and a held write lock as a lock."""
    conn = sqlite3.connect(":memory:")
    conn.execute("PRAGMA max_page_count = 2")
    with pytest.raises(sqlite3.OperationalError) as full:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 4000,)] * 10)
    assert unavailable_cause(full.value) == DISK_FULL
    assert unavailable_cause(sqlite3.OperationalError("database is locked")) == (
        "the database is locked by another process"
    )


async def test_reconciliation_at_start_waits_out_a_lock_held_by_another_process(
    tmp_path: Path,
) -> None:
    """A start that finds unfinished runs while another process holds the write lock for a
    moment waits for it, then ends them INTERRUPTED right after their last event."""
    path = tmp_path / "runservice.db"
    store = await open_store(sqlite_url(str(path)))
    run = Run("orphan", "alice", "echo", RunState.RUNNING, datetime.now(UTC), last_seq=0)
    await store.commit([run], [], [])
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = asyncio.get_running_loop().call_later(0.6, holder.execute, "COMMIT")
    try:
        assert await reconcile_orphans(store, FakeClock()) == (1, [])
    finally:
        release.cancel()
        holder.close()
    got = await store.get_run(Scope("alice"), "orphan")
    assert got is not None and (got.state, got.last_seq) == (RunState.INTERRUPTED, 1)
    await store.close()


async def test_an_idle_server_notices_an_outage_and_its_end_on_its_own(
    make_server: Callable[..., Awaitable[Harness]], failing: list[FailingStore]
) -> None:
    """With no work at all, a store that stops taking writes turns readiness NOT_SERVING
    within seconds (the writer probes it), and SERVING again once it recovers."""
    server = await make_server()
    store = failing[0]
    store.down = DISK_FULL

    async def status() -> int:
        return await _health(server, SERVICE_NAME)

    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    await wait_for(lambda: _is(status, not_serving), limit=15, message="idle outage never noticed")
    assert await _health(server, "") == health_pb2.HealthCheckResponse.SERVING
    store.down = None
    serving = health_pb2.HealthCheckResponse.SERVING
    await wait_for(lambda: _is(status, serving), limit=15, message="recovery never noticed")


async def _is(check: Callable[[], Awaitable[int]], expected: int) -> bool:
    return await check() == expected


async def test_start_runs_queued_behind_a_failing_commit_are_refused_too(
    make_server: Callable[..., Awaitable[Harness]], failing: list[FailingStore]
) -> None:
    """StartRun calls made while an emitting run's commit is being retried (their rows
    queued behind it) are refused STORE_UNAVAILABLE about a second into the outage, like
    the rows of the commit itself, not kept waiting until the store is back; none of those
    runs is ever stored."""
    server = await make_server()
    store = failing[0]
    alice = server.caller("alice")
    ticking = await start(alice, "ticker", count=2000, interval=0.005)
    store.down = DISK_FULL
    await wait_for(lambda: store.failed_commits > 0, limit=5, message="no commit failed")

    async def refused_within(limit: float) -> str:
        request = pb.StartRunRequest(agent="echo", input=struct(text="queued"))
        try:
            await alice.StartRun(request, timeout=limit)
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            return f"{exc.code().name}:{info.reason if info else ''}"
        return "OK"

    outcomes = await asyncio.gather(*(refused_within(5.0) for _ in range(3)))
    store.down = None
    assert outcomes == ["UNAVAILABLE:STORE_UNAVAILABLE"] * 3
    await wait_for(await _ends(server, ticking.run_id), limit=30)
    listed = (await alice.ListRuns(pb.ListRunsRequest())).runs
    assert [r.run_id for r in listed] == [ticking.run_id]
