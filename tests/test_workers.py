"""`runservice serve --workers N`: N replica processes on one port, under one parent.

Real subprocesses on the session's private PostgreSQL: connections spread over the
workers, a killed worker comes back, signals stop them all; and the refusals (SQLite,
port 0, a taken port, a worker that cannot start) are one line and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from runservice import config, workers
from runservice.cli import _parser
from runservice.tokens import load_tokens
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.pgserver import PgServer
from tests.serverproc import (
    ServerProcess,
    assert_gap_free,
    bearer,
    read_log,
    serve_until_exit,
    start_server,
    wait_for,
)

WORKERS = 2
TERMINAL = {
    run_pb2.RUN_STATE_SUCCEEDED,
    run_pb2.RUN_STATE_FAILED,
    run_pb2.RUN_STATE_STOPPED,
    run_pb2.RUN_STATE_INTERRUPTED,
    run_pb2.RUN_STATE_TIMED_OUT,
}
UNREACHABLE_DB = "postgresql+asyncpg://nobody@127.0.0.1:1/none"


@dataclass
class Workers:
    """A `serve --workers` parent, its database, and the user's credentials."""

    server: ServerProcess
    postgres: PgServer
    db: str
    md: Any

    def worker_dir(self, index: int) -> Path:
        return self.server.data_dir / f"worker-{index}"

    def pid(self, index: int) -> int:
        """The pid of worker `index`'s current process (its replica lock holds it)."""
        return int((self.worker_dir(index) / "replica.lock").read_text())

    def replica(self, index: int) -> str:
        """Worker `index`'s replica name."""
        return (self.worker_dir(index) / "replica-id").read_text().strip()

    def listening(self, index: int) -> int:
        """How many times worker `index` said it listens."""
        return self.server.log_text().count(f"[worker {index}] runservice.app: listening on")

    def sql(self, query: str) -> list[str]:
        return self.postgres.psql(query, self.db).split()

    def replica_of(self, run_id: str) -> str:
        """The replica whose lease the run executes under ("" once that lease is gone)."""
        found = self.sql(
            "SELECT l.replica FROM runs r JOIN runservice_leases l ON l.holder = r.executor"
            f" WHERE r.run_id = '{run_id}'"
        )
        return found[0] if found else ""


@contextlib.asynccontextmanager
async def serving_workers(
    tmp_path: Path, postgres: PgServer, extra: Sequence[str] = ()
) -> AsyncIterator[Workers]:
    """A parent with WORKERS workers on a new database, once every worker listens."""
    db = postgres.create_database()
    data_dir = tmp_path / "data"
    args = [
        "--workers",
        str(WORKERS),
        "--db",
        postgres.url(db),
        "--dev-token",
        "--lease-ttl",
        "2s",
        "--drain-timeout",
        "2s",
        "--stop-grace",
        "1s",
        *extra,
    ]
    server = await start_server(data_dir, args=args)
    try:
        token = (data_dir / "dev-token").read_text().strip()
        w = Workers(server, postgres, db, bearer(token))
        await wait_for(
            lambda: all(w.listening(i) for i in range(WORKERS)),
            limit=20,
            message="not every worker listens",
        )
        yield w
    except BaseException:
        print(f"--- {server.log_path} ---\n{server.log_tail()}")
        raise
    finally:
        if server.returncode is None:
            with contextlib.suppress(TimeoutError):
                await server.terminate(limit=15.0)
        await server.kill()
        postgres.drop_database(db)


