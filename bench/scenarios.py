"""The ten scenarios. Each starts its own servers (runservice and bare), runs its
repetitions interleaved (runservice then bare, the order swapped every other rep, so
that drift hits both alike), and returns figures with every repetition's value. Four
are exceptions: the isolation scenario's baseline is the same server with no abuse, the
stores scenario's is the same server on SQLite, beside one on PostgreSQL, the
replicas scenario's are one replica on PostgreSQL and one server on SQLite, beside 2
and 3 replicas, and the HTTP edge's (bench/http_edge.py) are the Node reference server
and runservice's own gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import clients, isolation, pg, replicas
from bench.clients import Workers
from bench.replicas import ClusterMeter, Deployment, per_core
from bench.report import REPLICAS, TIMES
from bench.servers import Server, serve_has, start_bare, start_runservice
from bench.stats import cdf, percentiles, summary
from runservice.client import TERMINAL_STATES
from runservice.runtime.writer import MAX_BATCH_EVENTS
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

log = logging.getLogger("bench")

ACTIVE = [run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING]
SETUP_CALLERS = 50  # concurrent StartRun calls when a scenario sets up many runs
HOLD_S = 900.0  # how long capacity runs stay live (the server is stopped long before)
KB = 1024


@dataclass
class Sizes:
    """Every scenario's size; `python -m bench --help` lists the flags that set them."""

    payload: int = 64
    replay_events: int = 100_000
    fanout_subscribers: tuple[int, ...] = (1, 10, 100)
    fanout_delivered: int = 30_000
    fanout_min_events: int = 500
    latency_runs: int = 1_000
    latency_rate: float = 10.0
    latency_seconds: float = 20.0
    startrun_callers: int = 50
    startrun_seconds: float = 10.0
    startrun_warmup: float = 1.0
    ingest_runs: int = 100
    ingest_events: int = 1_000
    capacity_runs: int = 10_000
    capacity_finished_runs: int = 3_000
    isolation_seconds: float = 5.0
    isolation_rate: float = 50.0
    isolation_stream_cap: int = 100
    # One server process does not use more cores as there are more: the default offered
    # load (3k events/s) is about a third of what one server delivers to live
    # subscribers (scenario 3), whatever the core count.
    stores_live_runs: int = 300
    stores_live_seconds: float = 10.0
    # The replicas scenario: replica counts, and loads that grow with the cores, so that
    # it runs unchanged on a bigger machine. The fixed load (250 events/s per core) stays
    # under what 3 replicas and their database take on the machine, where a subscriber
    # on another replica costs several times the CPU of one on the run's own, and under
    # what one replica takes alone (one process uses about one core, however many there
    # are): it stops growing at 3k events/s, a third of what one server delivers live.
    replicas: tuple[int, ...] = (1, 2, 3)
    serve_workers: int = 2  # also `serve --workers N` on one port, if the server has it; 0: never
    replicas_ingest_runs: int = field(default_factory=lambda: per_core(50))
    replicas_ingest_events: int = 500
    replicas_live_runs: int = field(default_factory=lambda: min(300, per_core(25)))
    replicas_live_seconds: float = 6.0
    replicas_startrun_callers: int = field(default_factory=lambda: per_core(25))
    replicas_startrun_users: int = 10
    replicas_startrun_seconds: float = 3.0
    replicas_held: int = field(default_factory=lambda: per_core(100))
    # The HTTP edge scenario (bench/http_edge.py): readers and producers grow with the
    # cores. The live load (readers x rate) stays under what runservice delivers to
    # stream readers on 2 cores (each reader of an external run reads every append
    # from the store), so that its latencies are not a backlog's.
    http_replay_events: int = 20_000
    http_replay_batch: int = 100
    http_readers: int = field(default_factory=lambda: per_core(4))
    http_fanout_readers: int = field(default_factory=lambda: per_core(5))
    http_fanout_messages: int = 80
    http_fanout_rate: float = 20.0
    http_producers: int = field(default_factory=lambda: per_core(4))
    http_append_seconds: float = 1.0
    http_append_warmup: float = 0.2
    http_reference_store: str = "memory"  # the Node reference server's: memory or file
    http_reference_optional: bool = False  # True: measured without it where node is missing
    pg_optional: bool = False  # True: stores and replicas are skipped without PostgreSQL
    limit_s: float = 300.0  # the most any one measurement may take
    slack_s: float = 1.0  # lead time between starting a scenario's runs and their first tick
    fresh_servers: bool = True  # False: one runservice and one bare server for everything
    settle_s: float = 1.0  # pause before reading a server's RSS


QUICK = Sizes(
    replay_events=2_000,
    fanout_subscribers=(1, 3),
    fanout_delivered=1_500,
    fanout_min_events=300,
    latency_runs=20,
    latency_seconds=1.0,
    startrun_callers=4,
    startrun_seconds=1.0,
    startrun_warmup=0.2,
    ingest_runs=5,
    ingest_events=200,
    capacity_runs=100,
    capacity_finished_runs=100,
    isolation_seconds=0.5,
    isolation_rate=40.0,
    isolation_stream_cap=10,
    stores_live_runs=20,
    stores_live_seconds=1.0,
    replicas=(1, 2),
    replicas_ingest_runs=4,
    replicas_ingest_events=100,
    replicas_live_runs=10,
    replicas_live_seconds=1.0,
    replicas_startrun_callers=4,
    replicas_startrun_users=2,
    replicas_startrun_seconds=0.5,
    replicas_held=20,
    http_replay_events=500,
    http_readers=2,
    http_fanout_readers=3,
    http_fanout_messages=20,
    http_fanout_rate=100.0,
    http_producers=2,
    http_append_seconds=0.3,
    http_append_warmup=0.1,
    http_reference_optional=True,
    pg_optional=True,
    limit_s=60.0,
    slack_s=0.3,
    fresh_servers=False,
    settle_s=0.1,
)


@dataclass
class Figure:
    """One figure: runservice's value per rep, the baseline's, and the target."""

    id: str
    name: str
    unit: str
    better: str  # "higher" or "lower"
    runservice: list[float]
    baseline: list[float] | None
    baseline_name: str
    target: str = ""
    target_kind: str = ""  # "ratio_min", "ratio_max", "abs_max", "abs_min" or ""
    target_value: float = 0.0
    cpu: dict[str, list[float]] = field(default_factory=dict)  # server CPU % per rep

    def to_json(self) -> dict[str, Any]:
        """The figure with medians, min-max, the ratio and whether the target is met."""
        rs = summary(self.runservice)
        base = summary(self.baseline) if self.baseline else None
        ratio = rs["median"] / base["median"] if base and base["median"] else None
        met: bool | None = None
        if self.target_kind == "ratio_min" and ratio is not None:
            met = ratio >= self.target_value
        elif self.target_kind == "ratio_max" and ratio is not None:
            met = ratio <= self.target_value
        elif self.target_kind == "abs_max":
            met = rs["median"] <= self.target_value
        elif self.target_kind == "abs_min":
            met = rs["median"] >= self.target_value
        return {
            "id": self.id,
            "name": self.name,
            "unit": self.unit,
            "better": self.better,
            "runservice": rs,
            "baseline": base,
            "baseline_name": self.baseline_name,
            "ratio": ratio,
            "target": self.target,
            "target_kind": self.target_kind,
            "target_value": self.target_value,
            "met": met,
            "server_cpu_pct": {k: summary(v) for k, v in self.cpu.items() if v},
        }


@dataclass
class Outcome:
    """A scenario's figures, its parameters and extra detail (distributions, counts)."""

    key: str
    title: str
    params: dict[str, Any]
    figures: list[Figure]
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: str = ""  # why the scenario measured nothing, when it did not


