"""The replicas scenario's parts: the deployments under test, the meter that reads their
CPU, the NOTIFY counter, and the load clients that spread over several addresses.

A deployment is one server on SQLite (the reference), N replicas on one PostgreSQL
database (each its own `runservice serve` process, data dir and port, sharing one tokens
file), or one `runservice serve --workers N` on one port when the server has that
option. Every PostgreSQL deployment has a database of its own in the same private
PostgreSQL server: notifications stay within a database, so deployments that wait their
turn do not hear the one being measured (they still renew their leases, a query every
few seconds).

The load clients run in the bench's worker processes (see `bench.clients.Workers`): one
call covers every replica, since a pool of two workers runs only two calls at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from array import array
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type hints
import grpc
import psutil

from bench.clients import FIRST_TICK_SEQ, RUNNING, Workers, channels, metadata, run, struct
from bench.pg import PgServer
from bench.servers import Server, TokensFile, start_runservice
from runservice.store.cluster import CHANNEL
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

log = logging.getLogger("bench")

SQLITE = "sqlite"
SAME, CROSS, ANY = "same", "cross", "any"  # where a subscriber is, beside its run's executor
Target = tuple[str, str, str]  # (address, run id, tag): one subscription
LISTEN_TIMEOUT_S = 30.0


def per_core(n: int) -> int:
    """`n` for each core of this machine: sizes that grow with the machine."""
    return n * (os.cpu_count() or 1)


@dataclass(frozen=True)
class Plan:
    """One deployment to start: `processes` servers, each on its own port, or one server
    with `serve --workers N` (`serve_workers` > 0)."""

    key: str  # "sqlite", "pg-1", "pg-2", ..., "workers-2"
    label: str  # the table's column header
    processes: int = 1
    on_pg: bool = True
    serve_workers: int = 0


def plans(counts: Sequence[int], serve_workers: int) -> list[Plan]:
    """The SQLite reference, each replica count, and the --workers deployment if asked."""
    out = [Plan(SQLITE, "SQLite, 1 server", on_pg=False)]
    for n in dict.fromkeys(counts):
        out.append(Plan(f"pg-{n}", f"PostgreSQL, {n} replica{'s' if n > 1 else ''}", n))
    if serve_workers:
        out.append(
            Plan(
                f"workers-{serve_workers}",
                f"1 port, --workers {serve_workers}",
                1,
                True,
                serve_workers,
            )
        )
    return out


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, its live descendants and the children it reaped
    (a `serve --workers` parent and its workers; a lone server is just itself)."""
    proc = psutil.Process(pid)
    t = proc.cpu_times()
    total = float(t.user + t.system + t.children_user + t.children_system)
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += float(c.user + c.system)
    return total


def tree_rss(pid: int) -> int:
    """Resident set size of a process and its live descendants, bytes."""
    proc = psutil.Process(pid)
    total = int(proc.memory_info().rss)
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += int(child.memory_info().rss)
    return total


