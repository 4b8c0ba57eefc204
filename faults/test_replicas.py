"""Replicas under faults: two or three `runservice serve` processes on one database of the
session's private PostgreSQL (faults/pg.py), each with a data directory and port of its
own, sharing one tokens file and `--lease-ttl 2s`.

Runs execute on one replica and are followed on another. The rows restart the database,
take it away for longer than the lease (stopped, or frozen with SIGSTOP), end one
replica's LISTEN connection, and restart the replicas one after the other under resuming
clients. Each ends with the shared checker reading the database once every replica has
stopped, and checks that no run ended INTERRUPTED unless the row expects it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from faults.checker import RunRecord, SeenLog, SeenStream, records_from_postgres, verify
from faults.harness import USERS, Load, Node, state_name, wait_all_terminal
from faults.pg import ROW_DB_PREFIX, FaultPg
from faults.report import Row
from faults.test_postgres import Readiness, commit_failures
from runservice.client import AsyncRunClient
from runservice.client.errors import RunServiceError
from runservice.tokens import add_token
from runservice.v1 import run_service_pb2 as pb
from tests.serverproc import error_reason, wait_for

LEASE_TTL_S = 2.0
DRAIN_S = 2.0
GRACE_S = 1.0
EXIT_LIMIT_S = DRAIN_S + GRACE_S + 5.0
RUN_USERS = ("alice", "bob")
TICK_S = 0.01
RUNS_PER_REPLICA = 3
EMITTING_SEQ = 10  # a run has reached it: it emits when the fault begins
FOLLOW_GIVE_UP_S = 120.0
RECOVERY_LIMIT_S = 30.0
END_LIMIT_S = 120.0
START_EVERY_S = 0.3
# What StartRun may answer while the database is away: accepted, or refused as unavailable.
START_OUTCOMES_ALLOWED = frozenset({"OK", "UNAVAILABLE:STORE_UNAVAILABLE"})

RESTARTS = 3
RESTART_EVERY_S = 1.0
OUTAGE_S = 3 * LEASE_TTL_S

LISTEN_KILLS = 3
LISTEN_RUNS = 8
LISTEN_TICK_S = 0.02
LISTEN_TICKS = 600  # 12 s and more: the runs outlive every kill
RELISTEN_LIMIT_S = 15.0
# A follower of another replica's run looks at the database every 2 s (the poll) even
# without a notification, and the replica LISTENs again after 1 s: a stall past this is
# a notification lost for good.
STALL_LIMIT_S = 5.0

ROLLING_RUNS = 50
ROLLING_TICK_S = 0.05
ROLLING_TICKS = (20, 240)  # 1 to 12 s and more: some end before, some in, some after a drain
CLIENTS_PER_USER = 3
ROUND_ROBIN = (("grpc.lb_policy_name", "round_robin"),)
DRAINING = "SERVER_DRAINING"

# What the servers' logs say (counted per replica).
LATE_RENEWAL = "the lease was renewed late"
PEER_SWEEP = "expired: interrupting the runs executed under them"
FENCED = "was ended by another replica"
LISTEN_LOST = "lost the notification connection"


@dataclass
class Cluster:
    """Replicas on one database of the private PostgreSQL, with the users' tokens."""

    postgres: FaultPg
    database: str
    tmp: Path
    tokens: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The --db URL every replica is given."""
        return self.postgres.url(self.database)

    async def start(self, replicas: int = 2) -> None:
        """Starts `replicas` servers, one after the other, each on a fresh port."""
        args = [
            *("--tokens-file", str(self.tmp / "tokens.toml")),
            *("--lease-ttl", f"{LEASE_TTL_S:g}s"),
            *("--drain-timeout", f"{DRAIN_S:g}s"),
            *("--stop-grace", f"{GRACE_S:g}s"),
        ]
        for i in range(replicas):
            node = Node(self.tmp / f"replica-{i}", self.tokens, list(args), db_url=self.url)
            self.nodes.append(node)
            await node.start()

    async def terminate(self) -> list[int]:
        """SIGTERM to every replica, one after the other; their exit codes."""
        return [await node.terminate() for node in self.nodes]

    async def records(self) -> list[RunRecord]:
        """Every run and its log, as stored (the replicas should have stopped)."""
        return await records_from_postgres(self.url)

    def logged(self, text: str) -> list[int]:
        """How many times each replica's log (all its lives) says `text`."""
        return [node.server.log_text().count(text) if node.server else 0 for node in self.nodes]


