"""Durability across real server processes: restart, SIGKILL, SIGTERM drain (promises 2, 4, 5).

Each test runs `runservice serve` as a subprocess on a SQLite file in tmp_path, talks to
it over gRPC, stops it with a signal, starts a new process on the same data directory and
checks what the new process reports.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
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
from tests.serverproc import (
    ServerProcess,
    assert_gap_free,
    bearer,
    error_reason,
    read_log,
    running_server,
    serve_until_exit,
    wait_for,
)


class Client:
    """A raw RunService stub bound to one server process and one user's token."""

    def __init__(self, server: ServerProcess, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(server.addr)
        self.stub = pb_grpc.RunServiceStub(self.channel)
        self.md = bearer(token)

    async def start(self, agent: str, **input: Any) -> run_pb2.Run:
        """Starts a run of `agent` with `input`."""
        struct = struct_pb2.Struct()
        struct.update(input)
        request = pb.StartRunRequest(agent=agent, input=struct)
        return (await self.stub.StartRun(request, metadata=self.md, timeout=10)).run

    async def get(self, run_id: str) -> run_pb2.Run:
        """GetRun."""
        request = pb.GetRunRequest(run_id=run_id)
        return (await self.stub.GetRun(request, metadata=self.md, timeout=10)).run

    async def log(self, run_id: str, from_seq: int = 1) -> list[run_pb2.RunEvent]:
        """The events a Subscribe from `from_seq` delivers until it ends with OK."""
        return await read_log(self.stub, self.md, run_id, from_seq)

    async def wait_terminal(self, run_id: str) -> run_pb2.Run:
        """The run once it is terminal (follows its log to the end, then GetRun)."""
        await self.log(run_id, (await self.get(run_id)).last_seq + 1)
        run = await self.get(run_id)
        assert run.state in TERMINAL
        return run

    async def close(self) -> None:
        """Closes the channel."""
        await self.channel.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data directory."""
    return tmp_path / "data"


@pytest.fixture
def token(data_dir: Path) -> str:
    """A token for user alice in the data directory's tokens file."""
    return add_token(data_dir / "tokens.toml", "alice", [])


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Closes every client a test registers here."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        await client.close()


def connect(clients: list[Client], server: ServerProcess, token: str) -> Client:
    """A client for `server`, closed at the end of the test."""
    client = Client(server, token)
    clients.append(client)
    return client


def state_name(state: int) -> str:
    """RUN_STATE_... for diagnostics."""
    return run_pb2.RunState.Name(state)  # type: ignore[arg-type]


def assert_interrupted_log(events: list[run_pb2.RunEvent], run: run_pb2.Run) -> None:
    """The log is 1..N and ends with a RUN_STATE_INTERRUPTED event carrying an error."""
    assert_gap_free(events)
    last = events[-1]
    assert last.type == "run.state"
    assert last.state == run_pb2.RUN_STATE_INTERRUPTED, state_name(last.state)
    assert last.HasField("error") and last.error.code != 0 and last.error.message
    assert run.state == run_pb2.RUN_STATE_INTERRUPTED, state_name(run.state)
    assert run.last_seq == last.seq
    assert run.HasField("error")
    assert [e for e in events if e.type == "run.state" and e.state in TERMINAL] == [last]


async def test_completed_runs_and_their_logs_are_served_identically_after_a_restart(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """Finished runs keep state, result, last_seq and their exact log across SIGTERM and start."""
    async with running_server(data_dir) as server:
        client = connect(clients, server, token)
        echo = await client.start("echo", text="one two three four")
        ticks = await client.start("ticker", count=50, size=10)
        failing = await client.start("ticker", count=50, fail_at=7)
        runs = [echo, ticks, failing]
        before = {r.run_id: await client.wait_terminal(r.run_id) for r in runs}
        logs_before = {r.run_id: await client.log(r.run_id) for r in runs}
        assert await server.terminate() == 0

    assert before[echo.run_id].state == run_pb2.RUN_STATE_SUCCEEDED
    assert before[ticks.run_id].state == run_pb2.RUN_STATE_SUCCEEDED
    assert before[failing.run_id].state == run_pb2.RUN_STATE_FAILED
    assert sum(e.type == "tick" for e in logs_before[ticks.run_id]) == 50
    assert sum(e.type == "tick" for e in logs_before[failing.run_id]) == 7

    async with running_server(data_dir) as server:
        client = connect(clients, server, token)
        for run_id, old in before.items():
            new = await client.get(run_id)
            assert new.state == old.state
            assert new.result == old.result
            assert new.error == old.error
            assert new.last_seq == old.last_seq
            assert new == old, f"GetRun of {run_id} differs after the restart"

        listed = (
            await client.stub.ListRuns(pb.ListRunsRequest(), metadata=client.md, timeout=10)
        ).runs
        assert [r.run_id for r in listed] == [failing.run_id, ticks.run_id, echo.run_id]
        assert {r.run_id: r for r in listed} == before

        for run_id, old_log in logs_before.items():
            last_seq = before[run_id].last_seq
            log = await client.log(run_id)
            assert log == old_log, f"the log of {run_id} differs after the restart"
            assert_gap_free(log)
            assert log[-1].seq == last_seq and log[-1].state in TERMINAL
            middle = last_seq // 2 + 1
            assert await client.log(run_id, middle) == old_log[middle - 1 :]
            assert await client.log(run_id, last_seq + 1) == []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.log(run_id, last_seq + 2)
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert error_reason(info.value) == "SEQ_OUT_OF_RANGE"

        assert await server.terminate() == 0


async def test_runs_in_flight_at_sigkill_are_interrupted_with_a_terminal_event_after_restart(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """SIGKILL mid-run: the next process marks the runs INTERRUPTED, logs gap-free, nothing lost."""
    async with running_server(data_dir) as server:
        client = connect(clients, server, token)
        ticker = await client.start("ticker", count=100_000, interval=0.01)
        echo = await client.start("echo", text="first second third", delay=60)
        seen: dict[str, list[run_pb2.RunEvent]] = {}
        for run_id, wanted in ((ticker.run_id, 20), (echo.run_id, 2)):
            call = client.stub.Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=client.md, timeout=30
            )
            seen[run_id] = []
            async for response in call:
                seen[run_id].extend(response.events)
                if len(seen[run_id]) >= wanted:
                    break
            call.cancel()
        assert [e.text for e in seen[echo.run_id]] == ["", "first"]
        assert await server.kill() == -9

    async with running_server(data_dir) as server:
        client = connect(clients, server, token)
        for run_id in (ticker.run_id, echo.run_id):
            run = await client.get(run_id)
            log = await client.log(run_id)
            assert_interrupted_log(log, run)
            # Nothing phantom: everything a subscriber saw before the crash is still there.
            assert log[: len(seen[run_id])] == seen[run_id]
        echo_log = await client.log(echo.run_id)
        assert [e.type for e in echo_log] == ["run.state", "token", "run.state"]
        assert await server.terminate() == 0


async def test_sigterm_lets_a_short_run_finish_within_the_drain_timeout(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """SIGTERM drains: a run that ends within --drain-timeout SUCCEEDS, exit 0, restart agrees."""
    words = "alpha beta gamma delta epsilon"
    async with running_server(data_dir, args=["--drain-timeout", "10s"]) as server:
        client = connect(clients, server, token)
        run = await client.start("echo", text=words, delay=0.2)
        call = client.stub.Subscribe(
            pb.SubscribeRequest(run_id=run.run_id, from_seq=1), metadata=client.md, timeout=30
        )
        events: list[run_pb2.RunEvent] = []
        async for response in call:
            events.extend(response.events)
            if any(e.type == "token" for e in events):
                break
        server.proc.send_signal(signal.SIGTERM)

        async def start_refused() -> bool:
            try:
                await client.stub.StartRun(
                    pb.StartRunRequest(agent="no-such-agent"), metadata=client.md, timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    assert error_reason(exc) == "SERVER_DRAINING"
                    return True
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT  # unknown agent
                return False
            raise AssertionError("StartRun of an unknown agent succeeded")

        await wait_for(start_refused, limit=5, message="StartRun was not refused while draining")
        async for response in call:
            events.extend(response.events)
        assert await call.code() == grpc.StatusCode.OK
        assert await server.wait_exit() == 0

    assert_gap_free(events)
    assert [e.text for e in events if e.type == "token"] == words.split()
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    async with running_server(data_dir) as server:
        client = connect(clients, server, token)
        after = await client.get(run.run_id)
        assert after.state == run_pb2.RUN_STATE_SUCCEEDED, state_name(after.state)
        assert dict(after.result) == {"text": words}
        assert after.last_seq == events[-1].seq
        assert await client.log(run.run_id) == events
        assert await server.terminate() == 0


async def test_sigterm_interrupts_a_run_that_outlasts_the_drain_timeout_keeping_its_events(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """Past --drain-timeout the run ends INTERRUPTED; its subscriber sees that event, then OK."""
    async with running_server(data_dir, args=["--drain-timeout", "1s"]) as server:
        client = connect(clients, server, token)
        run = await client.start("ticker", count=1000, interval=0.05)
        call = client.stub.Subscribe(
            pb.SubscribeRequest(run_id=run.run_id, from_seq=1), metadata=client.md, timeout=30
        )
        events: list[run_pb2.RunEvent] = []
        async for response in call:
            events.extend(response.events)
            if sum(e.type == "tick" for e in events) >= 3:
                break
        ticks_before_sigterm = sum(e.type == "tick" for e in events)
        server.proc.send_signal(signal.SIGTERM)
        async for response in call:
            events.extend(response.events)
        assert await call.code() == grpc.StatusCode.OK
        assert await server.wait_exit() == 0

    ticks = sum(e.type == "tick" for e in events)
    # ~20 ticks a second for the 1s drain: well short of 1000, well above what we saw.
    assert ticks_before_sigterm < ticks < 1000
    async with running_server(data_dir) as server:
        client = connect(clients, server, token)
        after = await client.get(run.run_id)
        log = await client.log(run.run_id)
        assert_interrupted_log(log, after)
        assert log == events, "the subscriber saw exactly the persisted log"
        assert await server.terminate() == 0


async def test_a_second_server_on_the_same_data_dir_leaves_the_running_one_undisturbed(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """Starting `serve` again on a data dir in use fails without touching the live server's runs."""
    async with running_server(data_dir) as server:
        try:
            client = connect(clients, server, token)
            # Tokens 3s apart: the second server's reconciliation never races a live commit.
            run = await client.start("echo", text="one two three four five", delay=3)
            call = client.stub.Subscribe(
                pb.SubscribeRequest(run_id=run.run_id, from_seq=1), metadata=client.md, timeout=10
            )
            events: list[run_pb2.RunEvent] = []

            async def read_through(seq: int) -> None:
                async for response in call:
                    events.extend(response.events)
                    if events[-1].seq >= seq:
                        return

            await read_through(2)  # RUNNING, then the first token
            # Another port, so only the data directory is shared.
            second = await serve_until_exit(data_dir)
            assert second.code != 0
            assert f"pid {server.pid}" in second.text, second.text
            # The live server goes on committing its run, and can still stop it cleanly.
            await read_through((await client.get(run.run_id)).last_seq + 1)
            stopped = (
                await client.stub.StopRun(
                    pb.StopRunRequest(run_id=run.run_id), metadata=client.md, timeout=10
                )
            ).run
            assert stopped.state == run_pb2.RUN_STATE_STOPPED, state_name(stopped.state)
            async for response in call:
                events.extend(response.events)
            assert_gap_free(events)
            assert events[-1].state == run_pb2.RUN_STATE_STOPPED
            assert stopped.last_seq == events[-1].seq
        finally:
            # Should the live server's writer be wedged, SIGTERM would wait it out.
            await server.kill()


async def test_a_second_server_on_a_sqlite_file_is_refused_and_pointed_to_postgresql(
    tmp_path: Path,
) -> None:
    """SQLite serves one process: a second server on the same file exits 1 with one line
    naming the first one's pid and pointing to PostgreSQL for several servers."""
    data_dir = tmp_path / "data"
    async with running_server(data_dir) as server:
        refused = await serve_until_exit(data_dir)
        assert refused.code == 1, refused.text
        assert f"another runservice server (pid {server.pid})" in refused.last
        assert "need PostgreSQL" in refused.last
        assert "Traceback" not in refused.text