class NotifyCounter:
    """NOTIFYs on runservice's channel in one database, heard on a LISTEN connection of
    the bench's own (asyncpg, in the bench's process): how many, and their bytes."""

    def __init__(self) -> None:
        self.notifies = 0
        self.payload_bytes = 0
        self._conn: Any = None

    async def open(self, dsn: str) -> None:
        """Connects and LISTENs."""
        self._conn = await asyncpg.connect(dsn, timeout=LISTEN_TIMEOUT_S)
        await self._conn.add_listener(CHANNEL, self._received)

    def _received(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifies += 1
        self.payload_bytes += len(payload)

    async def close(self) -> None:
        """Stops listening and disconnects."""
        if self._conn is not None:
            with contextlib.suppress(Exception):  # the server may already be gone
                await asyncio.wait_for(self._conn.close(), LISTEN_TIMEOUT_S)
            self._conn = None


@dataclass
class Deployment:
    """A deployment under test: its servers, their users' tokens and, on PostgreSQL, its
    database's NOTIFY counter."""

    plan: Plan
    servers: list[Server]
    tokens: TokensFile
    notices: NotifyCounter | None = None
    database: str = ""

    @property
    def key(self) -> str:
        """The plan's key."""
        return self.plan.key

    @property
    def addrs(self) -> list[str]:
        """Each server's address."""
        return [s.addr for s in self.servers]

    @property
    def one_port(self) -> bool:
        """Several processes behind one address: where a subscriber lands is the kernel's
        choice, so subscriptions cannot be told same or cross."""
        return self.plan.serve_workers > 0

    @property
    def token(self) -> str:
        """The `bench` user's token, valid on every server of the deployment."""
        return self.tokens.tokens["bench"]

    def rss(self) -> int:
        """All its processes' RSS, bytes."""
        return sum(tree_rss(s.pid) for s in self.servers)

    def targets(self, run_ids: Sequence[str]) -> list[Target]:
        """A subscription per run: run i was started on server i mod N; in each round of N
        runs, alternately all on their executor and all on the next server (half of the
        runs, with 2 or more servers); with one server, all on it."""
        n = len(self.servers)
        out: list[Target] = []
        for i, run_id in enumerate(run_ids):
            home = i % n
            if self.one_port:
                out.append((self.addrs[home], run_id, ANY))
            elif n > 1 and (i // n) % 2 == 1:
                out.append((self.addrs[(home + 1) % n], run_id, CROSS))
            else:
                out.append((self.addrs[home], run_id, SAME))
        return out


class ClusterMeter:
    """CPU seconds used over a measured interval by each server process (with its
    descendants), by PostgreSQL's processes and by the load clients; the NOTIFYs heard,
    and the wall time."""

    def __init__(self, dep: Deployment, db: PgServer | None, workers: Workers) -> None:
        self.dep = dep
        self.db = db
        self.workers = workers
        self.t0 = time.monotonic()
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        now = {f"replica {i + 1}": tree_cpu_seconds(s.pid) for i, s in enumerate(self.dep.servers)}
        now["db"] = self.db.cpu_seconds() if self.db else 0.0
        now["clients"] = self.workers.cpu_seconds()
        counter = self.dep.notices
        now["notifies"] = float(counter.notifies) if counter else 0.0
        now["notify_bytes"] = float(counter.payload_bytes) if counter else 0.0
        return now

    def read(self) -> dict[str, float]:
        """Per part, what was used since the meter was made; 'replicas' (all servers
        together) and 'wall' (seconds)."""
        now = self._now()
        used = {k: now[k] - self.start[k] for k in now}
        used["replicas"] = sum(v for k, v in used.items() if k.startswith("replica "))
        used["wall"] = max(time.monotonic() - self.t0, 1e-9)
        return used


# -- starting and stopping the deployments ---------------------------------------------


async def _start_one(
    plan: Plan, work: Path, db: PgServer | None, users: Sequence[str], loop: str
) -> Deployment:
    """Starts a plan's servers: the first alone (it creates the schema), the rest together."""
    home = work / f"replicas-{plan.key}"
    tokens = TokensFile.make(home / "tokens.toml", users)
    extra: list[str] = []
    database = ""
    if plan.on_pg:
        assert db is not None
        database = f"bench_{plan.key.replace('-', '_')}"
        extra = ["--db", await asyncio.to_thread(db.create_database, database)]
    if plan.serve_workers:
        extra += ["--workers", str(plan.serve_workers)]

    def start(i: int) -> Server:
        return start_runservice(home / f"replica-{i + 1}", extra, loop=loop, tokens_file=tokens)

    dep = Deployment(plan, [], tokens, database=database)
    try:
        dep.servers.append(await asyncio.to_thread(start, 0))
        started = await asyncio.gather(
            *(asyncio.to_thread(start, i) for i in range(1, plan.processes)),
            return_exceptions=True,
        )
        dep.servers += [s for s in started if isinstance(s, Server)]
        failed = [e for e in started if isinstance(e, BaseException)]
        if failed:
            raise failed[0]
        if db is not None and plan.on_pg:
            dep.notices = NotifyCounter()
            await dep.notices.open(db.dsn(database))
    except BaseException:
        await stop_all([dep])
        raise
    pids = ", ".join(str(s.pid) for s in dep.servers)
    log.info("replicas: %s up (pids %s) at %s", plan.label, pids, ", ".join(dep.addrs))
    return dep


async def stop_all(deps: Sequence[Deployment]) -> None:
    """Stops every deployment's servers and NOTIFY counters (each server SIGTERM, then
    SIGKILL after 30 s), all at once."""
    for dep in deps:
        if dep.notices is not None:
            await dep.notices.close()
    servers = [s for dep in deps for s in dep.servers]
    await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))