@contextlib.asynccontextmanager
async def connections(addr: str, count: int) -> AsyncIterator[list[Any]]:
    """`count` stubs, each on a TCP connection of its own (which the kernel gives to any
    worker): a channel shares no subchannel with the others."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(addr, options=options) for _ in range(count)]
    try:
        yield [pb_grpc.RunServiceStub(channel) for channel in channels]
    finally:
        for channel in channels:
            await channel.close()


def ticker(count: int, interval: float) -> pb.StartRunRequest:
    struct = struct_pb2.Struct()
    struct.update({"count": count, "interval": interval})
    return pb.StartRunRequest(agent="ticker", input=struct)


async def start(stub: Any, md: Any, count: int, interval: float) -> str:
    run_id: str = (await stub.StartRun(ticker(count, interval), metadata=md)).run.run_id
    return run_id


async def complete_log(stub: Any, md: Any, run_id: str) -> list[Any]:
    """The run's whole log, read until it ends: gap-free, its only terminal event last."""
    events = await read_log(stub, md, run_id)
    assert_gap_free(events)
    assert [e.seq for e in events if e.state in TERMINAL] == [events[-1].seq]
    return events


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_runs_over_many_connections_to_one_port_are_executed_by_every_worker(
    tmp_path: Path, postgres: PgServer
) -> None:
    """Twenty runs started over twenty connections to the one port are executed by both
    workers; each completes and its log replays gap-free over another connection; the
    dev token is written once, in the parent's data dir; SIGTERM stops all, status 0."""
    async with serving_workers(tmp_path, postgres) as w:
        async with connections(w.server.addr, 20) as stubs:
            runs = await asyncio.gather(*(start(stub, w.md, 5, 0.01) for stub in stubs))
            logs = await asyncio.gather(
                *(complete_log(stubs[(i + 7) % 20], w.md, r) for i, r in enumerate(runs))
            )
        assert all(log[-1].state == run_pb2.RUN_STATE_SUCCEEDED for log in logs)
        assert len(w.sql("SELECT DISTINCT executor FROM runs")) == WORKERS
        replicas = w.sql(
            "SELECT DISTINCT l.replica FROM runs r JOIN runservice_leases l"
            " ON l.holder = r.executor"
        )
        assert sorted(replicas) == sorted(w.replica(i) for i in range(WORKERS))

        assert len(load_tokens(w.server.data_dir / "tokens.toml")) == 1
        assert not any((w.worker_dir(i) / "dev-token").exists() for i in range(WORKERS))
        pids = [w.pid(i) for i in range(WORKERS)]
        assert await w.server.terminate() == 0
        assert not any(running(pid) for pid in pids)
        assert "the workers have stopped" in w.server.log_text()


async def test_a_killed_worker_is_restarted_and_the_service_goes_on(
    tmp_path: Path, postgres: PgServer
) -> None:
    """SIGKILL one worker: the parent logs it and starts it again on its data dir; its
    run ends INTERRUPTED, gap-free; the other worker's run goes on; new runs complete;
    SIGTERM then stops all with status 0."""
    async with serving_workers(tmp_path, postgres) as w:
        async with connections(w.server.addr, 40) as stubs:
            on: dict[str, str] = {}  # replica -> a long run it executes
            for stub in stubs:
                run_id = await start(stub, w.md, 100_000, 0.02)
                replica = await wait_for(lambda r=run_id: w.replica_of(r))
                if on.setdefault(replica, run_id) != run_id:
                    await stub.StopRun(pb.StopRunRequest(run_id=run_id), metadata=w.md)
                if len(on) == WORKERS:
                    break
            victim, survivor = on[w.replica(1)], on[w.replica(0)]
            old = w.pid(1)

            os.kill(old, signal.SIGKILL)
            await wait_for(
                lambda: (
                    f"worker 1 (pid {old}) was killed by SIGKILL; restarting it"
                    in w.server.log_text()
                ),
                message="the parent did not notice the killed worker",
            )
            await wait_for(lambda: w.listening(1) == 2, limit=20, message="no new worker 1")
            assert w.pid(1) != old
            log = await complete_log(stubs[-1], w.md, victim)
            assert log[-1].state == run_pb2.RUN_STATE_INTERRUPTED
            assert w.replica_of(survivor) == w.replica(0)

            more = await asyncio.gather(*(start(stub, w.md, 3, 0.01) for stub in stubs[:10]))
            logs = await asyncio.gather(*(complete_log(stubs[-2], w.md, r) for r in more))
            assert all(log[-1].state == run_pb2.RUN_STATE_SUCCEEDED for log in logs)
            stop = pb.StopRunRequest(run_id=survivor, reason="done")
            stopped = (await stubs[0].StopRun(stop, metadata=w.md)).run
            assert stopped.state == run_pb2.RUN_STATE_STOPPED
        assert await w.server.terminate() == 0


async def test_the_workers_end_when_their_parent_is_killed(
    tmp_path: Path, postgres: PgServer
) -> None:
    """SIGKILL the parent: the kernel sends its workers SIGTERM and they exit, leaving
    nothing on the port."""
    async with serving_workers(tmp_path, postgres) as w:
        pids = [w.pid(i) for i in range(WORKERS)]
        await w.server.kill()
        await wait_for(
            lambda: not any(running(pid) for pid in pids),
            limit=20,
            message="workers outlived their parent",
        )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port a plain (not SO_REUSEPORT) socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port: int = sock.getsockname()[1]
        yield port


