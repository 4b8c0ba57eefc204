"""Prometheus metrics: every metric the server exposes, defined here, and their endpoint.

Each server has a `Metrics` of its own, with a registry of its own (never the library's
global one), so servers started in one process (tests) count apart. The parts that count
are handed it and call one method where a thing happens: the writer (commits, retries,
store errors, fenced writes), the manager (runs started and finished), the replica (the
lease), the API wrapper (RPCs, authentication refusals), the HTTP edge (requests by route
and status). Gauges of the present (active runs, open subscriptions and their lag, the
store's health...) are read from `RunManager.stats()`.

One process (`--metrics-listen` without `--workers`): the endpoint is prometheus_client's
HTTP server, in a thread; at each scrape the gauges are read on the event loop (the
runtime is not thread-safe), so they are never stale.

`--workers N`: prometheus_client's multiprocess mode. The parent empties a directory and
hands it to its workers in PROMETHEUS_MULTIPROC_DIR; each worker's counters and
histograms live in files there, and each worker sets its gauges every
GAUGE_REFRESH_S. The parent alone listens, and sums what the files say (live gauges: only
of the workers still running; counters: of every life of every worker).

Labels are bounded: agent names (registered at startup), run states, RPC method names,
HTTP route names, status codes, error reasons and fixed kinds. Never a run id, a path or a
user.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from runservice.config import host_port
from runservice.domain.model import RunState
from runservice.domain.ports import (
    LeaseRenewal,
    OrphanCause,
    StoreErrorKind,
    StoreRetryKind,
)
from runservice.domain.webhooks import AttemptOutcome

if TYPE_CHECKING:
    from runservice.runtime.manager import ServerStats

logger = logging.getLogger(__name__)

# A `<name>_created` gauge beside each counter and histogram (the time it was made) serves
# OpenMetrics' created timestamps; in the text format Prometheus scrapes here it would
# only double the series. The switch is the library's, process-wide.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client's multiprocess mode keeps each process's figures (read by the
library when it is imported, so it is set in a worker's environment before it starts)."""
GAUGE_REFRESH_S = 1.0
"""How often a worker of --workers writes its gauges for the parent to serve."""
SNAPSHOT_TIMEOUT_S = 5.0
"""How long a scrape waits for the event loop to read the gauges; past it they are left out."""

COMMIT_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
STREAM_SECONDS_BUCKETS = (0.1, 1, 10, 60, 300, 900, 1800, 3600, 7200, 14400)
HTTP_SECONDS_BUCKETS = (*RPC_SECONDS_BUCKETS, 30, 60)  # long-polls wait up to their timeout

AUTH_REASONS = ("CREDENTIALS_MISSING", "CREDENTIALS_INVALID", "TOKEN_EXPIRED")

StatsReader = Callable[[], "ServerStats"]


@dataclass(frozen=True)
class _GaugeSpec:
    name: str
    help: str
    read: Callable[[ServerStats], float]
    mode: Literal["livesum", "livemax", "livemin"] = "livesum"
    """How the parent of --workers combines its live workers' values."""


GAUGES: tuple[_GaugeSpec, ...] = (
    _GaugeSpec(
        "runservice_runs_active", "Runs whose agent runs in this server.", lambda s: s.active_runs
    ),
    _GaugeSpec(
        "runservice_runs_queued",
        "Runs admitted here that wait for their thread's turn.",
        lambda s: s.queued_runs,
    ),
    _GaugeSpec(
        "runservice_runs_in_memory",
        "Runs held in memory, finished ones not yet evicted included.",
        lambda s: s.runs_in_memory,
    ),
    _GaugeSpec(
        "runservice_subscriptions_open", "Subscribe streams open.", lambda s: s.subscriptions
    ),
    _GaugeSpec(
        "runservice_subscriber_lag_events",
        "Events committed that open subscriptions have not been sent yet, summed.",
        lambda s: s.subscriber_lag_events,
    ),
    _GaugeSpec(
        "runservice_subscriber_lag_max_events",
        "Events committed that the most behind open subscription has not been sent yet.",
        lambda s: s.max_subscriber_lag_events,
        "livemax",
    ),
    _GaugeSpec("runservice_watches_open", "WatchRuns streams open.", lambda s: s.watches),
    _GaugeSpec(
        "runservice_writer_pending_events",
        "Events waiting for the writer to commit them.",
        lambda s: s.pending_events,
    ),
    _GaugeSpec(
        "runservice_store_healthy",
        "1 while the store takes writes, 0 while it does not (new runs are refused).",
        lambda s: 0 if s.store_problem else 1,
        "livemin",
    ),
    _GaugeSpec(
        "runservice_draining",
        "1 once shutdown has begun (runs drain, new ones are refused).",
        lambda s: 1 if s.draining else 0,
        "livemax",
    ),
)


