"""What the fault rows share: sizes, users, server processes, load and followers.

Sizes scale with the machine: `SCALE` is FAULTS_SCALE if set, else one per two cores, so
the matrix runs unchanged (and heavier) on bigger machines while staying bounded on two.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf import duration_pb2, struct_pb2

from faults.checker import RunRecord, SeenLog, SeenStream, records_from_db, records_from_postgres
from runservice.client.errors import error_info
from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.serverproc import ServerProcess, start_server, wait_for

SCALE = int(os.environ.get("FAULTS_SCALE", "0")) or max(1, (os.cpu_count() or 2) // 2)
MB = 1024 * 1024
USERS = {"alice": [], "bob": [], "root": ["admin"]}
TERMINAL_CODES = frozenset(
    {
        run_pb2.RUN_STATE_SUCCEEDED,
        run_pb2.RUN_STATE_FAILED,
        run_pb2.RUN_STATE_STOPPED,
        run_pb2.RUN_STATE_INTERRUPTED,
        run_pb2.RUN_STATE_TIMED_OUT,
    }
)
# Channel options of load clients: reconnect fast after a restart.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def struct(**values: Any) -> struct_pb2.Struct:
    """A Struct of `values`."""
    s = struct_pb2.Struct()
    s.update(values)
    return s


def state_name(state: int) -> str:
    """A RunState without its RUN_STATE_ prefix."""
    return str(run_pb2.RunState.Name(state)).removeprefix("RUN_STATE_")


@dataclass
class Node:
    """A data directory, its users' tokens, and the server process currently serving it.

    Its runs are stored in the data directory's SQLite file, or with `db_url` in that
    database (passed to every server as --db).
    """

    data_dir: Path
    tokens: dict[str, str]
    args: list[str] = field(default_factory=list)
    server: ServerProcess | None = None
    port: int | None = None
    log_path: Path | None = None  # the server's output; default DATA_DIR.log beside it
    db_url: str | None = None

    @property
    def db(self) -> Path:
        """The SQLite file."""
        return self.data_dir / "runservice.db"

    async def records(self) -> list[RunRecord]:
        """Every run and its log as stored (the server should not be running)."""
        if self.db_url is not None:
            return await records_from_postgres(self.db_url)
        return records_from_db(self.db)

    @property
    def addr(self) -> str:
        """Where clients connect (the same port across restarts)."""
        assert self.port is not None
        return f"127.0.0.1:{self.port}"

    def md(self, user: str = "alice") -> tuple[tuple[str, str]]:
        """The auth metadata of `user`."""
        return (("authorization", f"Bearer {self.tokens[user]}"),)

    async def start(self, *, limit: float = 60.0) -> float:
        """Starts a server on the node's port; returns seconds until it answered SERVING."""
        began = time.monotonic()
        args = [*self.args, *(["--db", self.db_url] if self.db_url else [])]
        self.server = await start_server(
            self.data_dir, args=args, port=self.port, limit=limit, log_path=self.log_path
        )
        self.port = self.server.port
        return time.monotonic() - began

    async def kill(self) -> None:
        """SIGKILL."""
        if self.server is not None:
            await self.server.kill()

    async def terminate(self, limit: float = 60.0) -> int:
        """SIGTERM; the exit code."""
        assert self.server is not None
        return await self.server.terminate(limit)

    def rss(self) -> int:
        """The server's resident set size, bytes."""
        assert self.server is not None
        return int(psutil.Process(self.server.pid).memory_info().rss)


def make_node(tmp: Path, args: Sequence[str] = ()) -> Node:
    """A fresh data directory with tokens for alice, bob and root (admin)."""
    data_dir = tmp / "data"
    tokens = {u: add_token(data_dir / "tokens.toml", u, roles) for u, roles in USERS.items()}
    return Node(data_dir, tokens, list(args))