@pytest.fixture
async def cluster(tmp_path: Path, postgres: FaultPg) -> AsyncIterator[Cluster]:
    """A cluster on a fresh database, not started. At the end the database is thawed if a
    row froze it, the replicas still up are killed, PostgreSQL is started if a row left it
    stopped, and the database is dropped."""
    name = await asyncio.to_thread(postgres.create_database, ROW_DB_PREFIX)
    tokens = {u: add_token(tmp_path / "tokens.toml", u, r) for u, r in USERS.items()}
    cluster = Cluster(postgres, name, tmp_path, tokens)
    try:
        yield cluster
    finally:
        thaw(postgres_processes(postgres))
        for node in cluster.nodes:
            if node.server is not None and node.server.returncode is None:
                await node.server.kill()
        await asyncio.to_thread(postgres.ensure_running)
        await asyncio.to_thread(postgres.drop_database, name)


# -- load across replicas ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def loads_on(cluster: Cluster, seen: SeenLog) -> AsyncIterator[list[Load]]:
    """A Load (raw stubs on a channel of its own) per replica, all recording into `seen`."""
    loads = [Load(node, seen) for node in cluster.nodes]
    try:
        yield loads
    finally:
        for load in loads:
            await load.close()


def owners(loads: list[Load]) -> dict[str, str]:
    """run_id -> the user who started it, over every replica."""
    return {run_id: user for load in loads for run_id, user in load.owners.items()}


async def spread_runs(loads: list[Load], per_replica: int, count: int) -> dict[str, int]:
    """Starts `per_replica` ticker runs of `count` ticks on each replica, each followed by a
    resuming subscriber on the next replica; run_id -> the replica that executes it."""
    where: dict[str, int] = {}
    for i in range(per_replica * len(loads)):
        here, user = i % len(loads), RUN_USERS[i % 2]
        run = await loads[here].start("ticker", user, count=count, interval=TICK_S, size=100)
        loads[(here + 1) % len(loads)].follow(run.run_id, user, give_up=FOLLOW_GIVE_UP_S)
        where[run.run_id] = here
    return where


async def wait_emitting(loads: list[Load], where: dict[str, int], seq: int = EMITTING_SEQ) -> None:
    """Waits until every run has committed `seq` events (read on its own replica)."""

    async def reached() -> bool:
        for run_id, here in where.items():
            run = await loads[here].get(run_id, loads[here].owners[run_id])
            if run.last_seq < seq:
                return False
        return True

    await wait_for(reached, limit=30, interval=0.1, message="the runs did not start emitting")


async def start_across(
    loads: list[Load], fault: asyncio.Task[None], outcomes: Counter[str]
) -> None:
    """Calls StartRun every START_EVERY_S, on each replica in turn, until `fault` is done,
    counting outcomes (OK, or code:reason); each started run is followed on another
    replica. Returns once every call has ended."""

    async def one(here: int) -> None:
        try:
            run = await loads[here].start("echo", "alice", text="during the fault")
        except grpc.aio.AioRpcError as exc:
            outcomes[f"{exc.code().name}:{error_reason(exc)}"] += 1
            return
        outcomes["OK"] += 1
        loads[(here + 1) % len(loads)].follow(run.run_id, "alice", give_up=FOLLOW_GIVE_UP_S)

    calls: list[asyncio.Task[None]] = []
    while not fault.done():
        calls.append(asyncio.create_task(one(len(calls) % len(loads))))
        await asyncio.sleep(START_EVERY_S)
    await fault
    await asyncio.gather(*calls)


async def serving_again(cluster: Cluster) -> float:
    """Waits until every replica's readiness is SERVING; seconds it took."""
    began = time.monotonic()
    for node in cluster.nodes:
        async with Readiness(node) as readiness:
            await readiness.serving_again(RECOVERY_LIMIT_S)
    return time.monotonic() - began