class Metrics:
    """Every metric of one server, and the one call per thing counted (the runtime's
    RunMetrics, and the API's calls and refusals)."""

    def __init__(self, *, multiprocess: bool = False) -> None:
        """`multiprocess`: a worker of --workers (its figures go to the files its parent
        serves, gauges through `refresh`); else everything is read from `registry`."""
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry()
        r = self.registry
        self._runs_started = Counter(
            "runservice_runs_started", "Runs created, by agent.", ["agent"], registry=r
        )
        self._runs_finished = Counter(
            "runservice_runs_finished",
            "Runs this server executed that reached a terminal state, by agent and state.",
            ["agent", "state"],
            registry=r,
        )
        self._orphans = Counter(
            "runservice_orphaned_runs_interrupted",
            "Runs this server ended INTERRUPTED because the process executing them was gone: "
            "found as it started (cause=startup) or by a sweep after their replica's lease "
            "expired (cause=lease_expired).",
            ["cause"],
            registry=r,
        )
        self._events = Counter(
            "runservice_events_committed",
            "Events committed to run logs, lifecycle events included.",
            registry=r,
        )
        self._batch = Histogram(
            "runservice_commit_batch_events",
            "Events in each transaction of the group-commit writer.",
            buckets=COMMIT_BATCH_BUCKETS,
            registry=r,
        )
        self._commit_seconds = Histogram(
            "runservice_commit_duration_seconds",
            "Time the store took to commit one transaction of the writer (retries excluded).",
            buckets=COMMIT_SECONDS_BUCKETS,
            registry=r,
        )
        self._store_retries = Counter(
            "runservice_store_retries",
            "Commits retried because the store took no writes: held by another process's "
            "lock (kind=locked) or unreachable, full or failing (kind=unavailable).",
            ["kind"],
            registry=r,
        )
        self._store_errors = Counter(
            "runservice_store_errors",
            "Work the store did not take: a run's data refused for good (kind=refused) or "
            "what shutdown left uncommitted (kind=abandoned).",
            ["kind"],
            registry=r,
        )
        self._fenced = Counter(
            "runservice_fenced_writes",
            "Runs whose commit the database refused because this replica's lease on them "
            "is gone (another replica ended them).",
            registry=r,
        )
        self._renewals = Counter(
            "runservice_lease_renewals",
            "Lease renewals of this replica, by outcome: on_time, late, lost (a peer had "
            "ended the lease) or failed (the database did not answer).",
            ["outcome"],
            registry=r,
        )
        self._takeovers = Counter(
            "runservice_lease_takeovers",
            "Expired leases of silent replicas that this replica ended (their runs are "
            "interrupted).",
            registry=r,
        )
        self._leases_lost = Counter(
            "runservice_leases_lost",
            "Times another replica ended this replica's lease (its runs were interrupted).",
            registry=r,
        )
        self._auth_refusals = Counter(
            "runservice_auth_refusals",
            "Calls refused at authentication, by reason (CREDENTIALS_MISSING, "
            "CREDENTIALS_INVALID, TOKEN_EXPIRED).",
            ["reason"],
            registry=r,
        )
        self._rpcs = Counter(
            "runservice_rpcs",
            "RunService calls handled, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self._rpc_seconds = Histogram(
            "runservice_rpc_duration_seconds",
            "Time to handle a unary RunService call, by method.",
            ["method"],
            buckets=RPC_SECONDS_BUCKETS,
            registry=r,
        )
        self._stream_seconds = Histogram(
            "runservice_stream_duration_seconds",
            "How long a server-streaming RunService call (Subscribe, WatchRuns) lasted.",
            ["method"],
            buckets=STREAM_SECONDS_BUCKETS,
            registry=r,
        )
        self._http_requests = Counter(
            "runservice_http_requests",
            "Requests the HTTP edge (--http-listen) answered, by route and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self._http_seconds = Histogram(
            "runservice_http_request_duration_seconds",
            "Time to answer an HTTP request (long-polls included, SSE streams not), by route.",
            ["route"],
            buckets=HTTP_SECONDS_BUCKETS,
            registry=r,
        )
        self._http_stream_seconds = Histogram(
            "runservice_http_stream_duration_seconds",
            "How long an SSE stream of the HTTP edge (a run's events, WatchRuns) lasted.",
            ["route"],
            buckets=STREAM_SECONDS_BUCKETS,
            registry=r,
        )
        self._webhook_attempts = Counter(
            "runservice_webhook_attempts",
            "Webhook delivery attempts, by outcome: delivered (answered 2xx), retrying (failed; "
            "another attempt is scheduled) or gave_up (failed after --webhook-max-age).",
            ["outcome"],
            registry=r,
        )
        self._start_at_zero()
        self._gauges: list[tuple[_GaugeSpec, Gauge]] = []
        if multiprocess:  # written to the files the parent reads, so not registered
            self._gauges = [
                (spec, Gauge(spec.name, spec.help, multiprocess_mode=spec.mode, registry=None))
                for spec in GAUGES
            ]
        else:
            ProcessCollector(registry=r)

    def _start_at_zero(self) -> None:
        """Shows the series of fixed labels before anything happens: a series that appears
        only with its first event hides that first increase from rate() and alerts."""
        for kind in get_args(StoreRetryKind):
            self._store_retries.labels(kind)
        for kind in get_args(StoreErrorKind):
            self._store_errors.labels(kind)
        for cause in get_args(OrphanCause):
            self._orphans.labels(cause)
        for reason in AUTH_REASONS:
            self._auth_refusals.labels(reason)
        for outcome in get_args(AttemptOutcome):
            self._webhook_attempts.labels(outcome)

    def expect_agents(self, agents: Iterable[str]) -> None:
        """Shows the runs started and finished of each agent the server runs from zero."""
        for agent in agents:
            self._runs_started.labels(agent)
            for state in RunState:
                if state.terminal:
                    self._runs_finished.labels(agent, state.value)

    # -- what is counted --------------------------------------------------------------------

    def run_started(self, agent: str) -> None:
        """A run's row was committed (a StartRun that created a run)."""
        self._runs_started.labels(agent).inc()

    def run_finished(self, agent: str, state: str) -> None:
        """A run executed here committed its terminal state."""
        self._runs_finished.labels(agent, state).inc()

    def orphans_interrupted(self, cause: OrphanCause, runs: int) -> None:
        """`runs` orphaned runs were ended INTERRUPTED, each with its terminal event."""
        if runs:
            self._orphans.labels(cause).inc(runs)
            self._events.inc(runs)

    def events_committed(self, events: int) -> None:
        """Events committed outside the writer (a start decided in the database)."""
        self._events.inc(events)

    def committed(self, events: int, seconds: float) -> None:
        """The writer committed a transaction of `events` events in `seconds`."""
        self._events.inc(events)
        self._batch.observe(events)
        self._commit_seconds.observe(seconds)

    def store_retry(self, kind: StoreRetryKind) -> None:
        """A commit failed as unavailable and will be retried."""
        self._store_retries.labels(kind).inc()

    def store_error(self, kind: StoreErrorKind) -> None:
        """Work the store did not take was given up."""
        self._store_errors.labels(kind).inc()

    def fenced(self, runs: int) -> None:
        """A commit left out `runs` runs whose lease is gone."""
        self._fenced.inc(runs)

    def lease_renewal(self, outcome: LeaseRenewal) -> None:
        """This replica tried to renew its lease."""
        self._renewals.labels(outcome).inc()

    def lease_lost(self) -> None:
        """Another replica ended this replica's lease."""
        self._leases_lost.inc()

    def leases_taken_over(self, leases: int) -> None:
        """This replica ended `leases` expired leases of silent peers."""
        self._takeovers.inc(leases)

    def webhook_attempt(self, outcome: AttemptOutcome) -> None:
        """A webhook delivery attempt was made and recorded with `outcome`."""
        self._webhook_attempts.labels(outcome).inc()

    def auth_refused(self, reason: str) -> None:
        """A call was refused at authentication; `reason` is its ErrorInfo reason."""
        self._auth_refusals.labels(reason).inc()

    def rpc_handled(self, method: str, code: str, seconds: float, *, streaming: bool) -> None:
        """A RunService call ended with status `code` after `seconds`."""
        self._rpcs.labels(method, code).inc()
        duration = self._stream_seconds if streaming else self._rpc_seconds
        duration.labels(method).observe(seconds)

    def http_handled(self, route: str, status: int, seconds: float, *, streaming: bool) -> None:
        """The HTTP edge answered a request of `route` (a route's name, never a path) with
        `status`, and finished with it after `seconds`."""
        self._http_requests.labels(route, str(status)).inc()
        duration = self._http_stream_seconds if streaming else self._http_seconds
        duration.labels(route).observe(seconds)

    # -- the gauges -------------------------------------------------------------------------

    def read_gauges_from(self, stats: StatsReader, loop: asyncio.AbstractEventLoop) -> None:
        """One process: the gauges are `stats()` as read on `loop` at each scrape."""
        if not self.multiprocess:
            self.registry.register(_StatsCollector(stats, loop))

    def refresh(self, stats: ServerStats) -> None:
        """A worker of --workers: sets its gauges from `stats`."""
        for spec, gauge in self._gauges:
            gauge.set(spec.read(stats))

    async def refresh_every(self, stats: StatsReader, interval: float = GAUGE_REFRESH_S) -> None:
        """A worker of --workers: sets its gauges now and every `interval` seconds."""
        while True:
            self.refresh(stats())
            await asyncio.sleep(interval)


