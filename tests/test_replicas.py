"""Replicas: two or three real `runservice serve` processes on one real PostgreSQL.

Any replica serves any call for any run; leases end a dead replica's runs and fence a
replica that was paused past its lease; start decisions hold across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.helpers import TERMINAL
from tests.pgserver import PgServer
from tests.serverproc import (
    ServerProcess,
    assert_gap_free,
    bearer,
    error_reason,
    read_log,
    start_server,
    wait_for,
)

LEASE_TTL = 2.0


@dataclass
class Cluster:
    """Replicas on one database, a stub on each, and a user's credentials."""

    servers: list[ServerProcess]
    stubs: list[Any]
    md: Any
    db: str
    dirs: list[Path]
    args: list[str]


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, postgres: PgServer, replicas: int = 2, extra: Sequence[str] = ()
) -> AsyncIterator[Cluster]:
    db = postgres.create_database()
    tokens = tmp_path / "tokens.toml"
    md = bearer(add_token(tokens, "alice", []))
    args = [
        "--db",
        postgres.url(db),
        "--tokens-file",
        str(tokens),
        "--lease-ttl",
        f"{LEASE_TTL:g}s",
        "--drain-timeout",
        "2s",
        "--stop-grace",
        "1s",
        *extra,
    ]
    dirs = [tmp_path / f"replica-{i}" for i in range(replicas)]
    servers: list[ServerProcess] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for path in dirs:
            servers.append(await start_server(path, args=args))
        channels = [grpc.aio.insecure_channel(s.addr) for s in servers]
        stubs = [pb_grpc.RunServiceStub(c) for c in channels]
        yield Cluster(servers, stubs, md, db, dirs, args)
    except BaseException:
        for server in servers:
            print(f"--- {server.log_path} ---\n{server.log_tail()}")
        raise
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)
            if server.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await server.terminate(limit=15.0)
            await server.kill()
        postgres.drop_database(db)


def ticker(count: int, interval: float, **fields: Any) -> pb.StartRunRequest:
    struct = struct_pb2.Struct()
    struct.update({"count": count, "interval": interval})
    return pb.StartRunRequest(agent="ticker", input=struct, **fields)