class Load:
    """Raw stubs on one channel to a node; starts runs and follows them into a SeenLog."""

    def __init__(self, node: Node, seen: SeenLog | None = None) -> None:
        self.node = node
        self.channel = grpc.aio.insecure_channel(node.addr, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.RunServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.seen = seen or SeenLog()
        self.errors: Counter[str] = Counter()
        self.owners: dict[str, str] = {}
        self._tasks: list[asyncio.Task[SeenStream]] = []

    async def close(self) -> None:
        """Cancels followers still running and closes the channel."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.channel.close()

    async def start(
        self, agent: str, user: str = "alice", *, run_timeout: float | None = None, **input: Any
    ) -> run_pb2.Run:
        """StartRun (10 s deadline); records the owner."""
        request = pb.StartRunRequest(agent=agent, input=struct(**input))
        if run_timeout is not None:
            request.timeout.CopyFrom(duration_pb2.Duration(nanos=int(run_timeout * 1e9)))
        run: run_pb2.Run = (
            await self.stub.StartRun(
                request, metadata=self.node.md(user), timeout=10, wait_for_ready=True
            )
        ).run
        self.owners[run.run_id] = user
        return run

    async def get(self, run_id: str, user: str = "alice") -> run_pb2.Run:
        """GetRun."""
        request = pb.GetRunRequest(run_id=run_id)
        run: run_pb2.Run = (
            await self.stub.GetRun(
                request, metadata=self.node.md(user), timeout=10, wait_for_ready=True
            )
        ).run
        return run

    async def stop(self, run_id: str, user: str = "alice") -> run_pb2.Run:
        """StopRun (returns the run once terminal)."""
        request = pb.StopRunRequest(run_id=run_id, reason="fault matrix")
        run: run_pb2.Run = (
            await self.stub.StopRun(request, metadata=self.node.md(user), timeout=30)
        ).run
        return run

    def follow(
        self, run_id: str, user: str = "alice", from_seq: int = 1, *, give_up: float = 60.0
    ) -> asyncio.Task[SeenStream]:
        """A task reading `run_id` from `from_seq` to its terminal event, resuming itself."""
        task = asyncio.create_task(self._follow(run_id, user, from_seq, give_up))
        self._tasks.append(task)
        return task

    async def _follow(self, run_id: str, user: str, from_seq: int, give_up: float) -> SeenStream:
        stream = self.seen.stream(run_id, from_seq)
        last_progress = time.monotonic()
        while not stream.saw_terminal:
            request = pb.SubscribeRequest(run_id=run_id, from_seq=stream.last_seq + 1)
            call = self.stub.Subscribe(request, metadata=self.node.md(user), timeout=give_up)
            try:
                async for response in call:
                    for event in response.events:
                        stream.add(event)
                    last_progress = time.monotonic()
                if await call.code() == grpc.StatusCode.OK:
                    break
            except grpc.aio.AioRpcError as exc:
                self.errors[_error_key(exc)] += 1
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                    raise
                if time.monotonic() - last_progress > give_up:
                    raise
                await asyncio.sleep(random.uniform(0.05, 0.2))
        return stream

    async def followed(self) -> list[SeenStream]:
        """Waits for every follower; their streams."""
        return list(await asyncio.gather(*self._tasks))

    def server_internal_errors(self) -> int:
        """INTERNAL statuses sent by the server itself (with runservice ErrorInfo)."""
        return sum(n for key, n in self.errors.items() if key.startswith("INTERNAL:"))


def _error_key(exc: grpc.aio.AioRpcError) -> str:
    info = error_info(exc)
    return f"{exc.code().name}:{info.reason}" if info is not None else exc.code().name


@contextlib.asynccontextmanager
async def load_on(node: Node, seen: SeenLog | None = None) -> AsyncIterator[Load]:
    """A Load closed on exit."""
    load = Load(node, seen)
    try:
        yield load
    finally:
        await load.close()


async def wait_all_terminal(load: Load, run_ids: Sequence[str], limit: float = 60.0) -> None:
    """Waits until GetRun reports every run terminal."""

    async def done() -> bool:
        for run_id in run_ids:
            run = await load.get(run_id, load.owners.get(run_id, "alice"))
            if run.state not in TERMINAL_CODES:
                return False
        return True

    await wait_for(done, limit=limit, interval=0.2, message="runs did not all end")


async def isolation_leaks(load: Load, run_ids: Sequence[str], sample: int = 10) -> list[str]:
    """Cross-user probes: another user's ListRuns, GetRun and Subscribe never see a run.

    Returns a description of every leak (empty when isolated).
    """
    leaks: list[str] = []
    for user in ("alice", "bob"):
        listed = await load.stub.ListRuns(
            pb.ListRunsRequest(page_size=1000), metadata=load.node.md(user)
        )
        foreign = [r.run_id for r in listed.runs if load.owners.get(r.run_id, user) != user]
        leaks += [f"{user} lists {run_id}" for run_id in foreign]
    for run_id in random.sample(list(run_ids), min(sample, len(run_ids))):
        other = "bob" if load.owners.get(run_id) == "alice" else "alice"
        for probe in (_probe_get, _probe_subscribe):
            code = await probe(load, run_id, other)
            if code != grpc.StatusCode.NOT_FOUND:
                leaks.append(f"{other} {probe.__name__[7:]} {run_id}: {code.name}")
    return leaks


async def _probe_get(load: Load, run_id: str, user: str) -> grpc.StatusCode:
    try:
        await load.get(run_id, user)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _probe_subscribe(load: Load, run_id: str, user: str) -> grpc.StatusCode:
    call = load.stub.Subscribe(
        pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=load.node.md(user), timeout=10
    )
    try:
        async for _ in call:
            call.cancel()
            return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    code: grpc.StatusCode = await call.code()
    return code