class Meter:
    """Server and load-client CPU % over a measured interval (100 = one core)."""

    def __init__(self, server: Server, workers: Workers) -> None:
        self.server = server
        self.workers = workers
        self.cpu0 = server.cpu_seconds()
        self.clients0 = workers.cpu_seconds()
        self.t0 = time.monotonic()

    def record(self, cpu: dict[str, list[float]]) -> float:
        """Appends the server's CPU % to cpu[kind] and the clients' to cpu[kind + ' clients']."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        pct = 100.0 * (self.server.cpu_seconds() - self.cpu0) / wall
        clients = 100.0 * (self.workers.cpu_seconds() - self.clients0) / wall
        cpu.setdefault(self.server.kind, []).append(pct)
        cpu.setdefault(f"{self.server.kind} clients", []).append(clients)
        return pct


def stub_of(server: Server, token: str | None = None) -> tuple[grpc.aio.Channel, Any, Any]:
    """A channel, a stub and the metadata for `server` (as `token`'s user, else `bench`)."""
    channel = grpc.aio.insecure_channel(server.addr)
    stub = pb_grpc.RunServiceStub(channel)  # type: ignore[no-untyped-call]
    return channel, stub, clients.metadata(server.token if token is None else token)


def paced(**values: float) -> pb.StartRunRequest:
    """A StartRun of the bench agent."""
    return pb.StartRunRequest(agent="paced", input=clients.struct(dict(values)))


def split(items: list[str], parts: int) -> list[list[str]]:
    """`items` in `parts` interleaved slices (empty ones dropped)."""
    return [s for s in (items[i::parts] for i in range(parts)) if s]


def ordered(rep: int, a: Server, b: Server) -> tuple[Server, Server]:
    """Alternates which server goes first."""
    return (a, b) if rep % 2 == 0 else (b, a)


async def wait_until(
    check: Callable[[], Awaitable[bool]], limit: float, what: str, interval: float = 0.05
) -> None:
    """Polls `check` until true; TimeoutError naming `what` after `limit` seconds."""
    deadline = time.monotonic() + limit
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {limit:g}s")
        await asyncio.sleep(interval)


async def wait_run_ended(server: Server, run_id: str, limit: float) -> None:
    """Waits until `run_id` is terminal (GetRun polls; both servers answer GetRun)."""
    channel, stub, md = stub_of(server)
    async with channel:

        async def ended() -> bool:
            run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
            return run.state in TERMINAL_STATES

        await wait_until(ended, limit, f"run {run_id} on {server.kind} ending", 0.1)


async def wait_none_active(server: Server, limit: float, agent: str = "") -> None:
    """Waits until runservice lists no PENDING or RUNNING run (of `agent`, if given); one
    cheap ListRuns per poll."""
    channel, stub, md = stub_of(server)
    async with channel:

        async def idle() -> bool:
            request = pb.ListRunsRequest(states=ACTIVE, page_size=1, agent=agent)
            return not (await stub.ListRuns(request, metadata=md)).runs

        await wait_until(idle, limit, "every run ending")


async def start_runs(
    server: Server, requests: list[pb.StartRunRequest], token: str | None = None
) -> list[str]:
    """Starts every request, SETUP_CALLERS at a time (as `token`'s user); the run ids."""
    channel, stub, md = stub_of(server, token)
    async with channel:
        return await clients.start_many(stub, md, requests, SETUP_CALLERS)


async def start_spread(dep: Deployment, requests: list[pb.StartRunRequest]) -> list[str]:
    """Starts request i on server i mod N of `dep` (all servers at once, SETUP_CALLERS
    calls at a time on each); the run ids in request order."""
    n = len(dep.servers)
    groups = await asyncio.gather(
        *(start_runs(server, requests[i::n]) for i, server in enumerate(dep.servers))
    )
    ids = [""] * len(requests)
    for i, got in enumerate(groups):
        ids[i::n] = got
    return ids


async def stop_runs(server: Server, run_ids: list[str]) -> None:
    """StopRun of every run, SETUP_CALLERS at a time (each call returns once its run ended)."""
    channel, stub, md = stub_of(server)
    async with channel:
        pending = iter(run_ids)

        async def caller() -> None:
            for run_id in pending:
                request = pb.StopRunRequest(run_id=run_id, reason="bench")
                await stub.StopRun(request, metadata=md, timeout=60)

        await asyncio.gather(*(caller() for _ in range(SETUP_CALLERS)))


async def stop_spread(dep: Deployment, run_ids: list[str]) -> None:
    """Stops run i on server i mod N of `dep`, its executor (as start_spread started it)."""
    n = len(dep.servers)
    await asyncio.gather(
        *(stop_runs(server, run_ids[i::n]) for i, server in enumerate(dep.servers))
    )


class Bench:
    """Runs scenarios against fresh servers under `work`, with `workers` as load clients."""

    def __init__(
        self,
        sizes: Sizes,
        work: Path,
        workers: Workers,
        reps: int,
        loop: str,
        *,
        server_loop: str = "uvloop",
    ) -> None:
        self.s = sizes
        self.work = work
        self.workers = workers
        self.reps = reps
        self.loop = loop
        self.server_loop = server_loop  # both servers' event loop
        self._n = 0
        self._shared: dict[str, Server] = {}
        self._start_rates: dict[str, float] = {}  # runs/s of the last setup, per deployment

    # -- servers --------------------------------------------------------------------------

    async def runservice(
        self, name: str, caps: list[str] | None = None, users: tuple[str, ...] = ()
    ) -> Server:
        """A fresh runservice server (its own data dir), or the shared one; with `caps` or
        `users` (see start_runservice), always a server of its own."""
        return await self._server(
            "runservice",
            lambda n: start_runservice(
                self.work / f"{n}-{name}", caps=caps, users=users, loop=self.server_loop
            ),
            shareable=caps is None and not users,
        )

    async def bare(self, name: str) -> Server:
        """A fresh bare server, or the shared one."""
        return await self._server(
            "bare", lambda n: start_bare(self.work / f"{n}-{name}-bare.log", self.server_loop)
        )

    async def _server(
        self, kind: str, start: Callable[[str], Server], shareable: bool = True
    ) -> Server:
        """A fresh server of `kind` (numbered in start order), or the shared one."""
        share = shareable and not self.s.fresh_servers
        if share and kind in self._shared:
            return self._shared[kind]
        self._n += 1
        server = await asyncio.to_thread(start, f"{self._n:02d}")
        if share:
            self._shared[kind] = server
        return server

    async def both(self, name: str) -> tuple[Server, Server]:
        """A runservice and a bare server, started side by side."""
        started = await asyncio.gather(
            self.runservice(name), self.bare(name), return_exceptions=True
        )
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:  # never leave the other one running
            await self.stop(*(r for r in started if isinstance(r, Server)))
            raise failed[0]
        rs, bare = started
        assert isinstance(rs, Server) and isinstance(bare, Server)
        log.info("%s: runservice pid %d at %s, bare pid %d", name, rs.pid, rs.addr, bare.pid)
        return rs, bare

    async def stop(self, *servers: Server, kill: bool = False) -> None:
        """Stops servers (concurrently; SIGKILL with `kill`); shared ones only at close()."""
        own = [s for s in servers if s not in self._shared.values()]
        await asyncio.gather(*(asyncio.to_thread(s.stop, 0 if kill else 30) for s in own))

    async def close(self) -> None:
        """Stops the shared servers."""
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in self._shared.values()))
        self._shared.clear()

    # -- 1. replay --------------------------------------------------------------------------

    async def replay(self) -> Outcome:
        """One finished run of N events replayed from seq 1 by one client."""
        s = self.s
        rs, bare = await self.both("replay")
        try:
            request = pb.StartRunRequest(
                agent="ticker", input=clients.struct({"count": s.replay_events, "size": s.payload})
            )
            ids = {}
            for server in (rs, bare):
                ids[server.kind] = (await start_runs(server, [request]))[0]
                await wait_run_ended(server, ids[server.kind], s.limit_s)
            rate: dict[str, list[float]] = {"runservice": [], "bare": []}
            secs: dict[str, list[float]] = {"runservice": [], "bare": []}
            cpu: dict[str, list[float]] = {"runservice": [], "bare": []}
            msgs: dict[str, list[int]] = {"runservice": [], "bare": []}
            for rep in range(self.reps):
                for server in ordered(rep, rs, bare):
                    meter = Meter(server, self.workers)
                    res = await self.workers.call(
                        clients.replay, server.addr, server.token, ids[server.kind], self.loop
                    )
                    meter.record(cpu)
                    expected = s.replay_events + 2
                    if res["events"] != expected:
                        raise RuntimeError(f"{server.kind} replayed {res['events']}/{expected}")
                    rate[server.kind].append(res["events"] / res["seconds"])
                    secs[server.kind].append(res["seconds"])
                    msgs[server.kind].append(res["messages"])
        finally:
            await self.stop(rs, bare)
        base = "bare grpc.aio, 1 event per message"
        return Outcome(
            "replay",
            "1. Replay",
            {"events": s.replay_events, "payload_bytes": s.payload, "clients": 1},
            [
                Figure(
                    "replay.events_per_s",
                    "replay events/s",
                    "events/s",
                    "higher",
                    rate["runservice"],
                    rate["bare"],
                    base,
                    f"≥ 8{TIMES} baseline",
                    "ratio_min",
                    8.0,
                    cpu,
                ),
                Figure(
                    "replay.time_to_last",
                    "replay time to last event",
                    "s",
                    "lower",
                    secs["runservice"],
                    secs["bare"],
                    base,
                    cpu=cpu,
                ),
            ],
            {"messages": msgs},
        )

    # -- 2. live fan-out -------------------------------------------------------------------

    async def fanout(self) -> Outcome:
        """One run emitting as fast as the server accepts, followed live by K subscribers."""
        s = self.s
        rs, bare = await self.both("fanout")
        figures: list[Figure] = []
        details: dict[str, Any] = {}
        try:
            for subs in s.fanout_subscribers:
                count = max(s.fanout_min_events, s.fanout_delivered // subs)
                rate: dict[str, list[float]] = {"runservice": [], "bare": []}
                cpu: dict[str, list[float]] = {"runservice": [], "bare": []}
                extra: dict[str, list[Any]] = {"late": [], "messages": []}
                for rep in range(self.reps):
                    for server in ordered(rep, rs, bare):
                        value, info = await self._fanout_once(server, subs, count, cpu)
                        rate[server.kind].append(value)
                        extra["late"].append((server.kind, info["late"]))
                        extra["messages"].append((server.kind, info["messages"]))
                details[f"subscribers_{subs}"] = {"events_per_run": count, **extra}
                figures.append(
                    Figure(
                        f"fanout.{subs}",
                        f"live fan-out, {subs} subscriber{'s' if subs > 1 else ''}",
                        "events/s delivered",
                        "higher",
                        rate["runservice"],
                        rate["bare"],
                        "bare fan-out, 1 event per message",
                        f"≥ 0.8{TIMES} baseline",
                        "ratio_min",
                        0.8,
                        cpu,
                    )
                )
        finally:
            await self.stop(rs, bare)
        params = {
            "subscribers": list(s.fanout_subscribers),
            "delivered_per_case": s.fanout_delivered,
            "min_events_per_run": s.fanout_min_events,
            "payload_bytes": s.payload,
        }
        return Outcome("fanout", "2. Live fan-out", params, figures, details)

    async def _subscribe(
        self,
        server: Server,
        parts: list[list[str]],
        start_at: float,
        *,
        latency: bool,
        limit_s: float,
    ) -> list[dict[str, Any]]:
        """clients.subscribe for each part of the run ids, each in a worker, all at once."""
        return await asyncio.gather(
            *(
                self.workers.call(
                    clients.subscribe,
                    server.addr,
                    server.token,
                    part,
                    start_at=start_at,
                    latency=latency,
                    limit_s=limit_s,
                    loop=self.loop,
                )
                for part in parts
            )
        )

    async def _fanout_once(
        self, server: Server, subs: int, count: int, cpu: dict[str, list[float]]
    ) -> tuple[float, dict[str, Any]]:
        start_at = time.time() + self.s.slack_s + 0.01 * subs
        request = paced(count=count, interval=0, size=self.s.payload, start_at=start_at)
        run_id = (await start_runs(server, [request]))[0]
        parts = split([run_id] * subs, min(subs, self.workers.n))
        meter = Meter(server, self.workers)
        results = await self._subscribe(
            server, parts, start_at, latency=False, limit_s=self.s.limit_s
        )
        meter.record(cpu)
        delivered = sum(r["ticks"] for r in results)
        errors = sum(r["errors"] for r in results)
        if errors or delivered != subs * count:
            failures = [r["failures"] for r in results]
            raise RuntimeError(
                f"{server.kind}: {delivered}/{subs * count} delivered, {errors} errors {failures}"
            )
        first = min(r["first_tick"] for r in results)
        last = max(r["last"] for r in results)
        info = {
            "late": sum(r["late"] for r in results),
            "messages": sum(r["messages"] for r in results),
        }
        return delivered / (last - first), info

    # -- 3. live latency under load --------------------------------------------------------

    async def latency(self) -> Outcome:
        """R runs each emitting at a fixed rate, one subscriber each: emit→receive latency."""
        s = self.s
        rs, bare = await self.both("latency")
        stats: dict[str, dict[str, list[float]]] = {
            k: {"p50": [], "p99": [], "max": []} for k in ("runservice", "bare")
        }
        cpu: dict[str, list[float]] = {}
        pooled: dict[str, list[np.ndarray]] = {"runservice": [], "bare": []}
        counts: dict[str, list[dict[str, int]]] = {"runservice": [], "bare": []}
        try:
            for rep in range(self.reps):
                for server in ordered(rep, rs, bare):
                    lat, info = await self._latency_once(server, cpu)
                    p50, p99, top = percentiles(lat, [50, 99, 100])
                    st = stats[server.kind]
                    st["p50"].append(p50)
                    st["p99"].append(p99)
                    st["max"].append(top)
                    pooled[server.kind].append(lat)
                    counts[server.kind].append(info)
        finally:
            await self.stop(rs, bare)
        base = "bare grpc.aio at the same rates"
        figures = [
            Figure(
                "latency.p50",
                "live latency p50",
                "ms",
                "lower",
                stats["runservice"]["p50"],
                stats["bare"]["p50"],
                base,
                cpu=cpu,
            ),
            Figure(
                "latency.p99",
                "live latency p99",
                "ms",
                "lower",
                stats["runservice"]["p99"],
                stats["bare"]["p99"],
                base,
                f"≤ 2{TIMES} baseline",
                "ratio_max",
                2.0,
                cpu,
            ),
            Figure(
                "latency.max",
                "live latency max",
                "ms",
                "lower",
                stats["runservice"]["max"],
                stats["bare"]["max"],
                base,
                cpu=cpu,
            ),
        ]
        count = round(s.latency_rate * s.latency_seconds)
        params = {
            "runs": s.latency_runs,
            "events_per_s_per_run": s.latency_rate,
            "seconds": s.latency_seconds,
            "events_per_run": count,
            "offered_events_per_s": s.latency_runs * s.latency_rate,
            "payload_bytes": s.payload,
        }
        details = {
            "cdf": {k: cdf(np.concatenate(v)) for k, v in pooled.items()},
            "counts": counts,
        }
        return Outcome("latency", "3. Live latency under load", params, figures, details)

    async def _latency_once(
        self, server: Server, cpu: dict[str, list[float]]
    ) -> tuple[np.ndarray, dict[str, int]]:
        s = self.s
        ids, start_at = await self._start_live(server, s.latency_runs, s.latency_seconds)
        meter = Meter(server, self.workers)
        result = await self._follow_live(server, ids, start_at, s.latency_seconds)
        meter.record(cpu)
        return result

    async def _start_live(
        self, server: Server, runs: int, seconds: float
    ) -> tuple[list[str], float]:
        """`runs` paced runs of `latency_rate` ticks/s for `seconds`, each at a random
        phase; their ids and the wall time of their first ticks."""
        requests, start_at = self._live_requests(runs, seconds)
        ids = await start_runs(server, requests)
        if time.time() > start_at:
            log.warning("latency: starting %d runs took past the scheduled start", len(ids))
        return ids, start_at

    def _live_requests(
        self, runs: int, seconds: float, lead: float | None = None
    ) -> tuple[list[pb.StartRunRequest], float]:
        """StartRuns of `runs` paced runs of `latency_rate` ticks/s for `seconds`, each at
        a random phase, and the wall time of their first ticks (`lead` seconds from now,
        by default the slack and 3 ms a run)."""
        s = self.s
        interval = 1.0 / s.latency_rate
        count = round(s.latency_rate * seconds)
        start_at = time.time() + (s.slack_s + 0.003 * runs if lead is None else lead)
        rnd = random.Random(7)
        requests = [
            paced(
                count=count,
                interval=interval,
                size=s.payload,
                start_at=start_at,
                phase=rnd.uniform(0, interval),
                # The bare server then generates each run's ticks in its one subscriber's
                # handler (a timer per stream); runservice's bench agent ignores the key.
                inline=1,
            )
            for _ in range(runs)
        ]
        return requests, start_at

    async def _follow_live(
        self, server: Server, ids: list[str], start_at: float, seconds: float
    ) -> tuple[np.ndarray, dict[str, int]]:
        """One subscriber per run from seq 1 until the runs end: every tick's emit→receive
        latency (ms) and the counts; raises unless every tick arrived."""
        count = round(self.s.latency_rate * seconds)
        parts = split(ids, self.workers.n)
        limit_s = seconds + self.s.limit_s
        results = await self._subscribe(server, parts, start_at, latency=True, limit_s=limit_s)
        lat = array("d")
        for r in results:
            lat.frombytes(r["latencies_ms"])
        info = {k: sum(r[k] for r in results) for k in ("ticks", "late", "excluded", "errors")}
        if info["errors"] or info["ticks"] != count * len(ids):
            failures = [r["failures"] for r in results]
            raise RuntimeError(f"{server.kind}: latency run delivered {info} {failures}")
        return np.frombuffer(lat, dtype=np.float64), info

    # -- 4. StartRun -----------------------------------------------------------------------

    async def startrun(self) -> Outcome:
        """C concurrent callers of StartRun for T seconds."""
        s = self.s
        rs, bare = await self.both("startrun")
        rate: dict[str, list[float]] = {"runservice": [], "bare": []}
        p50: dict[str, list[float]] = {"runservice": [], "bare": []}
        p99: dict[str, list[float]] = {"runservice": [], "bare": []}
        cpu: dict[str, list[float]] = {"runservice": [], "bare": []}
        pooled: dict[str, list[np.ndarray]] = {"runservice": [], "bare": []}
        try:
            for rep in range(self.reps):
                for server in ordered(rep, rs, bare):
                    meter = Meter(server, self.workers)
                    res = await self.workers.call(
                        clients.start_calls,
                        server.addr,
                        server.token,
                        "ticker",
                        {"count": 0},
                        callers=s.startrun_callers,
                        warmup=s.startrun_warmup,
                        duration=s.startrun_seconds,
                        loop=self.loop,
                    )
                    meter.record(cpu)
                    if res["errors"]:
                        raise RuntimeError(f"{server.kind}: {res['errors']} StartRun errors")
                    lat = np.frombuffer(res["latencies_ms"], dtype=np.float64)
                    rate[server.kind].append(res["calls"] / s.startrun_seconds)
                    a, b = percentiles(lat, [50, 99])
                    p50[server.kind].append(a)
                    p99[server.kind].append(b)
                    pooled[server.kind].append(lat)
        finally:
            await self.stop(rs, bare)
        base = "bare grpc.aio unary StartRun"
        figures = [
            Figure(
                "startrun.runs_per_s",
                "StartRun runs/s",
                "runs/s",
                "higher",
                rate["runservice"],
                rate["bare"],
                base,
                f"≥ 0.5{TIMES} baseline",
                "ratio_min",
                0.5,
                cpu,
            ),
            Figure(
                "startrun.p50",
                "StartRun p50",
                "ms",
                "lower",
                p50["runservice"],
                p50["bare"],
                base,
                cpu=cpu,
            ),
            Figure(
                "startrun.p99",
                "StartRun p99",
                "ms",
                "lower",
                p99["runservice"],
                p99["bare"],
                base,
                cpu=cpu,
            ),
        ]
        params = {
            "callers": s.startrun_callers,
            "seconds": s.startrun_seconds,
            "warmup_s": s.startrun_warmup,
            "agent": "ticker {count: 0}",
        }
        details = {"cdf": {k: cdf(np.concatenate(v)) for k, v in pooled.items()}}
        return Outcome("startrun", "4. StartRun", params, figures, details)

    # -- 5. ingest -------------------------------------------------------------------------

    async def ingest(self) -> Outcome:
        """R runs emitting as fast as they can: committed events/s vs raw sqlite3."""
        s = self.s
        rs = await self.runservice("ingest")
        total = s.ingest_runs * s.ingest_events
        rate: list[float] = []
        raw: list[float] = []
        cpu: dict[str, list[float]] = {"runservice": []}
        try:
            for rep in range(self.reps):
                start_at = time.time() + s.slack_s + 0.005 * s.ingest_runs
                requests = [
                    paced(count=s.ingest_events, interval=0, size=s.payload, start_at=start_at)
                    for _ in range(s.ingest_runs)
                ]
                await start_runs(rs, requests)
                await asyncio.sleep(max(0.0, start_at - time.time()))
                meter = Meter(rs, self.workers)
                await wait_none_active(rs, s.limit_s, "paced")
                rate.append(total / (time.time() - start_at))
                meter.record(cpu)
                res = await self.workers.call(
                    clients.raw_ingest,
                    str(self.work / f"raw-ingest-{rep}.db"),
                    s.ingest_runs,
                    s.ingest_events,
                    s.payload,
                    MAX_BATCH_EVENTS,
                )
                raw.append(res["rows"] / res["seconds"])
        finally:
            await self.stop(rs)
        params = {
            "runs": s.ingest_runs,
            "events_per_run": s.ingest_events,
            "payload_bytes": s.payload,
            "raw_batch_rows": MAX_BATCH_EVENTS,
        }
        figure = Figure(
            "ingest.events_per_s",
            "ingest committed events/s",
            "events/s",
            "higher",
            rate,
            raw,
            f"raw sqlite3 executemany, {MAX_BATCH_EVENTS} rows per transaction",
            f"≥ 0.5{TIMES} baseline",
            "ratio_min",
            0.5,
            cpu,
        )
        return Outcome("ingest", "5. Ingest", params, [figure])

    # -- 6. capacity -----------------------------------------------------------------------

    async def capacity(self) -> Outcome:
        """N live runs with N open subscriptions, and N finished runs: server RSS per each."""
        s = self.s
        live: list[float] = []
        finished: list[float] = []
        bare_live: list[float] = []
        details: dict[str, list[Any]] = {"rss_mib": []}
        for rep in range(self.reps):
            # One fresh server per rep: first the finished runs, then the live ones (the
            # finished phase's transient garbage is small: SETUP_CALLERS calls at a time).
            rs = await self.runservice(f"capacity-{rep}")
            try:
                await self._warm(rs)
                before = rs.rss()
                # `ticker`, not `paced`: with shared servers (--quick) earlier held runs are
                # still running, and the wait filters by agent.
                request = pb.StartRunRequest(
                    agent="ticker", input=clients.struct({"count": 1, "size": s.payload})
                )
                await start_runs(rs, [request] * s.capacity_finished_runs)
                await wait_none_active(rs, s.limit_s, "ticker")
                await asyncio.sleep(self.s.settle_s)
                after = rs.rss()
                finished.append((after - before) / s.capacity_finished_runs / KB)
                details["rss_mib"].append(("runservice finished", before / KB**2, after / KB**2))
                before, after = await self._hold(rs, rep, warm=False)
                live.append((after - before) / s.capacity_runs / KB)
                details["rss_mib"].append(("runservice live", before / KB**2, after / KB**2))
            finally:
                await self.stop(rs, kill=True)
            bare = await self.bare(f"capacity-{rep}")
            try:
                before, after = await self._hold(bare, rep)
            finally:
                await self.stop(bare, kill=True)
            bare_live.append((after - before) / s.capacity_runs / KB)
            details["rss_mib"].append(("bare live", before / KB**2, after / KB**2))
        figures = [
            Figure(
                "capacity.live_kb",
                "RSS per live run + subscription",
                "KB",
                "lower",
                live,
                bare_live,
                "bare: RSS per open server-stream (run held in memory)",
                f"≤ 2{TIMES} baseline",
                "ratio_max",
                2.0,
            ),
            Figure(
                "capacity.finished_kb",
                "RSS per finished run in memory",
                "KB",
                "lower",
                finished,
                None,
                "",
                "≤ 10 KB",
                "abs_max",
                10.0,
            ),
        ]
        params = {
            "live_runs": s.capacity_runs,
            "subscriptions": s.capacity_runs,
            "finished_runs": s.capacity_finished_runs,
            "payload_bytes": s.payload,
        }
        return Outcome("capacity", "6. Capacity", params, figures, details)

    async def _warm(self, server: Server) -> None:
        """A few runs and a subscription, so one-time allocations are in the 'before' RSS."""
        ids = await start_runs(server, [paced(count=1, interval=0, size=self.s.payload)] * 20)
        for run_id in ids:
            await wait_run_ended(server, run_id, self.s.limit_s)
        await self.workers.call(clients.replay, server.addr, server.token, ids[0], self.loop)
        await asyncio.sleep(self.s.settle_s)

    async def _hold(self, server: Server, rep: int, *, warm: bool = True) -> tuple[int, int]:
        """RSS before and with N live runs (1 tick, then holding) each followed by a stream."""
        s = self.s
        if warm:
            await self._warm(server)
        before = server.rss()
        request = paced(count=1, interval=0, size=s.payload, hold=HOLD_S)
        ids = await start_runs(server, [request] * s.capacity_runs)
        tag = f"cap-{rep}-{server.kind}"
        release = self.work / f"{tag}.release"
        parts = split(ids, self.workers.n)
        ready = [self.work / f"{tag}-{i}.ready" for i in range(len(parts))]
        calls = [
            asyncio.ensure_future(
                self.workers.call(
                    clients.hold_streams,
                    server.addr,
                    server.token,
                    part,
                    ready_path=str(ready[i]),
                    release_path=str(release),
                    limit_s=s.limit_s,
                    loop=self.loop,
                )
            )
            for i, part in enumerate(parts)
        ]
        try:

            async def all_ready() -> bool:
                return all(p.exists() for p in ready)

            await wait_until(all_ready, s.limit_s, "every stream attached")
            states = [json.loads(p.read_text()) for p in ready]
            if sum(st["ready"] for st in states) != len(ids):
                raise RuntimeError(f"{server.kind}: streams not all attached: {states}")
            await asyncio.sleep(self.s.settle_s)
            after = server.rss()
        finally:
            release.touch()
            await asyncio.gather(*calls, return_exceptions=True)
        return before, after

    # -- 7. isolation ----------------------------------------------------------------------

    async def isolation(self) -> Outcome:
        """One user abuses the limits, phase by phase, while another makes paced calls."""
        s = self.s
        if self.workers.n < 2:  # noqa: PLR2004 - one worker for the victim, one for the abuser
            raise RuntimeError("isolation needs --workers 2 or more (victim and abuser)")
        caps = ["--max-streams-per-user", str(s.isolation_stream_cap)]
        server = await self.runservice("isolation", caps, ("victim", "abuser"))
        phases: dict[str, list[dict[str, Any]]] = {p: [] for p in isolation.PHASES}
        cpu: dict[str, dict[str, list[float]]] = {p: {} for p in isolation.PHASES}
        try:
            mine = pb.StartRunRequest(agent="echo", input=clients.struct({"text": "mine"}))
            run_id = (await start_runs(server, [mine], server.users["victim"]))[0]
            for _ in range(self.reps):
                for phase in isolation.PHASES:
                    outcome = await self._isolation_phase(server, phase, run_id, cpu[phase])
                    phases[phase].append(outcome)
        finally:
            await self.stop(server)
        params = {
            "phase_seconds": s.isolation_seconds,
            "victim_calls_per_s": s.isolation_rate,
            "victim_calls": "StartRun ticker {count: 0} and GetRun, alternately",
            "call_deadline_s": isolation.CALL_DEADLINE_S,
            "max_streams_per_user": s.isolation_stream_cap,
            "oversize_request_bytes": isolation.OVERSIZE_BYTES,
            "flood_headers": f"{isolation.FLOOD_HEADERS} x {isolation.FLOOD_HEADER_VALUE} bytes",
            "unread_streams_run": isolation.BUSY_RUN,
            "abuse_callers": isolation.ABUSE_CALLERS,
        }
        return Outcome(
            "isolation", "7. Isolation", params, isolation_figures(phases, cpu), {"phases": phases}
        )

    # -- 8. stores -------------------------------------------------------------------------

    async def stores(self) -> Outcome:
        """The same workloads on a server on SQLite and on one on a private PostgreSQL,
        interleaved: ingest at saturation, live latency at a fixed load, StartRun/s, and
        the CPU each costs per event or run (server process and database separately)."""
        s = self.s
        reason = pg.unavailable(s.pg_optional)
        if reason:
            log.warning("stores: skipped: %s", reason)
            return Outcome("stores", STORES_TITLE, {}, [], skipped=reason)
        db = pg.PgServer(self.work / "postgres.log")
        await asyncio.to_thread(db.start)
        try:
            servers = await self._store_servers(db)
            try:
                values, cpu = await self._stores_reps(servers, db)
            finally:
                await self.stop(*servers.values())
        finally:
            await asyncio.to_thread(db.stop)
        params = {
            "postgresql": db.version(),
            "postgresql_settings": "fsync, synchronous_commit, full_page_writes on (defaults)",
            "sqlite_settings": "WAL, synchronous=NORMAL (runservice's)",
            "ingest_runs": s.ingest_runs,
            "ingest_events_per_run": s.ingest_events,
            "live_runs": s.stores_live_runs,
            "live_events_per_s_per_run": s.latency_rate,
            "live_seconds": s.stores_live_seconds,
            "live_offered_events_per_s": s.stores_live_runs * s.latency_rate,
            "startrun_callers": s.startrun_callers,
            "startrun_seconds": s.startrun_seconds,
            "payload_bytes": s.payload,
        }
        details = {"cpu_pct": cpu}
        return Outcome("stores", STORES_TITLE, params, stores_figures(values), details)

    async def _store_servers(self, db: pg.PgServer) -> dict[str, Server]:
        """A runservice server on SQLite and one on `db`, each with a fresh data dir."""

        def start(store: str, extra: list[str]) -> Callable[[str], Server]:
            return lambda n: start_runservice(
                self.work / f"{n}-stores-{store}", extra, loop=self.server_loop
            )

        sqlite = await self._server("runservice", start(SQLITE, []), shareable=False)
        try:
            on_pg = await self._server(
                "runservice", start(POSTGRESQL, ["--db", db.url]), shareable=False
            )
        except BaseException:
            await self.stop(sqlite)
            raise
        log.info("stores: on SQLite pid %d, on PostgreSQL pid %d", sqlite.pid, on_pg.pid)
        return {SQLITE: sqlite, POSTGRESQL: on_pg}

    async def _stores_reps(
        self, servers: dict[str, Server], db: pg.PgServer
    ) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[float]]]]:
        """Each phase of each rep on both servers, the first of the two alternating; every
        figure's values per store, and CPU % per phase and part."""
        phases = {"ingest": self._stores_ingest, "live": self._stores_live}
        phases["startrun"] = self._stores_startrun
        values: dict[str, dict[str, list[float]]] = {SQLITE: {}, POSTGRESQL: {}}
        cpu: dict[str, dict[str, list[float]]] = {p: {} for p in phases}
        for rep in range(self.reps):
            for phase, measure in phases.items():
                order = (SQLITE, POSTGRESQL) if rep % 2 == 0 else (POSTGRESQL, SQLITE)
                for store in order:
                    got, used = await measure(servers[store], db if store == POSTGRESQL else None)
                    for key, value in got.items():
                        values[store].setdefault(key, []).append(value)
                    for part, pct in cpu_pct(used).items():
                        if part != "db" or store == POSTGRESQL:
                            cpu[phase].setdefault(f"{store} {part}", []).append(pct)
                    log.info("stores: rep %d %s on %s: %s", rep + 1, phase, store, got)
        return values, cpu

    async def _stores_ingest(
        self, server: Server, db: pg.PgServer | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """R runs emitting as fast as the server accepts: committed events/s and CPU."""
        s = self.s
        start_at = time.time() + s.slack_s + 0.005 * s.ingest_runs
        request = paced(count=s.ingest_events, interval=0, size=s.payload, start_at=start_at)
        await start_runs(server, [request] * s.ingest_runs)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        meter = StoreMeter(server, db, self.workers)
        await wait_none_active(server, s.limit_s, "paced")
        rate = s.ingest_runs * s.ingest_events / (time.time() - start_at)
        used = meter.read()
        events = s.ingest_runs * s.ingest_events
        return {"ingest.events_per_s": rate, **cpu_per("ingest", used, events)}, used

    async def _stores_live(
        self, server: Server, db: pg.PgServer | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """N runs at `latency_rate` events/s, a subscriber each: latency and CPU per event."""
        s = self.s
        runs, seconds = s.stores_live_runs, s.stores_live_seconds
        ids, start_at = await self._start_live(server, runs, seconds)
        follow = asyncio.ensure_future(self._follow_live(server, ids, start_at, seconds))
        # From the first tick: the subscribers' attaching is not an event's cost.
        await asyncio.sleep(max(0.0, start_at - time.time()))
        meter = StoreMeter(server, db, self.workers)
        lat, info = await follow
        used = meter.read()
        p50, p99 = percentiles(lat, [50, 99])
        got = {"live.p50": p50, "live.p99": p99, **cpu_per("live", used, info["ticks"])}
        return got, used

    async def _stores_startrun(
        self, server: Server, db: pg.PgServer | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """C callers of StartRun (`ticker {count: 0}`): runs/s, and CPU per run over the
        measured seconds (the meter starts when the callers' warm-up ends)."""
        s = self.s
        call = asyncio.ensure_future(
            self.workers.call(
                clients.start_calls,
                server.addr,
                server.token,
                "ticker",
                {"count": 0},
                callers=s.startrun_callers,
                warmup=s.startrun_warmup,
                duration=s.startrun_seconds,
                loop=self.loop,
            )
        )
        await asyncio.sleep(s.startrun_warmup)
        meter = StoreMeter(server, db, self.workers)
        await asyncio.sleep(s.startrun_seconds)
        used = meter.read()
        res = await call
        if res["errors"]:
            raise RuntimeError(f"stores: {res['errors']} StartRun errors")
        got = {"startrun.runs_per_s": res["calls"] / s.startrun_seconds}
        got.update(cpu_per("startrun", used, res["calls"]))
        del got["startrun.total_cpu_us"]
        return got, used

    # -- 9. replicas -----------------------------------------------------------------------

    async def replicas(self) -> Outcome:
        """1, 2 and 3 replicas (`--replicas`) on one private PostgreSQL beside one server
        on SQLite, each deployment in turn in each phase: ingest at saturation, live
        latency at a fixed load (subscribers on the executing replica and on another
        one), StartRun/s and held subscribers; NOTIFYs/s, and the CPU per event of the
        servers and, separately, of the database."""
        s = self.s
        reason = pg.unavailable(s.pg_optional)
        if reason:
            log.warning("replicas: skipped: %s", reason)
            return Outcome(REPLICAS, REPLICAS_TITLE, {}, [], skipped=reason)
        chosen, not_measured = replica_plans(s)
        for label, why in not_measured.items():
            log.warning("replicas: not measuring %s: %s", label, why)
        db = pg.PgServer(self.work / "replicas-postgres.log")
        await asyncio.to_thread(db.start)
        try:
            async with replicas.deployments(
                chosen, self.work, db, self._starters(), self.server_loop
            ) as deps:
                values, cpu = await self._replicas_reps(deps, db)
        finally:
            await asyncio.to_thread(db.stop)
        details = {
            "columns": {p.key: p.label for p in chosen},
            "rows": [{"key": k, "name": n, "unit": u} for k, n, u, _b, _t in REPLICA_FIGURES],
            "values": values,
            "cpu_pct": cpu,
            "not_measured": not_measured,
        }
        figures = replicas_figures(values, chosen)
        return Outcome(REPLICAS, REPLICAS_TITLE, self._replicas_params(db), figures, details)

    async def _start_on(
        self, dep: Deployment, requests: list[pb.StartRunRequest], start_at: float = 0.0
    ) -> list[str]:
        """start_spread, timed: the rate sets the lead of the deployment's next schedule
        (see _lead). Warns when the runs' scheduled first tick (`start_at`) came first."""
        t0 = time.monotonic()
        ids = await start_spread(dep, requests)
        self._start_rates[dep.key] = len(ids) / max(time.monotonic() - t0, 1e-3)
        if start_at and time.time() > start_at:
            log.warning(
                "replicas: %s: starting %d runs took past their first tick", dep.key, len(ids)
            )
        return ids

    def _lead(self, dep: Deployment, runs: int) -> float:
        """Seconds from now to the first tick of `runs` runs about to be started on `dep`:
        the slack, and twice what starting them took last time (at 100 runs/s, before
        any), so that every run and subscriber is in place before the first tick even
        where StartRun is slow."""
        return self.s.slack_s + 2.0 * runs / self._start_rates.get(dep.key, 100.0)

    def _starters(self) -> list[str]:
        """The users whose StartRun calls the StartRun phase spreads over."""
        return [f"starter-{i}" for i in range(self.s.replicas_startrun_users)]

    def _replicas_params(self, db: pg.PgServer) -> dict[str, Any]:
        s = self.s
        return {
            "postgresql": db.version(),
            "cores": os.cpu_count(),
            "replicas": list(s.replicas),
            "ingest_runs": s.replicas_ingest_runs,
            "ingest_events_per_run": s.replicas_ingest_events,
            "live_runs": s.replicas_live_runs,
            "live_events_per_s_per_run": s.latency_rate,
            "live_seconds": s.replicas_live_seconds,
            "live_offered_events_per_s": s.replicas_live_runs * s.latency_rate,
            "live_subscribers": "one per run; with 2+ replicas half on another replica",
            "startrun_callers": s.replicas_startrun_callers,
            "startrun_users": s.replicas_startrun_users,
            "startrun_seconds": s.replicas_startrun_seconds,
            "held_subscribers": s.replicas_held,
            "payload_bytes": s.payload,
        }

    async def _replicas_reps(
        self, deps: list[Deployment], db: pg.PgServer
    ) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, dict[str, list[float]]]]]:
        """Each phase of each rep on every deployment in turn (the order rotated each
        rep); every figure's values per deployment, and CPU % per phase, deployment and
        part."""
        phases = {
            "ingest": self._replicas_ingest,
            "live": self._replicas_live,
            "startrun": self._replicas_startrun,
            "held": self._replicas_held,
        }
        values: dict[str, dict[str, list[float]]] = {d.key: {} for d in deps}
        cpu: dict[str, dict[str, dict[str, list[float]]]] = {
            p: {d.key: {} for d in deps} for p in phases
        }
        for rep in range(self.reps):
            turn = rep % len(deps)
            for phase, measure in phases.items():
                for dep in deps[turn:] + deps[:turn]:
                    got, used = await measure(dep, db if dep.plan.on_pg else None)
                    for key, value in got.items():
                        values[dep.key].setdefault(key, []).append(value)
                    for part, pct in replicas_cpu_pct(used, dep.plan.on_pg).items():
                        cpu[phase][dep.key].setdefault(part, []).append(pct)
                    shown = {k: round(v, 1) for k, v in got.items()}
                    log.info("replicas: rep %d %s, %s: %s", rep + 1, phase, dep.plan.label, shown)
        return values, cpu

    async def _replicas_ingest(
        self, dep: Deployment, db: pg.PgServer | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """R runs emitting as fast as the servers accept, spread over them: committed
        events/s, NOTIFYs/s and CPU per event."""
        s = self.s
        runs, events = s.replicas_ingest_runs, s.replicas_ingest_events
        start_at = time.time() + self._lead(dep, runs)
        request = paced(count=events, interval=0, size=s.payload, start_at=start_at)
        await self._start_on(dep, [request] * runs, start_at)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        meter = ClusterMeter(dep, db, self.workers)
        await wait_none_active(dep.servers[0], s.limit_s, "paced")
        used = meter.read()
        total = runs * events
        got = {"ingest.events_per_s": total / used["wall"]}
        got.update(cpu_per("ingest", used, total, "replicas"))
        return by_store("ingest", got, used, db is not None), used

    async def _replicas_live(
        self, dep: Deployment, db: pg.PgServer | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """N runs at `latency_rate` events/s started round-robin over the servers, a
        subscriber each (half on another replica): latency per kind of subscriber,
        NOTIFYs/s and CPU per event."""
        s = self.s
        runs, seconds = s.replicas_live_runs, s.replicas_live_seconds
        requests, start_at = self._live_requests(runs, seconds, self._lead(dep, runs))
        ids = await self._start_on(dep, requests, start_at)
        follow = asyncio.ensure_future(self._follow_spread(dep, ids, start_at, seconds))
        # From the first tick: the subscribers' attaching is not an event's cost.
        await asyncio.sleep(max(0.0, start_at - time.time()))
        meter = ClusterMeter(dep, db, self.workers)
        lat, ticks = await follow
        used = meter.read()
        got = {"live.events_per_s": ticks / used["wall"], **live_percentiles(lat)}
        got.update(cpu_per("live", used, ticks, "replicas"))
        return by_store("live", got, used, db is not None), used

    async def _follow_spread(
        self, dep: Deployment, ids: list[str], start_at: float, seconds: float
    ) -> tuple[dict[str, np.ndarray], int]:
        """A subscriber per run (Deployment.targets) until the runs end: latencies (ms)
        per kind of subscriber, and the ticks; raises unless every tick arrived."""
        count = round(self.s.latency_rate * seconds)
        results = await asyncio.gather(
            *(
                self.workers.call(
                    replicas.follow,
                    part,
                    dep.token,
                    start_at=start_at,
                    limit_s=seconds + self.s.limit_s,
                    loop=self.loop,
                )
                for part in replicas.parts(dep.targets(ids), self.workers.n)
            )
        )
        info = {k: sum(r[k] for r in results) for k in ("ticks", "late", "excluded", "errors")}
        if info["errors"] or info["ticks"] != count * len(ids):
            failures = [r["failures"] for r in results]
            raise RuntimeError(f"replicas: {dep.plan.label}: live runs delivered {info} {failures}")
        if info["late"] or info["excluded"]:
            log.info("replicas: %s: %s", dep.plan.label, info)
        lat: dict[str, array[float]] = {}
        for r in results:
            for tag, raw in r["latencies_ms"].items():
                lat.setdefault(tag, array("d")).frombytes(raw)
        return {tag: np.frombuffer(a, dtype=np.float64) for tag, a in lat.items()}, info["ticks"]

    async def _replicas_startrun(
        self, dep: Deployment, db: pg.PgServer | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """C callers of StartRun (`ticker {count: 0}`) spread over the servers and over
        `replicas_startrun_users` users: runs/s, and CPU per run over the measured
        seconds (the meter starts when the callers' warm-up ends)."""
        s = self.s
        tokens = [dep.tokens.tokens[u] for u in self._starters()]
        seconds = s.replicas_startrun_seconds
        calls = asyncio.gather(
            *(
                self.workers.call(
                    replicas.start_spread,
                    dep.addrs,
                    tokens,
                    "ticker",
                    {"count": 0},
                    callers=part,
                    connections=max(1, 2 * dep.plan.serve_workers),
                    warmup=s.startrun_warmup,
                    duration=seconds,
                    loop=self.loop,
                )
                for part in replicas.parts(range(s.replicas_startrun_callers), self.workers.n)
            )
        )
        await asyncio.sleep(s.startrun_warmup)
        meter = ClusterMeter(dep, db, self.workers)
        await asyncio.sleep(seconds)
        used = meter.read()
        results = await calls
        errors = sum(r["errors"] for r in results)
        if errors:
            raise RuntimeError(f"replicas: {dep.plan.label}: {errors} StartRun errors")
        done = sum(r["calls"] for r in results)
        got = {"startrun.runs_per_s": done / seconds, **cpu_per("startrun", used, done, "replicas")}
        del got["startrun.total_cpu_us"]
        return by_store("startrun", got, used, db is not None), used

    async def _replicas_held(
        self, dep: Deployment, db: pg.PgServer | None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """H runs (one tick, then holding) started round-robin, a subscriber each (half on
        another replica) held open: how many were held at once, how fast they attached,
        the RSS each run + subscriber added over all servers, and the CPU while they are
        held (over `settle_s`); then every run is stopped, which ends the streams."""
        s = self.s
        before = dep.rss()
        request = paced(count=1, interval=0, size=s.payload, hold=HOLD_S)
        ids = await self._start_on(dep, [request] * s.replicas_held)
        self._n += 1
        groups = replicas.parts(dep.targets(ids), self.workers.n)
        ready = [self.work / f"held-{self._n}-{i}.ready" for i in range(len(groups))]
        calls = [
            asyncio.ensure_future(
                self.workers.call(
                    replicas.hold,
                    group,
                    dep.token,
                    ready_path=str(ready[i]),
                    limit_s=s.limit_s,
                    loop=self.loop,
                )
            )
            for i, group in enumerate(groups)
        ]
        try:
            states = await held_states(ready, calls, s.limit_s)
            meter = ClusterMeter(dep, db, self.workers)
            await asyncio.sleep(s.settle_s)
            after = dep.rss()
            used = meter.read()
        finally:
            await stop_spread(dep, ids)
            ended = await asyncio.gather(*calls, return_exceptions=True)
        failed = [e for e in ended if isinstance(e, BaseException)]
        if failed:
            raise failed[0]
        held = sum(st["ready"] for st in states)
        got = {
            "held.subscribers": float(held),
            "held.attach_per_s": held / max(st["attach_s"] for st in states),
            "held.rss_kb": (after - before) / max(1, held) / KB,
        }
        return got, used

    async def _isolation_phase(
        self, server: Server, phase: str, run_id: str, cpu: dict[str, list[float]]
    ) -> dict[str, Any]:
        """One phase: the victim's calls (latency percentiles, statuses) and the abuser's."""
        s = self.s
        sync = isolation.Handshake(self.workers.event(), self.workers.event(), s.limit_s)
        meter = Meter(server, self.workers)
        seen, abuser = await asyncio.gather(
            self.workers.call(
                isolation.victim,
                server.addr,
                server.users["victim"],
                run_id,
                sync,
                seconds=s.isolation_seconds,
                rate=s.isolation_rate,
                loop=self.loop,
            ),
            self.workers.call(
                isolation.abuser,
                phase,
                server.addr,
                server.users["abuser"],
                sync,
                cap=s.isolation_stream_cap,
                loop=self.loop,
            ),
        )
        server_cpu = meter.record(cpu)
        return {"victim": victim_summary(seen), "abuser": abuser, "server_cpu_pct": server_cpu}

    # -- 10. HTTP edge ---------------------------------------------------------------------

    async def http(self) -> Outcome:
        """runservice's HTTP edge (SSE replay, live fan-out, appends through /v1/streams)
        beside its gRPC and the Node reference server: bench/http_edge.py."""
        from bench import http_edge  # noqa: PLC0415 - it builds on this module's Figure

        return await http_edge.run(self)


class StoreMeter:
    """CPU seconds used over a measured interval by a server process, by its database's
    processes (PostgreSQL's; none for SQLite) and by the load clients, and the wall time."""

    def __init__(self, server: Server, db: pg.PgServer | None, workers: Workers) -> None:
        self.server = server
        self.db = db
        self.workers = workers
        self.t0 = time.monotonic()
        self.start = self._now()

    def _now(self) -> dict[str, float]:
        return {
            "server": self.server.cpu_seconds(),
            "db": self.db.cpu_seconds() if self.db else 0.0,
            "clients": self.workers.cpu_seconds(),
        }

    def read(self) -> dict[str, float]:
        """Seconds of CPU per part since the meter was made, and 'wall'."""
        now = self._now()
        used = {k: now[k] - self.start[k] for k in now}
        used["wall"] = max(time.monotonic() - self.t0, 1e-9)
        return used


def cpu_per(
    phase: str, used: dict[str, float], count: int, server: str = "server"
) -> dict[str, float]:
    """Microseconds of CPU per item (event or run) of `phase`: the server's (`used`'s
    part named `server`), the database's and both together."""
    per = 1e6 / max(1, count)
    return {
        f"{phase}.cpu_us": used[server] * per,
        f"{phase}.db_cpu_us": used["db"] * per,
        f"{phase}.total_cpu_us": (used[server] + used["db"]) * per,
    }


def cpu_pct(used: dict[str, float]) -> dict[str, float]:
    """CPU % (100 = one core) of the server, the database and the clients."""
    return {k: 100.0 * used[k] / used["wall"] for k in ("server", "db", "clients")}


STORES_TITLE = "8. Stores: PostgreSQL beside SQLite"
SQLITE, POSTGRESQL = "sqlite", "postgresql"
STORE_PHASES = ("ingest", "live", "startrun")
CPU_TARGET = f"≤ 1.3{TIMES} SQLite"
# The stores figures: (key, name, unit, better, whether SQLite has the figure, target).
STORE_FIGURES = (
    ("ingest.events_per_s", "ingest committed events/s", "events/s", "higher", True, ""),
    ("ingest.cpu_us", "server CPU per committed event, ingest", "µs", "lower", True, CPU_TARGET),
    ("ingest.db_cpu_us", "database processes' CPU per event, ingest", "µs", "lower", False, ""),
    ("ingest.total_cpu_us", "server + database CPU per event, ingest", "µs", "lower", True, ""),
    ("live.p50", "live latency p50, fixed load", "ms", "lower", True, ""),
    ("live.p99", "live latency p99, fixed load", "ms", "lower", True, ""),
    ("live.cpu_us", "server CPU per event, fixed load", "µs", "lower", True, CPU_TARGET),
    ("live.db_cpu_us", "database processes' CPU per event, fixed load", "µs", "lower", False, ""),
    ("live.total_cpu_us", "server + database CPU per event, fixed load", "µs", "lower", True, ""),
    ("startrun.runs_per_s", "StartRun runs/s", "runs/s", "higher", True, ""),
    ("startrun.cpu_us", "server CPU per StartRun", "µs", "lower", True, ""),
    ("startrun.db_cpu_us", "database processes' CPU per StartRun", "µs", "lower", False, ""),
)


def stores_figures(values: dict[str, dict[str, list[float]]]) -> list[Figure]:
    """The stores scenario's figures: PostgreSQL's values, SQLite's as the baseline."""
    return [
        Figure(
            f"stores.{key}",
            name,
            unit,
            better,
            values[POSTGRESQL][key],
            values[SQLITE][key] if on_sqlite else None,
            "the same server on SQLite" if on_sqlite else "",
            target,
            "ratio_max" if target else "",
            1.3 if target else 0.0,
        )
        for key, name, unit, better, on_sqlite, target in STORE_FIGURES
    ]


REPLICAS_TITLE = "9. Replicas on one PostgreSQL"
# The replicas figures: (key, name, unit, better, target of one replica against SQLite).
REPLICA_FIGURES = (
    ("ingest.events_per_s", "ingest committed events/s, at saturation", "events/s", "higher", ""),
    ("ingest.notifies_per_s", "NOTIFYs/s, ingest", "NOTIFYs/s", "lower", ""),
    ("ingest.cpu_us", "servers' CPU per committed event, ingest", "µs", "lower", CPU_TARGET),
    ("ingest.db_cpu_us", "PostgreSQL's CPU per committed event, ingest", "µs", "lower", ""),
    ("ingest.total_cpu_us", "servers + PostgreSQL CPU per event, ingest", "µs", "lower", ""),
    ("live.events_per_s", "events/s delivered, fixed load", "events/s", "higher", ""),
    ("live.notifies_per_s", "NOTIFYs/s, fixed load", "NOTIFYs/s", "lower", ""),
    ("live.p50", "live latency p50, every subscriber", "ms", "lower", ""),
    ("live.p99", "live latency p99, every subscriber", "ms", "lower", ""),
    ("live.same.p50", "live latency p50, subscriber on the executing server", "ms", "lower", ""),
    ("live.same.p99", "live latency p99, subscriber on the executing server", "ms", "lower", ""),
    ("live.cross.p50", "live latency p50, subscriber on another replica", "ms", "lower", ""),
    ("live.cross.p99", "live latency p99, subscriber on another replica", "ms", "lower", ""),
    ("live.cpu_us", "servers' CPU per event, fixed load", "µs", "lower", CPU_TARGET),
    ("live.db_cpu_us", "PostgreSQL's CPU per event, fixed load", "µs", "lower", ""),
    ("live.total_cpu_us", "servers + PostgreSQL CPU per event, fixed load", "µs", "lower", ""),
    ("startrun.runs_per_s", "StartRun runs/s", "runs/s", "higher", ""),
    ("startrun.notifies_per_s", "NOTIFYs/s, StartRun", "NOTIFYs/s", "lower", ""),
    ("startrun.cpu_us", "servers' CPU per StartRun", "µs", "lower", ""),
    ("startrun.db_cpu_us", "PostgreSQL's CPU per StartRun", "µs", "lower", ""),
    ("held.subscribers", "subscribers held at once", "subscribers", "higher", ""),
    ("held.attach_per_s", "held subscribers attached/s", "subscribers/s", "higher", ""),
    ("held.rss_kb", "RSS per held run + subscriber, all servers", "KB", "lower", ""),
)


def replica_plans(s: Sizes) -> tuple[list[replicas.Plan], dict[str, str]]:
    """The deployments to measure, and those asked for that cannot be, with why."""
    workers = s.serve_workers
    missing: dict[str, str] = {}
    if workers and not serve_has("--workers"):
        missing[f"1 port, --workers {workers}"] = (
            "this version's `runservice serve` has no --workers option (measured once it has)"
        )
        workers = 0
    return replicas.plans(s.replicas, workers), missing


def by_store(
    phase: str, got: dict[str, float], used: dict[str, float], on_pg: bool
) -> dict[str, float]:
    """`got`, with the phase's NOTIFYs/s on PostgreSQL, or without its database CPU on
    SQLite (which has no database processes)."""
    if on_pg:
        return {**got, f"{phase}.notifies_per_s": used["notifies"] / used["wall"]}
    return {k: v for k, v in got.items() if k != f"{phase}.db_cpu_us"}


def replicas_cpu_pct(used: dict[str, float], on_pg: bool) -> dict[str, float]:
    """CPU % (100 = one core) of each server, of all of them, of PostgreSQL (on
    PostgreSQL) and of the load clients."""
    parts = [k for k in used if k.startswith("replica ")]
    parts += ["replicas", *(["db"] if on_pg else []), "clients"]
    return {k: 100.0 * used[k] / used["wall"] for k in parts}


def live_percentiles(lat: dict[str, np.ndarray]) -> dict[str, float]:
    """p50 and p99 of every subscriber's latencies (ms), and of each kind's (same
    server as the run's executor, another replica) that has any."""
    out: dict[str, float] = {}
    kinds = {"": [a for a in lat.values() if a.size]}
    kinds.update({f"{tag}.": [lat[tag]] for tag in (replicas.SAME, replicas.CROSS) if tag in lat})
    for prefix, samples in kinds.items():
        if samples and sum(a.size for a in samples):  # none: every tick came before its subscriber
            both = percentiles(np.concatenate(samples), [50, 99])
            out[f"live.{prefix}p50"], out[f"live.{prefix}p99"] = both
    return out


async def held_states(
    ready: list[Path], calls: Sequence[asyncio.Future[dict[str, Any]]], limit: float
) -> list[dict[str, Any]]:
    """What each holding client wrote once its streams were attached; raises at once if
    a client failed before that."""

    async def written() -> bool:
        return all(p.exists() for p in ready) or any(c.done() for c in calls)

    await wait_until(written, limit + 10, "every held subscriber attached")
    for c in calls:
        if c.done() and c.exception() is not None:
            raise RuntimeError("a holding client failed") from c.exception()
    return [json.loads(p.read_text()) for p in ready]


def replicas_figures(
    values: dict[str, dict[str, list[float]]], chosen: list[replicas.Plan]
) -> list[Figure]:
    """Per figure and PostgreSQL deployment, its values beside one replica's; one
    replica's (or, without it, every deployment's) beside SQLite's, with the CPU target."""
    labels = {p.key: p.label for p in chosen}
    out: list[Figure] = []
    for key, name, unit, better, target in REPLICA_FIGURES:
        for plan in chosen:
            if plan.key == replicas.SQLITE or key not in values[plan.key]:
                continue
            against = "pg-1" if "pg-1" in values and plan.key != "pg-1" else replicas.SQLITE
            base = values[against].get(key)
            aim = target if plan.key == "pg-1" else ""
            out.append(
                Figure(
                    f"replicas.{plan.key}.{key}",
                    f"{name}, {plan.label}",
                    unit,
                    better,
                    values[plan.key][key],
                    base,
                    labels[against] if base else "",
                    aim,
                    "ratio_max" if aim else "",
                    1.3 if aim else 0.0,
                )
            )
    return out


def victim_summary(seen: dict[str, Any]) -> dict[str, Any]:
    """The victim's calls of one phase: how many, the share that succeeded (%), latency
    p50, p99 and max (ms, failed calls included), and the calls per RPC and status."""
    lat = np.frombuffer(seen["latencies_ms"], dtype=np.float64)
    p50, p99, top = percentiles(lat, [50, 99, 100])
    failures = sum(isolation.failed(seen["statuses"]).values())
    return {
        "calls": lat.size,
        "ok_pct": 100.0 * (lat.size - failures) / max(1, lat.size),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": top,
        "statuses": seen["statuses"],
    }


# The victim's figures per abuse phase: (key in the phase's outcome, name, unit, better,
# target, target kind, target value).
VICTIM_FIGURES = (
    ("p50_ms", "victim p50", "ms", "lower", "", "", 0.0),
    ("p99_ms", "victim p99", "ms", "lower", "", "", 0.0),
    ("ok_pct", "victim calls succeeded", "%", "higher", "100 %", "abs_min", 100.0),
)


def isolation_figures(
    phases: dict[str, list[dict[str, Any]]], cpu: dict[str, dict[str, list[float]]]
) -> list[Figure]:
    """Per abuse phase, the victim's figures beside the same figures of the quiet phase."""

    def victim(phase: str, key: str) -> list[float]:
        return [float(rep["victim"][key]) for rep in phases[phase]]

    base = "the victim alone (quiet phase)"
    return [
        Figure(
            f"isolation.{phase}.{key}",
            f"{name}, {label}",
            unit,
            better,
            victim(phase, key),
            victim("quiet", key),
            base,
            target,
            kind,
            value,
            cpu[phase],
        )
        for phase, label in list(isolation.PHASES.items())[1:]
        for key, name, unit, better, target, kind, value in VICTIM_FIGURES
    ]


SCENARIOS: dict[str, Callable[[Bench], Awaitable[Outcome]]] = {
    "replay": Bench.replay,
    "fanout": Bench.fanout,
    "latency": Bench.latency,
    "startrun": Bench.startrun,
    "ingest": Bench.ingest,
    "capacity": Bench.capacity,
    "isolation": Bench.isolation,
    "stores": Bench.stores,
    "replicas": Bench.replicas,
    "http": Bench.http,
}