def lease_figures(cluster: Cluster) -> dict[str, list[int]]:
    """What each replica logged of leases: late renewals, sweeps of a peer's expired
    lease, its own lease ended by a peer."""
    return {
        "late_renewals": cluster.logged(LATE_RENEWAL),
        "peer_leases_swept": cluster.logged(PEER_SWEEP),
        "own_lease_ended_by_a_peer": cluster.logged(FENCED),
    }


# -- the database's faults -----------------------------------------------------------------


def postgres_processes(postgres: FaultPg) -> list[psutil.Process]:
    """The postmaster and every process it started (none when it is not running)."""
    try:
        pid = int((postgres.datadir / "postmaster.pid").read_text().split()[0])
        postmaster = psutil.Process(pid)
        return [postmaster, *postmaster.children(recursive=True)]
    except (OSError, ValueError, IndexError, psutil.Error):
        return []


def thaw(processes: list[psutil.Process]) -> None:
    """SIGCONT to each process still there (a no-op for one not stopped)."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def frozen(postgres: FaultPg) -> Iterator[int]:
    """SIGSTOP of the postmaster, then of its children, while inside (so no new backend
    is forked meanwhile); SIGCONT to all of them on the way out. Yields how many."""
    processes = postgres_processes(postgres)[:1]
    assert processes, "PostgreSQL is not running"
    try:
        processes[0].send_signal(signal.SIGSTOP)
        processes += processes[0].children(recursive=True)  # none forked since
        for process in processes[1:]:
            process.send_signal(signal.SIGSTOP)
        yield len(processes)
    finally:
        thaw(processes)


async def outage(postgres: FaultPg, how: str) -> None:
    """The database out of reach for OUTAGE_S: `stopped` (pg_ctl stop -m immediate, then
    started: connections are refused) or `frozen` (its processes SIGSTOPped, then
    SIGCONTed: connections and statements hang)."""
    if how == "frozen":
        with frozen(postgres):
            await asyncio.sleep(OUTAGE_S)
        return
    await asyncio.to_thread(postgres.stop_now)
    try:
        await asyncio.sleep(OUTAGE_S)
    finally:
        await asyncio.to_thread(postgres.resume)


async def database_fault_under_load(
    cluster: Cluster, row: Row, fault: Callable[[], Coroutine[Any, Any, None]], *, count: int
) -> dict[str, list[int]]:
    """Ticker runs of `count` ticks execute on every replica, each followed by a resuming
    subscriber on another replica, while `fault` is done to the database and StartRun is
    called on each replica in turn. Then every replica must be SERVING again on its own
    and accept a run; every run must end SUCCEEDED (none interrupted by a peer); every
    subscriber must reach its terminal event; no INTERNAL may reach a client; every
    replica must exit 0 on SIGTERM and the checker must pass. Returns lease_figures."""
    seen = SeenLog()
    starts: Counter[str] = Counter()
    async with loads_on(cluster, seen) as loads:
        where = await spread_runs(loads, RUNS_PER_REPLICA, count)
        await wait_emitting(loads, where)
        began = time.monotonic()
        await start_across(loads, asyncio.create_task(fault()), starts)
        fault_s = time.monotonic() - began
        recovered_s = await serving_again(cluster)
        for i, load in enumerate(loads):
            after = await load.start("echo", "bob", text="after the fault")
            loads[(i + 1) % len(loads)].follow(after.run_id, "bob", give_up=FOLLOW_GIVE_UP_S)
        for load in loads:
            await wait_all_terminal(load, list(load.owners), limit=END_LIMIT_S)
        streams = [s for load in loads for s in await asyncio.wait_for(load.followed(), 60)]
        internal = sum(load.server_internal_errors() for load in loads)
        errors = sum((load.errors for load in loads), Counter[str]())
    exit_codes = await cluster.terminate()
    records = await cluster.records()
    figures = verify(records, seen, owners=owners(loads))
    ended = Counter(r.state for r in records)
    leases = lease_figures(cluster)
    row.set(
        **figures.as_dict(),
        replicas=len(cluster.nodes),
        lease_ttl_s=LEASE_TTL_S,
        fault_s=round(fault_s, 1),
        serving_again_after_s=round(recovered_s, 2),
        start_outcomes_during_fault=dict(starts),
        runs_ended=dict(ended),
        subscribers=len(streams),
        subscribers_without_terminal=sum(not s.saw_terminal for s in streams),
        subscriber_errors=dict(errors),
        internal_errors=internal,
        commit_failures_logged=[commit_failures(node) for node in cluster.nodes],
        **leases,
        exit_codes=exit_codes,
    )
    figures.assert_clean()
    assert ended == {"SUCCEEDED": len(records)}, dict(ended)
    assert not any(leases["peer_leases_swept"]), leases
    assert internal == 0, f"INTERNAL reached clients: {dict(errors)} {dict(starts)}"
    assert set(starts) <= START_OUTCOMES_ALLOWED, dict(starts)
    assert all(s.saw_terminal for s in streams)
    assert exit_codes == [0] * len(cluster.nodes)
    return leases


# -- rows: the database ----------------------------------------------------------------------


async def test_postgresql_restarted_under_load_with_2_replicas(
    cluster: Cluster, postgres: FaultPg, row: Row
) -> None:
    """Two replicas; `pg_ctl restart -m fast` of their database 3 times, 1 s apart, while
    ticker runs execute on both, each followed by a resuming subscriber on the other
    replica, and StartRun is called on each in turn every 0.3 s: StartRun answers OK or
    UNAVAILABLE (STORE_UNAVAILABLE), never INTERNAL; both replicas are SERVING again on
    their own; every run ends SUCCEEDED (none interrupted by a peer, no peer's lease
    swept); every subscriber on the non-executing replica receives its complete log;
    checker clean; both exit 0."""
    await cluster.start(2)
    took: list[float] = []

    async def restarts() -> None:
        for n in range(RESTARTS):
            await asyncio.sleep(RESTART_EVERY_S if n else 0)
            began = time.monotonic()
            await asyncio.to_thread(postgres.restart)
            took.append(round(time.monotonic() - began, 2))

    try:
        await database_fault_under_load(cluster, row, restarts, count=1000)
    finally:
        row.set(restarts=RESTARTS, restart_s=took)


@pytest.mark.parametrize("how", ["stopped", "frozen"])
async def test_postgresql_unreachable_longer_than_the_lease(
    cluster: Cluster, postgres: FaultPg, row: Row, how: str
) -> None:
    """Three replicas with --lease-ttl 2s; their database out of reach for 6 s (3x the
    lease): `stopped` (`pg_ctl stop -m immediate`, then started: connections refused) or
    `frozen` (the postmaster and its processes SIGSTOPped, then SIGCONTed: statements
    hang), while ticker runs execute on every replica, each followed by a resuming
    subscriber on another, and StartRun is called on each in turn. Every replica renews
    its lease late (the lease did expire) and yet none sweeps a peer's lease: every run
    ends SUCCEEDED, nothing lost, no gap, every subscriber reaches its terminal event;
    checker clean; all exit 0."""
    await cluster.start(3)
    leases = await database_fault_under_load(
        cluster, row, lambda: outage(postgres, how), count=1500
    )
    row.set(outage_s=OUTAGE_S, how=how)
    assert all(leases["late_renewals"]), f"a lease never expired: {leases}"


# -- row: a replica's LISTEN connection ended -----------------------------------------------


async def listen_backends(cluster: Cluster) -> dict[int, int]:
    """pid -> client port of each session on the database whose query is a LISTEN."""
    out = await asyncio.to_thread(
        cluster.postgres.psql,
        "SELECT pid, client_port FROM pg_stat_activity"
        f" WHERE datname = '{cluster.database}' AND query LIKE 'LISTEN%'",
    )
    pairs = (line.split("|") for line in out.split())
    return {int(pid): int(port) for pid, port in pairs}


def database_ports(node: Node, postgres: FaultPg) -> set[int]:
    """The local ports of the replica's TCP connections to the database."""
    assert node.server is not None
    connections = psutil.Process(node.server.pid).net_connections(kind="tcp")
    return {c.laddr.port for c in connections if c.raddr and c.raddr.port == postgres.port}