class _StatsCollector(Collector):
    """The gauges of one process, read on its event loop at each scrape (the scrape runs in
    the HTTP server's thread, and the runtime's state belongs to the loop's)."""

    def __init__(self, stats: StatsReader, loop: asyncio.AbstractEventLoop) -> None:
        self._stats = stats
        self._loop = loop

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(spec.name, spec.help) for spec in GAUGES]

    def collect(self) -> Iterable[Metric]:
        stats = self._snapshot()
        if stats is None:
            return []
        return [GaugeMetricFamily(spec.name, spec.help, spec.read(stats)) for spec in GAUGES]

    def _snapshot(self) -> ServerStats | None:
        taken: concurrent.futures.Future[ServerStats] = concurrent.futures.Future()

        def take() -> None:
            try:
                taken.set_result(self._stats())
            except Exception as exc:
                taken.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(take)
            return taken.result(SNAPSHOT_TIMEOUT_S)
        except RuntimeError:  # the loop is closed: the server has stopped
            return None
        except concurrent.futures.TimeoutError:
            logger.warning(
                "metrics: the event loop did not answer within %gs; gauges left out of this scrape",
                SNAPSHOT_TIMEOUT_S,
            )
            return None


# -- the endpoint -----------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a --metrics-listen value; config.AddressError if it is not HOST:PORT."""
    return host_port(address, "--metrics-listen", "0.0.0.0:9090")


