"""Prometheus metrics (--metrics-listen): exact counts after a scripted workload, scraped over
HTTP from a real server; `promtool check metrics` on the scrape; one endpoint summing the
workers of --workers; replicas' lease metrics; off by default; and the Grafana dashboard
and the Kubernetes manifest naming only what the server exposes.

promtool comes from Debian's `prometheus` package (`make promtool` unpacks it into
.tools/bin); without CI a missing promtool skips its test, with CI it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runservice import config
from runservice.app import ConfigError, ListenError, build
from runservice.cli import _parser
from runservice.domain.errors import DatabaseUnavailableError, StoreError, StoreUnavailableError
from runservice.domain.model import Run, RunEvent, RunState
from runservice.metrics import GAUGES, Metrics
from runservice.runtime.cluster import Replica
from runservice.runtime.lifecycle import orphan_end
from runservice.runtime.writer import Writer
from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import Harness
from tests.fakes import FakeClock, gate
from tests.helpers import read_all, start
from tests.pgserver import PgServer
from tests.serverproc import (
    bearer,
    free_port,
    read_log,
    running_server,
    wait_for,
)
from tests.test_workers import complete_log, connections, serving_workers
from tests.test_workers import start as start_ticker

ROOT = Path(__file__).resolve().parents[1]
PROMTOOL = ROOT / ".tools" / "bin" / "promtool"
DASHBOARD = ROOT / "deploy" / "grafana" / "runservice-dashboard.json"
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "deployment.yaml"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- scraping -----------------------------------------------------------------------------------


async def scrape(url: str) -> str:
    """The endpoint's text, fetched in a thread: an in-process server reads its gauges on
    this test's event loop, which must stay free meanwhile."""

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
            return text

    return await asyncio.to_thread(get)