async def listen_pid(cluster: Cluster, node: Node) -> int | None:
    """The backend pid of the replica's LISTEN connection, or None while it has none."""
    ports = database_ports(node, cluster.postgres)
    mine = [pid for pid, port in (await listen_backends(cluster)).items() if port in ports]
    assert len(mine) <= 1, f"a replica LISTENs on {len(mine)} connections"
    return mine[0] if mine else None


@dataclass
class TimedFollower:
    """One Subscribe call read to its end (no resuming), with each message's arrival."""

    stream: SeenStream
    arrivals: list[float] = field(default_factory=list)
    code: str = ""

    @property
    def done(self) -> bool:
        """The call has ended."""
        return bool(self.code)

    async def follow(self, load: Load, user: str) -> None:
        """Reads the run's log from seq 1 until the server ends the stream."""
        request = pb.SubscribeRequest(run_id=self.stream.run_id, from_seq=1)
        call = load.stub.Subscribe(request, metadata=load.node.md(user), timeout=60)
        try:
            async for response in call:
                self.arrivals.append(time.monotonic())
                for event in response.events:
                    self.stream.add(event)
            self.code = (await call.code()).name
        except grpc.aio.AioRpcError as exc:
            self.code = f"{exc.code().name}:{error_reason(exc)}"

    def longest_stall(self, since: float = 0.0, until: float = float("inf")) -> float:
        """The longest time between two consecutive messages that arrived in the window."""
        times = [t for t in self.arrivals if since <= t <= until]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