@contextlib.asynccontextmanager
async def deployments(
    chosen: Sequence[Plan], work: Path, db: PgServer, users: Sequence[str], loop: str
) -> AsyncIterator[list[Deployment]]:
    """Every chosen deployment, started (all of them together), stopped on the way out."""
    started = await asyncio.gather(
        *(_start_one(p, work, db if p.on_pg else None, users, loop) for p in chosen),
        return_exceptions=True,
    )
    deps = [d for d in started if isinstance(d, Deployment)]
    failed = [e for e in started if isinstance(e, BaseException)]
    try:
        if failed:
            raise failed[0]
        yield deps
    finally:
        await stop_all(deps)


# -- load clients (each runs in a worker process) ----------------------------------------


def _stubs(targets: Sequence[Target]) -> tuple[dict[str, Any], list[grpc.aio.Channel]]:
    """A stub per address, over enough channels for that address's streams (the stub
    of a stream is picked by its index among the address's streams)."""
    counts: dict[str, int] = {}
    for addr, _run, _tag in targets:
        counts[addr] = counts.get(addr, 0) + 1
    chans = {addr: channels(addr, n) for addr, n in counts.items()}
    stubs = {
        addr: [pb_grpc.RunServiceStub(c) for c in cs]  # type: ignore[no-untyped-call]
        for addr, cs in chans.items()
    }
    return stubs, [c for cs in chans.values() for c in cs]


def follow(
    targets: Sequence[Target], token: str, *, start_at: float, limit_s: float, loop: str
) -> dict[str, Any]:
    """One Subscribe from seq 1 per target, each until its run ends.

    Returns the tick count, every tick's emit→receive latency in ms per tag (array('d')
    bytes), the ticks emitted before their subscription was attached ("excluded": a
    replay, not a live delivery), the subscriptions attached only after `start_at`
    ("late") and the failed ones ("errors", "failures" by status).
    """

    async def main() -> dict[str, Any]:
        stubs, chans = _stubs(targets)
        md = metadata(token)
        lat: dict[str, array[float]] = {}
        totals = {"ticks": 0, "late": 0, "excluded": 0, "errors": 0}
        failures: dict[str, int] = {}
        seen: dict[str, int] = {}

        async def one(addr: str, run_id: str, tag: str) -> None:
            k = seen[addr] = seen.get(addr, -1) + 1
            stub = stubs[addr][k % len(stubs[addr])]
            mine = lat.setdefault(tag, array("d"))
            ready = float("inf")
            call = stub.Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=md, timeout=limit_s
            )
            try:
                async for response in call:
                    now = time.time()
                    for event in response.events:
                        if event.type == "tick":
                            totals["ticks"] += 1
                            emitted = event.time.seconds + event.time.nanos * 1e-9
                            if emitted >= ready:
                                mine.append((now - emitted) * 1000.0)
                            else:
                                totals["excluded"] += 1
                        elif event.state == RUNNING:
                            ready = now
                            totals["late"] += int(now > start_at)
            except grpc.aio.AioRpcError as exc:
                totals["errors"] += 1
                name = f"{exc.code().name}: {exc.details()}"
                failures[name] = failures.get(name, 0) + 1

        await asyncio.gather(*(one(*t) for t in targets))
        for c in chans:
            await c.close()
        latencies = {tag: a.tobytes() for tag, a in lat.items()}
        return {**totals, "failures": failures, "latencies_ms": latencies}

    return run(main, loop)