def parse(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name{labels}`; fails naming what the scrape has of `name` if absent."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        present = [dict(k[1]) for k in samples if k[0] == name]
        raise AssertionError(f"no sample {name}{labels}; the scrape has {present}")
    return samples[key]


def total(samples: Samples, name: str) -> float:
    """The sum of `name` over all its labels."""
    return sum(v for (n, _), v in samples.items() if n == name)


async def scrape_until(
    url: str, ready: Callable[[Samples], bool], *, limit: float = 10.0
) -> Samples:
    """A scrape of which `ready` holds (asked again until it does, for up to `limit` s)."""

    async def attempt() -> Samples | None:
        samples = parse(await scrape(url))
        with contextlib.suppress(AssertionError):
            if ready(samples):
                return samples
        return None

    found: Samples = await wait_for(attempt, limit=limit, interval=0.05)
    return found


def metrics_url(server: Harness) -> str:
    endpoint = server.app.metrics_server
    assert endpoint is not None
    return endpoint.url


def promtool() -> str:
    found = str(PROMTOOL) if PROMTOOL.exists() else shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed: `make test` installs it (make promtool)")
        pytest.skip("promtool is not installed (make promtool)")
    return found


async def check_with_promtool(text: str) -> None:
    """`promtool check metrics` takes `text` without a word (a warning is a failure)."""
    proc = await asyncio.create_subprocess_exec(
        promtool(),
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 60)
    assert proc.returncode == 0, out.decode()
    assert not out.strip(), out.decode()


# -- the scripted workload ------------------------------------------------------------------------

TICKS = (5, 10, 20)
"""Ticker runs that succeed; each log: RUNNING, its ticks, SUCCEEDED."""
FAIL_AT = 2
"""A ticker run that fails after its second tick; its log: RUNNING, 2 ticks, FAILED."""
GATED_BEFORE = 2
"""A gated run stopped while it waits; its log: RUNNING, 2 steps, the stop request, its
cleanup, STOPPED."""
EVENTS = sum(n + 2 for n in TICKS) + (FAIL_AT + 2) + (GATED_BEFORE + 4)
MISSING_RUN = "0190a0a0-0000-7000-8000-000000000000"


async def workload(server: Harness) -> list[list[run_pb2.RunEvent]]:
    """Runs the workload; returns each run's whole log, read with Subscribe."""
    alice = server.caller("alice")
    runs = [await start(alice, "ticker", count=n) for n in TICKS]
    runs.append(await start(alice, "ticker", count=5, fail_at=FAIL_AT))
    gated = await start(alice, "gated", gate="metrics", before=GATED_BEFORE)
    runs.append(gated)
    # Its RUNNING event and its steps, then it waits: a Subscribe the client cancels.
    waiting = [e async for e in _events_until(alice, gated.run_id, GATED_BEFORE + 1)]
    assert [e.seq for e in waiting] == [1, 2, 3]
    await alice.StopRun(pb.StopRunRequest(run_id=gated.run_id, reason="enough"))
    logs = [await read_all(alice, run.run_id) for run in runs]
    for refused in (server.raw("not-a-token"), server.caller(None)):
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await refused.GetRun(pb.GetRunRequest(run_id=gated.run_id))
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await alice.GetRun(pb.GetRunRequest(run_id=MISSING_RUN))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    return logs


async def _events_until(caller: Any, run_id: str, last: int) -> AsyncIterator[run_pb2.RunEvent]:
    call = caller.Subscribe(pb.SubscribeRequest(run_id=run_id))
    async for response in call:
        for event in response.events:
            yield event
        if response.events[-1].seq >= last:
            break
    call.cancel()


def _cancelled_stream_counted(s: Samples) -> bool:
    """The server counts a stream its client cancelled once it notices, a moment later."""
    return value(s, "runservice_rpcs_total", method="Subscribe", code="CANCELLED") == 1


async def test_a_scrape_after_a_scripted_workload_shows_the_exact_counts(
    make_server: Callable[..., Awaitable[Harness]],
) -> None:
    """Three ticker runs that succeed, one that fails, a gated one stopped, two calls with
    bad credentials and one for a missing run: the scrape counts each run started (by
    agent), each finished (by agent and state), every event of the logs (lifecycle events
    too), each call (by method and code) and each refusal (by reason); nothing is active."""
    server = await make_server(metrics_listen="127.0.0.1:0")
    logs = await workload(server)
    assert sorted(len(log) for log in logs) == sorted(
        [n + 2 for n in TICKS] + [FAIL_AT + 2, GATED_BEFORE + 4]
    )
    assert sum(len(log) for log in logs) == EVENTS == 51

    s = await scrape_until(metrics_url(server), _cancelled_stream_counted)
    assert value(s, "runservice_runs_started_total", agent="ticker") == 4
    assert value(s, "runservice_runs_started_total", agent="gated") == 1
    finished = "runservice_runs_finished_total"
    assert value(s, finished, agent="ticker", state="SUCCEEDED") == 3
    assert value(s, finished, agent="ticker", state="FAILED") == 1
    assert value(s, finished, agent="gated", state="STOPPED") == 1
    assert total(s, finished) == 5
    assert value(s, "runservice_events_committed_total") == 51
    assert value(s, "runservice_commit_batch_events_sum") == 51
    commits = value(s, "runservice_commit_batch_events_count")
    assert 1 <= commits == value(s, "runservice_commit_duration_seconds_count")
    rpcs = "runservice_rpcs_total"
    assert value(s, rpcs, method="StartRun", code="OK") == 5
    assert value(s, rpcs, method="StopRun", code="OK") == 1
    assert value(s, rpcs, method="Subscribe", code="OK") == 5
    assert value(s, rpcs, method="Subscribe", code="CANCELLED") == 1
    assert value(s, rpcs, method="GetRun", code="UNAUTHENTICATED") == 2
    assert value(s, rpcs, method="GetRun", code="NOT_FOUND") == 1
    assert total(s, rpcs) == 15
    assert value(s, "runservice_rpc_duration_seconds_count", method="StartRun") == 5
    assert value(s, "runservice_stream_duration_seconds_count", method="Subscribe") == 6
    assert value(s, "runservice_auth_refusals_total", reason="CREDENTIALS_INVALID") == 1
    assert value(s, "runservice_auth_refusals_total", reason="CREDENTIALS_MISSING") == 1
    assert total(s, "runservice_orphaned_runs_interrupted_total") == 0
    assert total(s, "runservice_store_retries_total") == 0
    assert total(s, "runservice_store_errors_total") == 0
    gauges = {spec.name: value(s, spec.name) for spec in GAUGES}
    assert gauges == {
        "runservice_runs_active": 0,
        "runservice_runs_queued": 0,
        "runservice_runs_in_memory": 5,
        "runservice_subscriptions_open": 0,
        "runservice_subscriber_lag_events": 0,
        "runservice_subscriber_lag_max_events": 0,
        "runservice_watches_open": 0,
        "runservice_writer_pending_events": 0,
        "runservice_store_healthy": 1,
        "runservice_draining": 0,
    }
    assert value(s, "process_resident_memory_bytes") > 0
    labels = {v for _, pairs in s for _, v in pairs}
    assert not any(re.fullmatch(r"[0-9a-f-]{36}", v) for v in labels), labels
    assert not {"alice", "bob", "root"} & labels


async def test_promtool_check_metrics_passes_on_a_scrape(
    make_server: Callable[..., Awaitable[Harness]],
) -> None:
    """`promtool check metrics` finds nothing to say about a scrape taken after the
    workload, every labelled series present."""
    server = await make_server(metrics_listen="127.0.0.1:0")
    await workload(server)
    text = await scrape(metrics_url(server))
    assert "runservice_runs_finished_total{" in text
    await check_with_promtool(text)


async def test_gauges_follow_live_runs_and_streams(
    make_server: Callable[..., Awaitable[Harness]],
) -> None:
    """While a gated run waits with a subscriber on it, the scrape shows one active run and
    one open subscription; once the run ends, none."""
    server = await make_server(metrics_listen="127.0.0.1:0")
    alice = server.caller("alice")
    run = await start(alice, "gated", gate="gauges")
    call = alice.Subscribe(pb.SubscribeRequest(run_id=run.run_id))
    url = metrics_url(server)
    s = await scrape_until(url, lambda s: value(s, "runservice_subscriptions_open") == 1)
    assert value(s, "runservice_runs_active") == 1
    gate("gauges").set()
    assert [e async for r in call for e in r.events][-1].state == run_pb2.RUN_STATE_SUCCEEDED
    await scrape_until(
        url,
        lambda s: (
            value(s, "runservice_runs_active") == 0
            and value(s, "runservice_subscriptions_open") == 0
        ),
    )


# -- the option -----------------------------------------------------------------------------------


async def test_metrics_are_off_by_default_and_nothing_else_listens(tmp_path: Path) -> None:
    """Without --metrics-listen the server listens on its gRPC port alone and logs no
    metrics address."""
    assert config.Settings().metrics_listen == ""
    async with running_server(tmp_path / "data") as server:
        process = psutil.Process(server.pid)
        listening = {
            c.laddr.port for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN
        }
        assert listening == {server.port}
        assert "metrics on" not in server.log_text()


def test_the_option_is_a_flag_a_variable_and_a_file_key(tmp_path: Path) -> None:
    """--metrics-listen, RUNSERVICE_METRICS_LISTEN and the file key metrics-listen all set it,
    in that order of precedence."""
    parser = _parser()
    path = tmp_path / "runservice.toml"
    path.write_text('metrics-listen = "0.0.0.0:9100"\n')
    from_file = parser.parse_args(["serve", "--config", str(path)])
    assert config.settings_from_args(from_file, {}).metrics_listen == "0.0.0.0:9100"
    env = {"RUNSERVICE_METRICS_LISTEN": "127.0.0.1:9101"}
    assert config.settings_from_args(from_file, env).metrics_listen == "127.0.0.1:9101"
    flag = parser.parse_args(["serve", "--config", str(path), "--metrics-listen", "[::1]:9102"])
    assert config.settings_from_args(flag, env).metrics_listen == "[::1]:9102"


async def test_a_server_logs_its_metrics_address_and_serves_it(tmp_path: Path) -> None:
    """A process server with --metrics-listen logs where its metrics are and serves them
    there, with its gauges."""
    port = free_port()
    args = ["--metrics-listen", f"127.0.0.1:{port}"]
    async with running_server(tmp_path / "data", args=args) as server:
        assert f"metrics on http://127.0.0.1:{port}/metrics" in server.log_text()
        s = parse(await scrape(f"http://127.0.0.1:{port}/metrics"))
        assert value(s, "runservice_store_healthy") == 1


async def test_a_metrics_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    """A --metrics-listen port another process holds stops the start with a line naming it,
    the database closed and its lock let go; an address that is not HOST:PORT is refused
    as such."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = config.Settings(listen="127.0.0.1:0", data_dir=tmp_path, metrics_listen=address)
        with pytest.raises(ListenError, match=f"cannot serve metrics on {address}"):
            await build(settings)
    app = await build(dataclasses.replace(settings, metrics_listen="127.0.0.1:0"))
    await app.stop()
    with pytest.raises(ConfigError, match="--metrics-listen must be HOST:PORT"):
        await build(dataclasses.replace(settings, metrics_listen="9090"))


# -- --workers ------------------------------------------------------------------------------------


async def test_one_endpoint_sums_the_workers(tmp_path: Path, postgres: PgServer) -> None:
    """With --workers 2, runs started over many connections (so through both workers) are
    counted once each in the parent's one endpoint; a killed worker's counts stay and its
    live gauges go; the workers themselves listen on no metrics port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    extra = ["--metrics-listen", f"127.0.0.1:{port}"]
    async with serving_workers(tmp_path, postgres, extra) as w:
        async with connections(w.server.addr, 12) as stubs:
            runs = await asyncio.gather(*(start_ticker(stub, w.md, 3, 0.0) for stub in stubs))
            logs = await asyncio.gather(*(complete_log(stubs[0], w.md, r) for r in runs))
        executors = w.sql("SELECT DISTINCT executor FROM runs")
        assert len(executors) == 2, "the runs did not reach both workers"
        events = sum(len(log) for log in logs)
        assert events == 12 * 5

        s = await scrape_until(
            url, lambda s: value(s, "runservice_runs_finished_total", **SUCCEEDED) == 12
        )
        assert value(s, "runservice_runs_started_total", agent="ticker") == 12
        assert value(s, "runservice_events_committed_total") == events
        assert value(s, "runservice_rpcs_total", method="StartRun", code="OK") == 12
        s = await scrape_until(url, lambda s: value(s, "runservice_runs_active") == 0)
        assert value(s, "runservice_store_healthy") == 1
        await check_with_promtool(await scrape(url))
        for index in range(2):
            ports = {
                c.laddr.port
                for c in psutil.Process(w.pid(index)).net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            }
            assert port not in ports

        killed = w.pid(0)
        live = w.server.data_dir / "metrics" / f"gauge_livesum_{killed}.db"
        assert live.exists()
        os.kill(killed, signal.SIGKILL)
        await wait_for(lambda: not live.exists(), message="the dead worker's gauges stayed")
        s = parse(await scrape(url))
        assert value(s, "runservice_runs_started_total", agent="ticker") == 12


SUCCEEDED = {"agent": "ticker", "state": "SUCCEEDED"}


# -- replicas -------------------------------------------------------------------------------------


async def test_replicas_count_renewals_takeovers_and_lost_leases(
    tmp_path: Path, postgres: PgServer
) -> None:
    """Two replicas on one database, each with its endpoint: they renew their leases; A,
    paused past its lease, has its runs interrupted by B (one takeover, each run an
    orphan ended by B's sweep), and once resumed counts its lease as lost."""
    db = postgres.create_database()
    tokens = tmp_path / "tokens.toml"
    md = bearer(add_token(tokens, "alice", []))
    args = ["--db", postgres.url(db), "--tokens-file", str(tokens), "--lease-ttl", "2s"]
    ports = [free_port(), free_port()]
    try:
        async with contextlib.AsyncExitStack() as stack:
            a, _b = [
                await stack.enter_async_context(
                    running_server(
                        tmp_path / f"replica-{i}",
                        args=[*args, "--metrics-listen", f"127.0.0.1:{ports[i]}"],
                    )
                )
                for i in range(2)
            ]
            urls = [f"http://127.0.0.1:{p}/metrics" for p in ports]
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(a.addr))
            stub = pb_grpc.RunServiceStub(channel)
            runs = [(await start_ticker(stub, md, 100_000, 0.01)) for _ in range(3)]
            await scrape_until(
                urls[0],
                lambda s: value(s, "runservice_lease_renewals_total", outcome="on_time") >= 1,
            )
            os.kill(a.pid, signal.SIGSTOP)
            try:
                s = await scrape_until(
                    urls[1],
                    lambda s: (
                        value(
                            s, "runservice_orphaned_runs_interrupted_total", cause="lease_expired"
                        )
                        == 3
                    ),
                    limit=30,
                )
            finally:
                os.kill(a.pid, signal.SIGCONT)
            assert value(s, "runservice_lease_takeovers_total") == 1
            s = await scrape_until(urls[0], lambda s: value(s, "runservice_leases_lost_total") == 1)
            assert value(s, "runservice_lease_renewals_total", outcome="lost") == 1
            for run_id in runs:
                log = await read_log(stub, md, run_id)
                assert log[-1].state == run_pb2.RUN_STATE_INTERRUPTED
            assert value(s, "runservice_runs_started_total", agent="ticker") == 3
    finally:
        postgres.drop_database(db)


class _Leases:
    """A ClusterStore whose renewals answer as scripted (then on time), with one silent
    peer whose lease has expired and under which two runs were executing."""

    def __init__(self, renewals: Sequence[bool | Exception | None]) -> None:
        self.renewals = deque(renewals)
        self.expired = ["peer"]
        self.orphans: list[Run] = []
        self.swept = asyncio.Event()

    def fence_by(self, holder: str) -> None:
        """Nothing to fence here."""

    async def begin_lease(self, replica: str, holder: str, ttl: float) -> None:
        """Takes the lease."""

    async def renew(self, holder: str, ttl: float) -> bool | None:
        answer = self.renewals.popleft() if self.renewals else True
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def end_lease(self, holder: str) -> None:
        """Gives it up."""

    async def expire_leases(self) -> list[str]:
        gone, self.expired = self.expired, []
        if gone:
            self.orphans = [_run(f"orphan-{i}") for i in range(2)]
        return gone

    async def end_orphans(
        self, holder: str, end: Callable[[Run], tuple[RunEvent, Run]], limit: int = 500
    ) -> list[Run]:
        ended, self.orphans = [end(run)[1] for run in self.orphans], []
        if ended:
            self.swept.set()
        return ended

    async def requests_for(self, holder: str) -> list[tuple[str, str, str]]:
        return []

    async def reached(self, run_ids: list[str]) -> dict[str, int]:
        return {}

    @contextlib.asynccontextmanager
    async def listening(self, on_notice: Any, on_lost: Any) -> AsyncIterator[None]:
        yield


def _run(run_id: str) -> Run:
    return Run(run_id, "alice", "ticker", RunState.RUNNING, datetime.now(UTC), last_seq=4)


async def test_the_lease_loop_counts_each_renewal_outcome() -> None:
    """A replica whose renewals come on time, late, lost (a peer ended its lease) and
    failed counts each; its sweep ends the expired peer lease (a takeover) and that
    peer's two runs (orphans, with their terminal events)."""
    leases = _Leases([True, False, None, StoreUnavailableError("renew", "down"), StoreError("bad")])
    metrics = Metrics()
    clock = FakeClock()
    replica = Replica(
        leases,  # type: ignore[arg-type]  # the subset of ClusterStore the lease loop uses
        "me",
        0.03,
        end_orphan=lambda run: orphan_end(run, clock),
        on_notice=lambda _: None,
        on_requests=lambda _: None,
        on_fenced=lambda _: None,
        on_swept=lambda _: None,
        metrics=metrics,
    )
    await replica.start()
    try:
        await asyncio.wait_for(leases.swept.wait(), 10)
    finally:
        await replica.close()
    s = parse(_exposition(metrics))
    renewals = "runservice_lease_renewals_total"
    assert value(s, renewals, outcome="late") == 1
    assert value(s, renewals, outcome="lost") == 1
    assert value(s, renewals, outcome="failed") == 2
    assert value(s, renewals, outcome="on_time") >= 2
    assert value(s, "runservice_leases_lost_total") == 1
    assert value(s, "runservice_lease_takeovers_total") == 1
    assert value(s, "runservice_orphaned_runs_interrupted_total", cause="lease_expired") == 2
    assert value(s, "runservice_events_committed_total") == 2


class _Store:
    """A store whose next commits fail or fence as scripted, then succeed."""

    def __init__(self, outcomes: Sequence[Exception | frozenset[str] | None]) -> None:
        self.outcomes = deque(outcomes)

    async def commit(
        self, new_runs: Any, events: Any, updated_runs: Any, beside: Any = ()
    ) -> frozenset[str] | None:
        outcome = self.outcomes.popleft() if self.outcomes else None
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def probe(self) -> None:
        """Always fine."""


async def test_the_writer_counts_retries_refusals_and_fenced_writes() -> None:
    """Commits retried while the store is locked or down, a run's data refused for good
    and a run fenced are each counted; only committed transactions are timed."""
    store = _Store(
        [
            StoreUnavailableError("commit", "locked", contended=True),
            StoreUnavailableError("commit", "down"),
            None,
            StoreError("refused"),
            frozenset({"fenced"}),
        ]
    )
    metrics = Metrics()
    writer = Writer(store, lambda run, created: None, lambda e: b"", metrics=metrics)  # type: ignore[arg-type]
    writer.start()
    try:
        await writer.commit_run(new=_run("kept"))
        with pytest.raises(StoreError):
            await writer.commit_run(new=_run("refused"))
        with pytest.raises(DatabaseUnavailableError):
            await writer.commit_run(new=_run("fenced"))
    finally:
        await writer.close(1.0)
    s = parse(_exposition(metrics))
    assert value(s, "runservice_store_retries_total", kind="locked") == 1
    assert value(s, "runservice_store_retries_total", kind="unavailable") == 1
    assert value(s, "runservice_store_errors_total", kind="refused") == 1
    assert value(s, "runservice_fenced_writes_total") == 1
    assert value(s, "runservice_commit_duration_seconds_count") == 2


def _exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


# -- what is built on the metrics -----------------------------------------------------------------


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def exposed_names(text: str) -> set[str]:
    """The names of every series a scrape has or announces (a labelled metric with no
    series yet has only its HELP and TYPE lines)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def _dashboard_expressions() -> Iterator[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            yield target["expr"]


PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "by", "without", "histogram_quantile", "max", "min",
    "avg", "le", "on", "ignoring", "or", "and", "unless", "bool", "clamp_min", "topk",
    "count", "delta", "deriv", "offset", "group_left", "group_right", "vector", "abs",
}  # fmt: skip


async def test_the_dashboard_names_only_metrics_the_server_exposes(
    make_server: Callable[..., Awaitable[Harness]],
) -> None:
    """Every PromQL expression of the Grafana dashboard names metrics a real scrape has, so
    the dashboard cannot drift from the code; its datasource is a template variable."""
    server = await make_server(metrics_listen="127.0.0.1:0")
    await workload(server)
    scraped = exposed_names(await scrape(metrics_url(server)))
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    expressions = list(_dashboard_expressions())
    assert len(expressions) >= 12
    named: set[str] = set()
    for expr in expressions:
        without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)
        words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels)) - PROMQL_WORDS
        label_names = set(re.findall(r"(?:by|without)\s*\(([^)]*)\)", without_labels))
        words -= {n.strip() for group in label_names for n in group.split(",")}
        unknown = {w for w in words if w.startswith("runservice_") and w not in scraped}
        assert not unknown, f"{expr!r} names {unknown}, which the server does not expose"
        assert all(w.startswith(("runservice_", "process_")) for w in words), (expr, words)
        named |= words
    for panel in dashboard["panels"]:
        assert panel.get("datasource", {}).get("uid") in (None, "${DS_PROMETHEUS}"), panel
    instance = dashboard["templating"]["list"][1]["definition"]
    assert re.fullmatch(r"label_values\((\w+), instance\)", instance)
    assert instance.split("(")[1].split(",")[0] in scraped
    assert {"runservice_runs_finished_total", "runservice_lease_takeovers_total"} <= named


def test_the_kubernetes_pods_are_annotated_for_scraping_on_the_metrics_port() -> None:
    """The pod template asks Prometheus to scrape the port its server serves metrics on."""
    text = DEPLOYMENT.read_text()
    assert re.search(r'prometheus\.io/scrape: "true"', text)
    annotated = re.search(r'prometheus\.io/port: "(\d+)"', text)
    assert annotated is not None
    assert re.search(r"prometheus\.io/path: /metrics", text)
    listen = re.search(r"name: RUNSERVICE_METRICS_LISTEN\s+value: ([\d.]+):(\d+)", text)
    assert listen is not None and listen.group(1) == "0.0.0.0"
    port = re.search(r"- name: metrics\s+containerPort: (\d+)", text)
    assert port is not None
    assert annotated.group(1) == listen.group(2) == port.group(1)


OPERATIONS = ROOT / "docs" / "operations.md"


def _section(heading: str) -> str:
    return OPERATIONS.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


async def test_the_alerting_rules_of_the_docs_pass_promtool_and_name_real_metrics(
    make_server: Callable[..., Awaitable[Harness]], tmp_path: Path
) -> None:
    """The rules file in docs/operations.md (Alerting) passes `promtool check rules`, and
    its expressions name only metrics the server exposes (and Prometheus's own `up`)."""
    rules = re.findall(r"```yaml\n(.*?)```", _section("Alerting"), re.DOTALL)[0]
    path = tmp_path / "runservice.rules.yaml"
    path.write_text(rules)
    proc = await asyncio.create_subprocess_exec(
        promtool(),
        "check",
        "rules",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    assert "SUCCESS" in out.decode() and "WARNING" not in out.decode(), out.decode()

    server = await make_server(metrics_listen="127.0.0.1:0")
    scraped = exposed_names(await scrape(metrics_url(server)))
    named = set(re.findall(r"\b(runservice_\w+)", rules))
    assert len(named) >= 6
    assert named <= scraped, named - scraped


async def test_the_docs_table_lists_every_metric_the_server_exposes(
    make_server: Callable[..., Awaitable[Harness]],
) -> None:
    """docs/operations.md (Metrics) has a row for each runservice_ metric of a scrape, with
    its type, and none for a metric the server does not expose."""
    server = await make_server(metrics_listen="127.0.0.1:0")
    text = await scrape(metrics_url(server))
    families = {
        (f.name + "_total" if f.type == "counter" else f.name): f.type
        for f in text_string_to_metric_families(text)
        if f.name.startswith("runservice_")
    }
    rows = dict(re.findall(r"^\| `(runservice_\w+)` \| (\w+) \|", _section("Metrics"), re.M))
    assert rows == families