async def kill_listen(cluster: Cluster, node: Node, followers: list[TimedFollower]) -> float:
    """Ends the replica's LISTEN session (pg_terminate_backend), waits until it LISTENs on
    a new one and every follower still reading has received a message since; returns the
    seconds from the kill to the new LISTEN."""
    old = await wait_for(lambda: listen_pid(cluster, node), limit=RELISTEN_LIMIT_S)
    await asyncio.to_thread(cluster.postgres.psql, f"SELECT pg_terminate_backend({old})")
    killed = time.monotonic()

    async def listening_again() -> bool:
        return await listen_pid(cluster, node) not in (None, old)

    await wait_for(listening_again, limit=RELISTEN_LIMIT_S, interval=0.05)
    back = time.monotonic()

    def progressed() -> bool:
        return all(f.done or f.arrivals[-1] > back for f in followers)

    await wait_for(progressed, limit=RELISTEN_LIMIT_S, message="followers stalled")
    return back - killed


async def test_listen_connection_of_a_replica_ended(cluster: Cluster, row: Row) -> None:
    """Two replicas; runs execute on A and are followed on B (one Subscribe call each, no
    resuming) while B's LISTEN session is ended 3 times (`pg_terminate_backend` of the
    backend whose query is a LISTEN and whose client port is B's): B LISTENs again each
    time, every subscriber still receives its complete log and ends OK right after its
    terminal event, the longest stall a subscriber saw stays under 5 s (the poll covers
    the lost notifications); every run ends SUCCEEDED; checker clean; both exit 0.
    Reports the longest stall, before and during the kills."""
    await cluster.start(2)
    seen = SeenLog()
    b = cluster.nodes[1]
    followers: list[TimedFollower] = []
    async with loads_on(cluster, seen) as (on_a, on_b):
        tasks = []
        for i in range(LISTEN_RUNS):
            user = RUN_USERS[i % 2]
            run = await on_a.start("ticker", user, count=LISTEN_TICKS, interval=LISTEN_TICK_S)
            follower = TimedFollower(seen.stream(run.run_id))
            followers.append(follower)
            tasks.append(asyncio.create_task(follower.follow(on_b, user)))
        await wait_for(lambda: all(len(f.stream.items) >= EMITTING_SEQ for f in followers))
        first_kill = time.monotonic()
        relisten = [await kill_listen(cluster, b, followers) for _ in range(LISTEN_KILLS)]
        kills_s = time.monotonic() - first_kill
        live_at_last_kill = sum(not f.done for f in followers)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        await wait_all_terminal(on_a, list(on_a.owners))
        ended = Counter([state_name((await on_a.get(i, u)).state) for i, u in on_a.owners.items()])
    exit_codes = await cluster.terminate()
    figures = verify(await cluster.records(), seen, owners=on_a.owners)
    stall = max(f.longest_stall() for f in followers)
    row.set(
        **figures.as_dict(),
        listen_kills=LISTEN_KILLS,
        relisten_s=[round(s, 2) for s in relisten],
        longest_stall_s=round(stall, 2),
        longest_stall_before_kills_s=round(
            max(f.longest_stall(until=first_kill) for f in followers), 2
        ),
        longest_stall_during_kills_s=round(
            max(f.longest_stall(first_kill, first_kill + kills_s) for f in followers), 2
        ),
        subscribers_live_at_last_kill=live_at_last_kill,
        stream_codes=dict(Counter(f.code for f in followers)),
        notification_losses_logged=cluster.logged(LISTEN_LOST),
        runs_ended=dict(ended),
        exit_codes=exit_codes,
    )
    figures.assert_clean()
    assert live_at_last_kill == len(followers), "runs ended before the kills did"
    assert all(f.code == "OK" and f.stream.saw_terminal for f in followers)
    assert ended == {"SUCCEEDED": len(followers)}, dict(ended)
    assert stall < STALL_LIMIT_S, stall
    assert cluster.logged(LISTEN_LOST)[1] >= LISTEN_KILLS
    assert exit_codes == [0, 0]