def hold(
    targets: Sequence[Target], token: str, *, ready_path: str, limit_s: float, loop: str
) -> dict[str, Any]:
    """One Subscribe from seq 1 per target. Once each has delivered its first tick (or
    failed, or `limit_s` passed) writes {"ready", "errors", "attach_s"} to `ready_path`;
    then keeps each stream until its run ends (the coordinator stops the runs)."""

    async def main() -> dict[str, Any]:
        stubs, chans = _stubs(targets)
        md = metadata(token)
        state = {"ready": 0, "errors": 0, "ended": 0}
        all_in = asyncio.Event()
        seen: dict[str, int] = {}

        def settled() -> None:
            if state["ready"] + state["errors"] >= len(targets):
                all_in.set()

        async def one(addr: str, run_id: str) -> None:
            k = seen[addr] = seen.get(addr, -1) + 1
            call = stubs[addr][k % len(stubs[addr])].Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=md, timeout=limit_s
            )
            ticked = False
            try:
                async for response in call:
                    if not ticked and any(e.seq >= FIRST_TICK_SEQ for e in response.events):
                        ticked = True
                        state["ready"] += 1
                        settled()
                state["ended"] += 1
            except grpc.aio.AioRpcError:
                pass
            if not ticked:  # failed, or ended, before its tick: it was never held
                state["errors"] += 1
                settled()

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(addr, run_id)) for addr, run_id, _tag in targets]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), limit_s)
        attach_s = time.perf_counter() - t0
        text = json.dumps(
            {"ready": state["ready"], "errors": state["errors"], "attach_s": attach_s}
        )
        await asyncio.to_thread(Path(ready_path).write_text, text)
        await asyncio.wait(tasks, timeout=limit_s)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in chans:
            await c.close()
        return {**state, "attach_s": attach_s}

    return run(main, loop)


def start_spread(
    addrs: Sequence[str],
    tokens: Sequence[str],
    agent: str,
    input: dict[str, Any],
    *,
    callers: Sequence[int],
    connections: int,
    warmup: float,
    duration: float,
    loop: str,
) -> dict[str, Any]:
    """Concurrent StartRun loops, caller c on addrs[c mod A] as the user of tokens[c mod
    T], the callers of an address over `connections` connections to it (more than one
    only matters where several processes share a port); calls that start after `warmup`
    and end within `duration` count. Returns the count, the errors and each counted
    call's latency in ms."""

    async def main() -> dict[str, Any]:
        local = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
        chans = [
            [grpc.aio.insecure_channel(a, options=local) for _ in range(connections)] for a in addrs
        ]
        stubs = [[pb_grpc.RunServiceStub(c) for c in cs] for cs in chans]  # type: ignore[no-untyped-call]
        request = pb.StartRunRequest(agent=agent, input=struct(input))
        lat: array[float] = array("d")
        errors = 0
        begin = time.perf_counter() + warmup
        end = begin + duration

        async def caller(c: int) -> None:
            nonlocal errors
            mine = stubs[c % len(addrs)]
            stub = mine[(c // len(addrs)) % connections]
            md = metadata(tokens[c % len(tokens)])
            while (t0 := time.perf_counter()) < end:
                try:
                    await stub.StartRun(request, metadata=md, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                t1 = time.perf_counter()
                if t0 >= begin and t1 <= end:
                    lat.append((t1 - t0) * 1000.0)

        await asyncio.gather(*(caller(c) for c in callers))
        for cs in chans:
            for ch in cs:
                await ch.close()
        return {"calls": len(lat), "errors": errors, "latencies_ms": lat.tobytes()}

    return run(main, loop)


def parts(items: Sequence[Any], n: int) -> list[list[Any]]:
    """`items` in `n` interleaved slices (empty ones dropped)."""
    return [s for s in (list(items[i::n]) for i in range(n)) if s]