async def get(stub: Any, md: Any, run_id: str) -> run_pb2.Run:
    return (await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run


async def reached(stub: Any, md: Any, run_id: str, seq: int) -> bool:
    return (await get(stub, md, run_id)).last_seq >= seq


def one_terminal(events: Sequence[Any]) -> None:
    """The log is gap-free and its only terminal event is its last."""
    assert_gap_free(events)
    terminal = [e.seq for e in events if e.state in TERMINAL]
    assert terminal == [events[-1].seq], terminal


async def test_a_replica_serves_the_log_of_a_run_another_executes(
    tmp_path: Path, postgres: PgServer
) -> None:
    """Started on A, subscribed on B live from seq 1 and from the middle after a
    disconnect: both identical to A's replay, byte for byte, gap-free."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        run = (await a.StartRun(ticker(300, 0.004), metadata=c.md)).run
        live_on_b = asyncio.create_task(read_log(b, c.md, run.run_id))
        # From the middle after a disconnect: read some, drop the stream, resume on B.
        first: list[Any] = []
        call = b.Subscribe(pb.SubscribeRequest(run_id=run.run_id, from_seq=1), metadata=c.md)
        async for response in call:
            first.extend(response.events)
            if len(first) >= 50:
                break
        call.cancel()
        rest = await read_log(b, c.md, run.run_id, from_seq=first[-1].seq + 1)
        from_b = await live_on_b
        replay_on_a = await read_log(a, c.md, run.run_id)
        one_terminal(replay_on_a)
        assert replay_on_a[-1].state == run_pb2.RUN_STATE_SUCCEEDED
        wire = [e.SerializeToString() for e in replay_on_a]
        assert [e.SerializeToString() for e in from_b] == wire
        assert [e.SerializeToString() for e in first + rest] == wire
        # GetRun and ListRuns on B agree with A.
        assert (await get(b, c.md, run.run_id)) == (await get(a, c.md, run.run_id))


async def test_stop_on_one_replica_stops_a_run_executing_on_another(
    tmp_path: Path, postgres: PgServer
) -> None:
    """StopRun on B stops a run executing on A and returns it STOPPED; 20 runs, each
    stopped concurrently on A and on B while completing, end with one terminal event."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        run = (await a.StartRun(ticker(100_000, 0.01), metadata=c.md)).run
        await wait_for(lambda: reached(b, c.md, run.run_id, 3), limit=10)
        stopped = (
            await b.StopRun(pb.StopRunRequest(run_id=run.run_id, reason="enough"), metadata=c.md)
        ).run
        assert stopped.state == run_pb2.RUN_STATE_STOPPED
        assert stopped.stop_reason == "enough"
        events = await read_log(a, c.md, run.run_id)
        one_terminal(events)
        assert events[-1].state == run_pb2.RUN_STATE_STOPPED

        runs = [(await a.StartRun(ticker(20, 0.005), metadata=c.md)).run for _ in range(20)]

        async def stop(stub: Any, run_id: str) -> run_pb2.Run:
            request = pb.StopRunRequest(run_id=run_id, reason="race")
            return (await stub.StopRun(request, metadata=c.md)).run

        ended = await asyncio.gather(*(stop(s, r.run_id) for r in runs for s in (a, b)))
        assert all(r.state in TERMINAL for r in ended)
        for r in runs:
            log = await read_log(b, c.md, r.run_id)
            one_terminal(log)
            final = await get(a, c.md, r.run_id)
            assert final.state == log[-1].state
            assert final.last_seq == log[-1].seq


async def test_a_killed_replica_s_runs_are_interrupted_by_a_survivor(
    tmp_path: Path, postgres: PgServer
) -> None:
    """SIGKILL A with runs in flight: B's subscribers see INTERRUPTED within the lease
    plus a sweep, each log gap-free with one terminal event."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        runs = [(await a.StartRun(ticker(100_000, 0.01), metadata=c.md)).run for _ in range(5)]
        for r in runs:
            await wait_for(lambda r=r: reached(b, c.md, r.run_id, 3), limit=10)
        readers = [asyncio.create_task(read_log(b, c.md, r.run_id, deadline=60)) for r in runs]
        await c.servers[0].kill()
        killed_at = time.monotonic()
        logs = await asyncio.gather(*readers)
        took = time.monotonic() - killed_at
        for log in logs:
            one_terminal(log)
            assert log[-1].state == run_pb2.RUN_STATE_INTERRUPTED
        # lease-ttl, then the survivor's next renewal (a third of it), and slack.
        assert took < LEASE_TTL * 2 + 5, took


async def test_a_killed_replica_s_resumable_run_resumes_on_a_survivor(
    tmp_path: Path, postgres: PgServer
) -> None:
    """SIGKILL A while it executes a counter: B's sweep takes the run over and resumes it
    from its checkpoint; a reader on B follows it gap-free to SUCCEEDED, every tick from
    1 to count present around the resume."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        count = 80
        struct = struct_pb2.Struct()
        struct.update({"count": count, "interval": 0.05, "checkpoint_every": 5})
        request = pb.StartRunRequest(agent="counter", input=struct)
        run = (await a.StartRun(request, metadata=c.md)).run
        await wait_for(lambda: reached(b, c.md, run.run_id, 14), limit=20)
        reader = asyncio.create_task(read_log(b, c.md, run.run_id, deadline=90))
        await c.servers[0].kill()
        log = await reader
        one_terminal(log)
        assert log[-1].state == run_pb2.RUN_STATE_SUCCEEDED
        resumes = [e for e in log if e.type == "run.state" and e.resumed_from_seq]
        assert len(resumes) == 1
        resumed = resumes[0]
        ticks = [
            int(e.data["i"])
            for e in log
            if e.type == "tick" and (e.seq <= resumed.resumed_from_seq or e.seq > resumed.seq)
        ]
        assert ticks == list(range(1, count + 1))
        final = await get(b, c.md, run.run_id)
        assert final.resume_count == 1 and final.state == run_pb2.RUN_STATE_SUCCEEDED


async def test_input_and_stops_reach_a_run_through_any_replica(
    tmp_path: Path, postgres: PgServer
) -> None:
    """A run A executes waits for input: B's GetRun and WatchRuns show it waiting;
    SendInput on B appends the input (a retry on B answers the same event) and the run
    finishes; a StopRun on B of another waiting run is in its log, with who sent it."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        question = struct_pb2.Struct()
        question.update({"question": "ship it?"})
        request = pb.StartRunRequest(agent="approval", input=question)
        watch = b.WatchRuns(pb.WatchRunsRequest(waiting_for_input=True), metadata=c.md)
        run = (await a.StartRun(request, metadata=c.md)).run
        async for update in watch:
            if update.run.run_id == run.run_id and update.run.waiting_for_input:
                assert update.change == pb.RUN_CHANGE_UPDATED
                break
        watch.cancel()
        assert (await get(b, c.md, run.run_id)).waiting_for_input
        answer = struct_pb2.Struct()
        answer.update({"approve": True, "note": "from b"})
        send = pb.SendInputRequest(run_id=run.run_id, input=answer, request_id="k1")
        first = (await b.SendInput(send, metadata=c.md)).event
        again = (await b.SendInput(send, metadata=c.md)).event
        assert first.type == "input" and again.seq == first.seq
        log = await read_log(b, c.md, run.run_id)
        one_terminal(log)
        assert log[-1].state == run_pb2.RUN_STATE_SUCCEEDED
        assert [e.type for e in log].count("input") == 1

        other = (await a.StartRun(request, metadata=c.md)).run
        await wait_for(lambda: waiting(b, c.md, other.run_id), limit=10)
        stop = pb.StopRunRequest(run_id=other.run_id, reason="from b")
        stopped = (await b.StopRun(stop, metadata=c.md)).run
        assert stopped.state == run_pb2.RUN_STATE_STOPPED
        log = await read_log(b, c.md, other.run_id)
        one_terminal(log)
        assert log[-2].type == "run.stop_requested"
        assert dict(log[-2].data) == {"reason": "from b", "by": "alice"}


async def waiting(stub: Any, md: Any, run_id: str) -> bool:
    return (await get(stub, md, run_id)).waiting_for_input


async def test_a_replica_paused_past_its_lease_is_fenced(
    tmp_path: Path, postgres: PgServer
) -> None:
    """SIGSTOP A past its lease, then SIGCONT: B has interrupted A's runs; A's later
    writes (agent events included) are refused by the database, so each log ends with
    exactly one terminal event; A then takes a new lease and runs new runs."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        runs = [(await a.StartRun(ticker(100_000, 0.005), metadata=c.md)).run for _ in range(4)]
        for r in runs:
            await wait_for(lambda r=r: reached(b, c.md, r.run_id, 3), limit=10)
        os.kill(c.servers[0].pid, signal.SIGSTOP)
        try:
            for r in runs:
                log = await read_log(b, c.md, r.run_id, deadline=60)
                assert log[-1].state == run_pb2.RUN_STATE_INTERRUPTED
        finally:
            os.kill(c.servers[0].pid, signal.SIGCONT)
        server = c.servers[0]
        await wait_for(
            lambda: "lease" in server.log_text() and "new lease" in server.log_text(),
            limit=20,
            message="the paused replica did not notice its lease was gone",
        )
        # Each run left as fenced, whichever noticed first: the writer, whose commit the
        # database refused, or the lease loop, which found the lease ended.
        for r in runs:
            await wait_for(
                lambda r=r: f"run {r.run_id} dropped here" in server.log_text(),
                limit=10,
                message=f"run {r.run_id} was not dropped as fenced",
            )
        assert "abandoned" not in server.log_text()
        assert "never retrieved" not in server.log_text()
        for r in runs:
            log = await read_log(a, c.md, r.run_id)
            one_terminal(log)
            assert log[-1].state == run_pb2.RUN_STATE_INTERRUPTED
            assert (await get(a, c.md, r.run_id)).last_seq == log[-1].seq
        fresh = (await a.StartRun(ticker(5, 0.0), metadata=c.md)).run
        log = await read_log(b, c.md, fresh.run_id)
        one_terminal(log)
        assert log[-1].state == run_pb2.RUN_STATE_SUCCEEDED


async def test_start_decisions_hold_across_replicas(tmp_path: Path, postgres: PgServer) -> None:
    """20 concurrent StartRun over both replicas: one thread under REJECT admits exactly
    one; one request_id makes one run; --max-active-per-user admits exactly the cap."""
    async with cluster(tmp_path, postgres, extra=["--max-active-per-user", "3"]) as c:

        async def start(i: int, request: pb.StartRunRequest) -> Any:
            try:
                return (await c.stubs[i % 2].StartRun(request, metadata=c.md)).run
            except grpc.aio.AioRpcError as exc:
                return exc

        long = ticker(100_000, 0.05)
        outcomes = await asyncio.gather(
            *(start(i, ticker(100_000, 0.05, thread_id="t1")) for i in range(20))
        )
        accepted = [o for o in outcomes if isinstance(o, run_pb2.Run)]
        refused = [o for o in outcomes if not isinstance(o, run_pb2.Run)]
        assert len(accepted) == 1, outcomes
        assert {error_reason(e) for e in refused} == {"THREAD_BUSY"}
        await c.stubs[1].StopRun(pb.StopRunRequest(run_id=accepted[0].run_id), metadata=c.md)

        same = ticker(100_000, 0.05, request_id="req-1")
        outcomes = await asyncio.gather(*(start(i, same) for i in range(20)))
        assert all(isinstance(o, run_pb2.Run) for o in outcomes), outcomes
        assert len({o.run_id for o in outcomes}) == 1
        await c.stubs[0].StopRun(pb.StopRunRequest(run_id=outcomes[0].run_id), metadata=c.md)

        outcomes = await asyncio.gather(*(start(i, long) for i in range(20)))
        accepted = [o for o in outcomes if isinstance(o, run_pb2.Run)]
        refused = [o for o in outcomes if not isinstance(o, run_pb2.Run)]
        assert len(accepted) == 3, outcomes
        assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_list_and_watch_span_the_replicas(tmp_path: Path, postgres: PgServer) -> None:
    """ListRuns paged alternately on A and B returns every run once; WatchRuns on B sees
    runs executing on A reach their terminal state."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        watch = b.WatchRuns(pb.WatchRunsRequest(), metadata=c.md)
        first = await watch.read()
        assert first.change == pb.RUN_CHANGE_SNAPSHOT_END, first
        started = [(await a.StartRun(ticker(3, 0.01), metadata=c.md)).run for _ in range(7)]
        started += [(await b.StartRun(ticker(3, 0.01), metadata=c.md)).run for _ in range(6)]
        ended: set[str] = set()

        async def until_ended() -> None:
            while len(ended) < len(started):
                update = await watch.read()
                if update.run.state in TERMINAL:
                    ended.add(update.run.run_id)

        await asyncio.wait_for(until_ended(), 30)
        watch.cancel()
        assert ended == {r.run_id for r in started}

        seen: list[str] = []
        token = ""
        for page in range(100):
            stub = (a, b)[page % 2]
            response = await stub.ListRuns(
                pb.ListRunsRequest(page_size=3, page_token=token), metadata=c.md
            )
            seen.extend(r.run_id for r in response.runs)
            token = response.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(r.run_id for r in started)


@pytest.mark.parametrize("replicas", [2])
async def test_a_draining_replica_refuses_new_runs_while_others_take_them(
    tmp_path: Path, postgres: PgServer, replicas: int
) -> None:
    """While A drains (SIGTERM), it refuses StartRun with SERVER_DRAINING and B starts
    runs; A's run ends within the drain and B's subscribers read it to the end."""
    async with cluster(tmp_path, postgres, replicas, extra=["--drain-timeout", "3s"]) as c:
        a, b = c.stubs
        run = (await a.StartRun(ticker(100_000, 0.01), metadata=c.md)).run
        await wait_for(lambda: reached(b, c.md, run.run_id, 3), limit=10)
        reader = asyncio.create_task(read_log(b, c.md, run.run_id, deadline=60))
        c.servers[0].proc.send_signal(signal.SIGTERM)

        async def refused() -> bool:
            try:
                await a.StartRun(ticker(1, 0.0), metadata=c.md)
            except grpc.aio.AioRpcError as exc:
                return error_reason(exc) == "SERVER_DRAINING" or (
                    exc.code() == grpc.StatusCode.UNAVAILABLE
                )
            return False

        await wait_for(refused, limit=10)
        other = (await b.StartRun(ticker(3, 0.0), metadata=c.md)).run
        assert (await read_log(b, c.md, other.run_id))[-1].state == run_pb2.RUN_STATE_SUCCEEDED
        log = await reader
        one_terminal(log)
        assert log[-1].state == run_pb2.RUN_STATE_INTERRUPTED
        assert await c.servers[0].wait_exit() == 0


async def test_a_thread_s_queue_and_interrupts_span_the_replicas(
    tmp_path: Path, postgres: PgServer
) -> None:
    """ENQUEUE on B behind a run executing on A starts only once A's run ended; INTERRUPT
    on B stops A's run of the thread; DeleteRun on A reaches B's watchers."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        enqueue = run_pb2.MULTITASK_STRATEGY_ENQUEUE
        first = (await a.StartRun(ticker(20, 0.02, thread_id="q"), metadata=c.md)).run
        second = (
            await b.StartRun(
                ticker(3, 0.0, thread_id="q", multitask_strategy=enqueue), metadata=c.md
            )
        ).run
        first_log = await read_log(b, c.md, first.run_id)
        second_log = await read_log(a, c.md, second.run_id)
        one_terminal(first_log)
        one_terminal(second_log)
        assert first_log[-1].state == run_pb2.RUN_STATE_SUCCEEDED
        assert [e.state for e in second_log[:2]] == [
            run_pb2.RUN_STATE_PENDING,
            run_pb2.RUN_STATE_RUNNING,
        ]
        assert second_log[1].time.ToDatetime() >= first_log[-1].time.ToDatetime()
        assert second_log[-1].state == run_pb2.RUN_STATE_SUCCEEDED

        interrupt = run_pb2.MULTITASK_STRATEGY_INTERRUPT
        long = (await a.StartRun(ticker(100_000, 0.01, thread_id="i"), metadata=c.md)).run
        await wait_for(lambda: reached(b, c.md, long.run_id, 3), limit=10)
        newer = (
            await b.StartRun(
                ticker(3, 0.0, thread_id="i", multitask_strategy=interrupt), metadata=c.md
            )
        ).run
        long_log = await read_log(b, c.md, long.run_id)
        one_terminal(long_log)
        assert long_log[-1].state == run_pb2.RUN_STATE_STOPPED
        assert newer.run_id in long_log[-1].error.message or long_log[-1].error.message
        newer_log = await read_log(a, c.md, newer.run_id)
        one_terminal(newer_log)
        assert newer_log[-1].state == run_pb2.RUN_STATE_SUCCEEDED

        watch = b.WatchRuns(pb.WatchRunsRequest(), metadata=c.md)
        seen: set[str] = set()
        while True:
            update = await asyncio.wait_for(watch.read(), 10)
            if update.change == pb.RUN_CHANGE_SNAPSHOT_END:
                break
            seen.add(update.run.run_id)
        done = (await a.StartRun(ticker(1, 0.0), metadata=c.md)).run
        await read_log(a, c.md, done.run_id)
        await a.DeleteRun(pb.DeleteRunRequest(run_id=done.run_id), metadata=c.md)

        async def deleted() -> None:
            while True:
                update = await watch.read()
                if update.change == pb.RUN_CHANGE_DELETED and update.run.run_id == done.run_id:
                    assert update.run.state == run_pb2.RUN_STATE_SUCCEEDED
                    return

        await asyncio.wait_for(deleted(), 15)
        watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await get(b, c.md, done.run_id)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_external_run_takes_appends_on_every_replica_and_outlives_one(
    tmp_path: Path, postgres: PgServer
) -> None:
    """An external run started on A takes appends on A and B at once (each producer
    retrying every append once: no duplicates), a reader on B follows them live, gap-free;
    when A is killed, no survivor interrupts it (nothing executes it): B goes on taking
    appends, and closes it."""
    async with cluster(tmp_path, postgres) as c:
        a, b = c.stubs
        run = (await a.StartRun(pb.StartRunRequest(agent="external"), metadata=c.md)).run
        reader = asyncio.create_task(read_log(b, c.md, run.run_id, deadline=60))

        async def produce(stub: Any, name: str) -> None:
            for seq in range(30):
                event = pb.EventInput(value=struct_pb2.Value(string_value=f"{name}{seq}"))
                for _ in range(2):  # the retry of an answer lost
                    await stub.AppendEvents(
                        pb.AppendEventsRequest(
                            run_id=run.run_id,
                            events=[event],
                            producer_id=name,
                            producer_seq=seq,
                        ),
                        metadata=c.md,
                    )

        await asyncio.gather(produce(a, "a"), produce(b, "b"))
        agent_run = (await a.StartRun(ticker(100_000, 0.01), metadata=c.md)).run
        await c.servers[0].kill()
        # The survivor's sweep ends A's agent run: by then it has passed the external run.
        await wait_for(
            lambda: _state(b, c.md, agent_run.run_id, run_pb2.RUN_STATE_INTERRUPTED),
            limit=LEASE_TTL * 2 + 5,
        )
        got = (await b.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=c.md)).run
        assert got.state == run_pb2.RUN_STATE_RUNNING and got.last_seq == 61
        more = pb.EventInput(value=struct_pb2.Value(string_value="after"))
        await b.AppendEvents(
            pb.AppendEventsRequest(run_id=run.run_id, events=[more]), metadata=c.md
        )
        await b.CloseRun(pb.CloseRunRequest(run_id=run.run_id), metadata=c.md)
        log = await reader
        assert_gap_free(log)
        texts = [e.value.string_value for e in log if e.WhichOneof("payload") == "value"]
        for name in ("a", "b"):  # each producer's, once each, in its order
            assert [t for t in texts[:-1] if t.startswith(name)] == [
                f"{name}{i}" for i in range(30)
            ]
        assert len(texts) == 61
        assert texts[-1] == "after" and log[-1].state == run_pb2.RUN_STATE_SUCCEEDED


async def _state(stub: Any, md: Any, run_id: str, state: int) -> bool:
    run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
    return bool(run.state == state)