# -- row: a rolling restart ------------------------------------------------------------------


class CountedCalls:
    """A stub's method that counts its calls (each Subscribe call a client makes)."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.method(*args, **kwargs)


@contextlib.asynccontextmanager
async def resuming_clients(
    cluster: Cluster, subscribe_calls: list[CountedCalls]
) -> AsyncIterator[dict[str, list[AsyncRunClient]]]:
    """AsyncRunClients of each user, each on one channel spanning every replica
    (round_robin over their addresses); their Subscribe calls are counted into
    `subscribe_calls` (one per client)."""
    target = "ipv4:" + ",".join(node.addr for node in cluster.nodes)
    clients = {
        user: [
            AsyncRunClient(target, token=cluster.tokens[user], channel_options=ROUND_ROBIN)
            for _ in range(CLIENTS_PER_USER)
        ]
        for user in RUN_USERS
    }
    for client in (c for per_user in clients.values() for c in per_user):
        # The client has no hook for its calls; its stub is the one seam that sees each
        # attempt, resumes included.
        counted = CountedCalls(client._stub.Subscribe)
        client._stub.Subscribe = counted
        subscribe_calls.append(counted)
    try:
        yield clients
    finally:
        for client in (c for per_user in clients.values() for c in per_user):
            await client.close()


async def subscribe_to_end(client: AsyncRunClient, stream: SeenStream) -> SeenStream:
    """Everything the client's resuming subscribe delivers of the run, into `stream`."""
    async for event in client.subscribe(stream.run_id):
        stream.add(event)
    return stream


@dataclass
class Roll:
    """What restarting one replica took and saw."""

    exit_code: int = -1
    exit_s: float = 0.0
    restart_s: float = 0.0
    draining_refusal: str = ""


async def refusal_while_draining(load: Load) -> str:
    """StartRun on a replica told to stop: "" while it still accepts runs, else what it
    answered (code:reason)."""
    try:
        await load.start("echo", "alice", text="a probe of the drain")
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}:{error_reason(exc)}"
    return ""


async def roll(cluster: Cluster, loads: list[Load], index: int) -> tuple[Roll, str]:
    """SIGTERM to one replica: it must refuse new runs (SERVER_DRAINING) while another
    takes them; waits for its exit, starts it again on the same port and data dir. The
    roll, and the run the other replica took meanwhile."""
    node, other = cluster.nodes[index], loads[(index + 1) % len(loads)]
    assert node.server is not None
    outcome = Roll()
    began = time.monotonic()
    node.server.proc.send_signal(signal.SIGTERM)
    outcome.draining_refusal = await wait_for(
        lambda: refusal_while_draining(loads[index]), limit=10, interval=0.05
    )
    taken = await other.start("ticker", "alice", count=20, interval=ROLLING_TICK_S)
    outcome.exit_code = await node.server.wait_exit(EXIT_LIMIT_S)
    outcome.exit_s = round(time.monotonic() - began, 2)
    outcome.restart_s = round(await node.start(), 2)
    return outcome, taken.run_id