@pytest.mark.parametrize(
    ("db", "listen", "refusal"),
    [
        (
            "",
            "",
            "--workers needs PostgreSQL (--db postgresql+asyncpg://...): a SQLite file "
            "serves one process; see docs/scaling.md",
        ),
        ("sqlite+aiosqlite:///{dir}/x.db", "", "--workers needs PostgreSQL"),
        (UNREACHABLE_DB, "127.0.0.1:0", "--workers needs a fixed port in --listen"),
        (UNREACHABLE_DB, "taken", "(is another process using it?)"),
    ],
)
async def test_workers_that_cannot_share_a_port_and_a_database_are_refused_in_one_line(
    tmp_path: Path, taken_port: int, db: str, listen: str, refusal: str
) -> None:
    """--workers 2 on SQLite, with port 0, or on a port another process holds: one line,
    exit status 1, and no worker started."""
    data_dir = tmp_path / "data"
    args = ["--workers", "2"]
    if db:
        args += ["--db", db.format(dir=tmp_path)]
    if listen:
        args += ["--listen", f"127.0.0.1:{taken_port}" if listen == "taken" else listen]

    result = await serve_until_exit(data_dir, args)

    assert result.code == 1, result.text
    assert [line for line in result.lines if line.strip()] == [result.last], result.text
    assert "ERROR runservice.workers: " in result.last
    assert refusal in result.last
    assert not (data_dir / "worker-0").exists()


async def test_a_worker_that_cannot_start_stops_the_parent_with_status_1(
    tmp_path: Path,
) -> None:
    """A first start that fails (an --agent that does not load) is not retried: the parent
    says which worker failed, stops the others and exits 1."""
    result = await serve_until_exit(
        tmp_path / "data",
        ["--workers", "2", "--db", UNREACHABLE_DB, "--agent", "bad=no_such_module:agent"],
    )

    assert result.code == 1, result.text
    assert "runservice.app: --agent bad=no_such_module:agent" in result.text
    assert "before it served; stopping the others" in result.text
    assert "restarting" not in result.text


def test_a_worker_s_command_line_and_environment_give_back_the_parent_s_settings(
    tmp_path: Path,
) -> None:
    """Every option reaches a worker as it was given, the database URL (which may hold a
    password) in RUNSERVICE_DB rather than on the command line."""
    db = "postgresql+asyncpg://u:secret@db:5432/runs"
    settings = config.Settings(
        listen="0.0.0.0:7000",
        data_dir=tmp_path,
        db=db,
        stop_grace=0.25,
        retention=3 * 86400.0,
        max_active=0,
        max_event_size=2048 * 1024,
        agents=("x=mod:attr",),
        admins=("root", "ops"),
        jwt_algorithms="-odd",
        insecure_no_auth=True,
        log_level="debug",
    )
    expected = workers.worker_settings(settings, 1)
    command, env = workers.worker_invocation(settings, 1, 9)

    assert "secret" not in " ".join(command)
    assert env["RUNSERVICE_DB"] == db
    assert command[-1] == "--worker-ready-fd=9"
    args = _parser().parse_args(command[command.index("serve") :])
    assert config.settings_from_args(args, env) == expected
    assert expected.data_dir == tmp_path / "worker-1"
    assert expected.tokens_file == tmp_path / "tokens.toml"


def test_restarts_back_off_and_stay_within_their_number_a_minute() -> None:
    """A worker dying at once again and again waits 0.5 s, 1 s, 2 s, ... and is restarted
    at most RESTARTS_PER_MINUTE times in any minute; after a quiet minute, 0.5 s again."""
    history: deque[float] = deque()
    now, times = 0.0, []
    for _ in range(12):
        now += workers.restart_delay(history, now)
        times.append(now)
    assert times[:3] == [0.5, 1.5, 3.5]
    for i, t in enumerate(times):
        within = [u for u in times[: i + 1] if u > t - workers.RESTART_WINDOW_S]
        assert len(within) <= workers.RESTARTS_PER_MINUTE
    assert workers.restart_delay(history, now + 120) == workers.FIRST_BACKOFF_S