class MetricsServer:
    """The HTTP endpoint (`/metrics`, any path in fact) serving a registry, in a thread."""

    def __init__(self, httpd: WSGIServer, host: str) -> None:
        self._httpd = httpd
        self.host = host
        self.port: int = httpd.server_address[1]

    @property
    def url(self) -> str:
        """Where Prometheus scrapes it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @classmethod
    def start(cls, address: str, registry: CollectorRegistry) -> MetricsServer:
        """Listens on `address` (HOST:PORT); config.AddressError for a malformed one,
        OSError when it cannot be bound (in use, not an address of this machine)."""
        host, port = parse_address(address)
        httpd, _thread = start_http_server(port, host, registry)
        return cls(httpd, host)

    def stop(self) -> None:
        """Stops listening (blocks up to half a second: run it in a thread)."""
        self._httpd.shutdown()
        self._httpd.server_close()


def multiprocess_registry(path: Path) -> CollectorRegistry:
    """A registry of what every worker wrote to `path` (the parent of --workers)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]  # untyped upstream
    return registry


def prepare_multiprocess_dir(path: Path) -> None:
    """Creates `path` (mode 700) or empties it: figures of an earlier run must not count."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
    path.mkdir(mode=0o700, parents=True)


def process_gone(pid: int, path: Path) -> None:
    """Drops the live gauges of worker process `pid`, which has ended."""
    mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]  # untyped upstream


def worker_multiprocess_dir() -> Path | None:
    """The directory a parent of --workers gave this worker, if any."""
    value = os.environ.get(MULTIPROCESS_DIR_VARIABLE, "")
    return Path(value) if value else None