async def streamed_runs(
    loads: list[Load],
    clients: dict[str, list[AsyncRunClient]],
    seen: SeenLog,
    where: dict[str, int],
) -> asyncio.Future[list[SeenStream | BaseException]]:
    """Starts ROLLING_RUNS ticker runs of 1 to 12 s on the replicas in turn, for each user
    in turn, each streamed to its end by one of its user's clients (recorded in `where`:
    run_id -> the replica that executes it). The streams, or what each raised."""
    subscribers = []
    for i in range(ROLLING_RUNS):
        here, user = i % len(loads), RUN_USERS[(i // 2) % 2]
        ticks = random.randint(*ROLLING_TICKS)
        run = await loads[here].start("ticker", user, count=ticks, interval=ROLLING_TICK_S)
        where[run.run_id] = here
        client = clients[user][i % CLIENTS_PER_USER]
        subscribers.append(asyncio.create_task(subscribe_to_end(client, seen.stream(run.run_id))))
    return asyncio.gather(*subscribers, return_exceptions=True)


async def test_rolling_restart_under_resuming_clients(cluster: Cluster, row: Row) -> None:
    """Two replicas; 50 ticker runs (1 to 12 s) started on both, each streamed by a
    resuming AsyncRunClient whose channel spans both replicas (round_robin); each replica
    in turn gets SIGTERM (drain 2 s), refuses new runs with SERVER_DRAINING while the
    other takes them, exits 0 and is started again on its port and data dir. Every client
    ends with its run's complete gap-free sequence through its terminal event; runs end
    SUCCEEDED or (on a replica that drained) INTERRUPTED, never anything else; checker
    clean; both exit 0 at the end."""
    await cluster.start(2)
    seen = SeenLog()
    where: dict[str, int] = {}
    calls: list[CountedCalls] = []
    async with loads_on(cluster, seen) as loads, resuming_clients(cluster, calls) as clients:
        followed = await streamed_runs(loads, clients, seen, where)
        try:
            await wait_emitting(loads, where, seq=2)
            rolls = []
            for index in range(len(cluster.nodes)):
                outcome, taken = await roll(cluster, loads, index)
                rolls.append(outcome)
                client = clients["alice"][index]
                more = await asyncio.wait_for(subscribe_to_end(client, seen.stream(taken)), 60)
                assert more.saw_terminal
            results = await asyncio.wait_for(followed, 90)
        finally:
            followed.cancel()
        ended = Counter(
            [
                f"replica-{where[i]}:{state_name((await loads[0].get(i, u)).state)}"
                for load in loads
                for i, u in load.owners.items()
                if i in where
            ]
        )
    exit_codes = await cluster.terminate()
    records = await cluster.records()
    figures = verify(records, seen, owners=owners(loads))
    failed = [r for r in results if isinstance(r, BaseException)]
    streams = [r for r in results if isinstance(r, SeenStream)]
    row.set(
        **figures.as_dict(),
        subscribers=len(results),
        subscribe_calls=sum(c.calls for c in calls),
        resumes=sum(c.calls for c in calls) - len(seen.streams),
        subscribers_failed=dict(Counter(type(r).__name__ for r in failed)),
        subscribers_without_terminal=sum(not s.saw_terminal for s in streams),
        runs_ended=dict(sorted(ended.items())),
        all_runs_ended=dict(Counter(r.state for r in records)),
        exit_codes_at_roll=[r.exit_code for r in rolls],
        exit_s_at_roll=[r.exit_s for r in rolls],
        restart_s=[r.restart_s for r in rolls],
        draining_refusals=[r.draining_refusal for r in rolls],
        **lease_figures(cluster),
        exit_codes=exit_codes,
    )
    figures.assert_clean()
    assert not failed, [repr(f) for f in failed if isinstance(f, RunServiceError)] or failed
    assert all(s.saw_terminal for s in streams)
    assert {r.state for r in records} <= {"SUCCEEDED", "INTERRUPTED"}, row.figures
    assert all(r.exit_code == 0 and r.exit_s <= EXIT_LIMIT_S for r in rolls), rolls
    assert all(r.draining_refusal == f"UNAVAILABLE:{DRAINING}" for r in rolls), rolls
    assert exit_codes == [0, 0]
