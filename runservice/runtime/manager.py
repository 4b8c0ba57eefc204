"""RunManager: the use cases behind every RPC (start, get, list, stop, subscribe, delete, watch).

A facade: each use case asks the parts that hold the state. The registry holds every
live run and every task (no task is created in an RPC handler's scope, so a run outlives
the call that started it); the start gate decides idempotency, thread strategies and
caps; lifecycle writes every lifecycle state; the writer commits; a subscription reads a
run's log from memory or the store. Runs are read from memory while live and from the
store afterwards, transparently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, overload

from uuid6 import uuid7

from runservice.domain.errors import (
    AdminOnlyError,
    DatabaseUnavailableError,
    ExternalRunInputError,
    InputRequestIdReusedError,
    InvalidInputError,
    RequestIdReusedError,
    RunActiveError,
    RunEndedError,
    RunFencedError,
    RunNotFoundError,
    SeqOutOfRangeError,
    ServerDrainingError,
    StoreError,
    StoreUnavailableError,
    ThreadBusyError,
)
from runservice.domain.model import (
    INPUT_EVENT,
    AgentInfo,
    EncodedEvent,
    InputReceipt,
    MultitaskStrategy,
    PendingInput,
    Principal,
    Run,
    RunChange,
    RunEvent,
    RunFilter,
    RunState,
    Scope,
    Snapshot,
    StartRequest,
    WatchUpdate,
)
from runservice.domain.ports import (
    Clock,
    EventEncoder,
    NoMetrics,
    RunMetrics,
    RunStore,
    StreamStore,
)
from runservice.domain.replicas import StartAsk, StartFacts, StartWrite
from runservice.domain.streams import EXTERNAL_AGENT, EXTERNAL_DESCRIPTION
from runservice.runtime.agent import Agent, AgentRegistry, is_resumable, over_limit
from runservice.runtime.cluster import (
    ClusterStore,
    StartDecisions,
)
from runservice.runtime.feed import ChangeFeed
from runservice.runtime.gate import StartGate
from runservice.runtime.interaction import consume_outcome
from runservice.runtime.lifecycle import (
    LOG_GIVEN_UP,
    MAX_EVENT_BYTES,
    LiveRun,
    Phase,
    Resumed,
    Resumes,
    drive_run,
    log_fields,
    reconcile_orphans,
    running_change,
    start_now,
)
from runservice.runtime.peers import Peers
from runservice.runtime.policies import Counts, Limits, check_caps, request_fingerprint
from runservice.runtime.registry import Registry
from runservice.runtime.runlog import WINDOW_BYTES, WINDOW_EVENTS, RunLog
from runservice.runtime.snapshots import SNAPSHOT_BYTES, SNAPSHOT_EVERY, Snapshots
from runservice.runtime.streams import ExternalRuns, StreamLimits
from runservice.runtime.subscription import ReadLimits, Subscription
from runservice.runtime.subscription import settle as subscription_settle
from runservice.runtime.tracing import Context, parent_context
from runservice.runtime.writer import MAX_BATCH_EVENTS, MAX_PENDING_EVENTS, Writer

logger = logging.getLogger(__name__)

SNAPSHOT_LIMIT = 1000
SHUTDOWN_SLACK_S = 2.5
"""Beyond the drain timeout and the stop grace, what shutdown may take to flush the writer."""


@dataclass(frozen=True)
class RuntimeSettings:
    """The runtime's tunables (the server's flags set them)."""

    stop_grace: float = 5.0
    drain_timeout: float = 30.0
    memory_grace: float = 300.0
    sweep_interval: float = 1.0
    batch_max_events: int = 2000
    batch_max_bytes: int = 32 * 1024  # one SubscribeResponse: what a stalled stream holds
    page_max_events: int = 2000
    page_max_bytes: int = 256 * 1024  # one store read, kept while its reader keeps up
    read_ahead_hold: float = 0.25
    window_events: int = WINDOW_EVENTS
    window_bytes: int = WINDOW_BYTES
    writer_max_batch: int = MAX_BATCH_EVENTS
    writer_max_pending: int = MAX_PENDING_EVENTS
    limits: Limits = dataclasses.field(default_factory=Limits)
    default_timeout: float = 0.0  # 0: runs have no time limit unless they ask for one
    max_timeout: float = 0.0  # 0: no maximum
    retention: float = 7 * 86400.0  # of runs that ask for none
    max_retention: float = 90 * 86400.0  # the most a run may ask for
    max_event_bytes: int = MAX_EVENT_BYTES
    purge_interval: float = 60.0
    purge_batch: int = 500
    lease_ttl: float = 15.0  # replicas (PostgreSQL): how long a silent replica's runs stay its own
    stream_sweep_interval: float = 0.5  # how often expired external runs are deleted
    max_resumes: int = 3  # resumes of one run from its checkpoints, at most
    snapshot_every: int = SNAPSHOT_EVERY  # events between two snapshots of a run, at most
    snapshot_bytes: int = SNAPSHOT_BYTES  # bytes of events between two snapshots, at most


@dataclass(frozen=True)
class ServerStats:
    """What this server process holds and has done since it started (GetServerStats,
    and the gauges of the metrics endpoint)."""

    active_runs: int  # runs whose agent runs here
    queued_runs: int  # runs admitted here, waiting for their thread's turn
    runs_in_memory: int  # live runs, ended ones not yet evicted included
    subscriptions: int  # Subscribe streams open
    subscriber_lag_events: int  # events committed that open subscriptions have not been sent
    max_subscriber_lag_events: int  # the most behind of them
    watches: int  # WatchRuns streams open
    commits: int  # transactions the writer committed since start
    events_committed: int  # events in them
    pending_events: int  # events waiting for the writer
    draining: bool
    store_problem: str  # why the store takes no writes now; empty while it does


FIELDS_INTERVAL_S = 0.25
"""The least time between two commits of a run's live fields (progress, usage, waiting)."""


class RunManager:
    """The facade the API layer calls; every method takes the caller's principal."""

    def __init__(
        self,
        store: RunStore,
        agents: AgentRegistry,
        clock: Clock,
        encoder: EventEncoder,
        settings: RuntimeSettings | None = None,
        *,
        cluster: ClusterStore | None = None,
        replica: str = "",
        metrics: RunMetrics | None = None,
        streams: StreamStore | None = None,
        stream_limits: StreamLimits | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or NoMetrics()
        self._agents = agents
        self._clock = clock
        self._settings = settings or RuntimeSettings()
        s = self._settings
        self._read_limits = ReadLimits(
            s.batch_max_events,
            s.batch_max_bytes,
            s.page_max_events,
            s.page_max_bytes,
            s.read_ahead_hold,
        )
        self._feed = ChangeFeed()
        self._writer = Writer(
            store,
            self._on_run_committed,
            encoder,
            max_batch_events=self._settings.writer_max_batch,
            max_pending_events=self._settings.writer_max_pending,
            on_fenced=self._runs_fenced,
            metrics=self._metrics,
        )
        self._draining = False
        self._closed = asyncio.Event()
        self._gate = StartGate(s.limits, s.default_timeout, s.max_timeout, s.max_retention)
        self._registry = Registry(on_evict=self._gate.forget_request)
        # Replicas on one database: this server's lease and its view of the others' runs.
        self._peers: Peers | None = None
        self._decisions: StartDecisions | None = None
        if cluster is not None:
            self._peers = Peers(
                cluster,
                replica,
                s.lease_ttl,
                store=store,
                registry=self._registry,
                feed=self._feed,
                clock=clock,
                metrics=self._metrics,
                resumes=self.resumes(),
            )
            self._decisions = StartDecisions(self._peers.replica)
            self._peers.on_inputs = self._take_inputs_soon
            self._peers.on_resumed = self._take_over
        self._admitting: dict[str, LiveRun] = {}  # decided in the store, not yet settled
        self._subscriptions: set[Subscription] = set()  # open ones
        # Runs fed from outside (agent `external`), when the store keeps them.
        self.external: ExternalRuns | None = None
        if streams is not None:
            self.external = ExternalRuns(
                streams,
                clock,
                encoder,
                limits=stream_limits,
                publish=self._feed.publish,
                on_started=lambda run: self._metrics.run_started(run.agent),
                on_finished=lambda run: self._metrics.run_finished(run.agent, run.state.value),
                remote=self._peers,
            )

    # -- lifecycle of the manager -------------------------------------------------------

    async def start(self) -> None:
        """Reconciles runs orphaned by a previous process (with replicas: the runs no
        replica's lease covers), then starts the background tasks."""
        if self._peers is not None:
            await self._peers.start()
            assert self._decisions is not None
            self._decisions.start()
        resumed: list[Resumed] = []
        if self._peers is None:
            ended, resumed = await reconcile_orphans(self._store, self._clock, self.resumes())
            self._metrics.orphans_interrupted("startup", ended)
        self._writer.start()
        for taken in resumed:
            await self.resume(taken)
        self._registry.spawn(self._sweep_loop(), name="runservice-sweeper")
        if self.external is not None:
            self._registry.spawn(
                self.external.sweep_loop(self._settings.stream_sweep_interval),
                name="runservice-stream-expiry",
            )
        self._registry.spawn(self._purge_loop(), name="runservice-purger")

    @property
    def draining(self) -> bool:
        """True once shutdown has begun."""
        return self._draining

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stops taking runs, lets running ones finish for `drain_timeout`, interrupts the rest.

        Every run ends in a persisted terminal state, the writer flushed last; whatever
        the store does, this returns within the drain timeout + the stop grace +
        SHUTDOWN_SLACK_S. What the store has not taken by then is left unfinished, as after
        a crash, and the next start reconciles it.
        """
        if self._draining:
            await self._closed.wait()
            return
        self._draining = True
        if self.external is not None:
            self.external.close()
        loop = asyncio.get_running_loop()
        timeout = self._settings.drain_timeout if drain_timeout is None else drain_timeout
        deadline = loop.time() + timeout + self._settings.stop_grace + SHUTDOWN_SLACK_S
        await self._registry.drain(timeout, self._settings.stop_grace)
        self._feed.close()
        await self._writer.close(max(0.5, deadline - loop.time()))
        await self._registry.cancel_all()
        if self._decisions is not None:
            await self._decisions.close()
        if self._peers is not None:
            await self._peers.close()
        self._closed.set()

    async def settle(self, limit: float = 1.0) -> None:
        """After the edges stopped, before the store closes: waits for the store work
        that callers who left let finish (subscriptions' reads, external runs' writes)."""
        await subscription_settle(limit)
        if self.external is not None:
            await self.external.settle(limit)

    def on_store_health(self, listener: Callable[[str | None], None]) -> None:
        """Calls `listener` with the cause when the store stops taking writes, and with
        None when it takes them again."""
        self._writer.on_health(listener)

    def hurry(self) -> None:
        """Cuts the drain short: runs still active are interrupted now."""
        self._registry.hurry()

    def stats(self) -> ServerStats:
        """This process's figures now; cheap (one pass over the open subscriptions)."""
        active, queued = self._gate.counts()
        lags = [subscription.lag for subscription in self._subscriptions]
        writer = self._writer
        return ServerStats(
            active_runs=active,
            queued_runs=queued,
            runs_in_memory=len(self._registry),
            subscriptions=len(lags),
            subscriber_lag_events=sum(lags),
            max_subscriber_lag_events=max(lags, default=0),
            watches=self._feed.watchers,
            commits=writer.commits,
            events_committed=writer.events_committed,
            pending_events=writer.pending_events,
            draining=self._draining,
            store_problem=writer.problem or "",
        )

    # -- use cases ----------------------------------------------------------------------

    async def start_run(self, principal: Principal, request: StartRequest) -> Run:
        """Admits a run (idempotency, thread strategy, caps), commits its row, starts it.

        Returns the run PENDING; for a repeated request_id, the run the first call created.
        """
        if self._draining:
            raise ServerDrainingError()
        if self._writer.problem is not None:
            raise DatabaseUnavailableError(self._writer.problem)
        self._gate.check_retention(request)
        if request.agent == EXTERNAL_AGENT and self.external is not None:
            return await self._start_external(principal, request)
        agent = self._agents.get(request.agent)
        request = self._gate.with_timeout(request)
        fingerprint = request_fingerprint(request)
        user = principal.user
        if self._peers is not None and self._decided_in_store(request):
            return await self._start_decided_in_store(user, request, fingerprint, agent)
        if request.request_id:
            existing = await self._find_request(user, request.request_id, fingerprint)
            if existing is not None:
                return existing
        # From here to the registration there is no await: the decision is atomic.
        twin = self._gate.twin(user, request.request_id, fingerprint)
        if twin is not None:
            return await self._same_request(twin)
        predecessors = self._gate.decide(user, request)
        live = self._new_live_run(user, request, fingerprint, parent_context())
        self._gate.register(live, predecessors)
        self._registry.add(live)
        if live.predecessors:
            live.committed = self._writer.commit_run(new=live.run)
        else:
            live.committed = start_now(live, self._writer, self._clock)
        # The supervisor is spawned before this call waits for the commit: a caller that
        # gives up (a deadline, a closed connection) cancels only its wait, never the run.
        live.task = self._registry.spawn(self._supervise(live, agent), name=f"run:{live.run_id}")
        await asyncio.shield(live.committed)
        return live.run

    async def _start_external(self, principal: Principal, request: StartRequest) -> Run:
        assert self.external is not None
        fingerprint = request_fingerprint(request)
        if request.request_id:
            existing = await self._find_request(principal.user, request.request_id, fingerprint)
            if existing is not None:
                return existing
        return await self.external.start(principal, request, fingerprint)

    def _decided_in_store(self, request: StartRequest) -> bool:
        """True when starting the request is a decision replicas must take together."""
        limits = self._settings.limits
        return bool(request.thread_id or request.request_id or limits.any)

    async def _start_decided_in_store(
        self, user: str, request: StartRequest, fingerprint: str, agent: Agent
    ) -> Run:
        """StartRun across replicas: idempotency, the thread's strategy and the caps are
        decided in one transaction under the user's lock in the database, which writes
        the run's row (and its RUNNING event when it starts now) before any other
        replica may decide for the same user."""
        assert self._decisions is not None
        limits = self._settings.limits
        started: list[RunEvent] = []
        admitted: list[LiveRun] = []
        trace_parent = parent_context()  # decide() runs in the decisions' task

        def decide(facts: StartFacts) -> Run | StartWrite:
            same = facts.same_request
            if same is not None:
                if same.request_hash != fingerprint:
                    raise RequestIdReusedError(request.request_id, same.run_id)
                return same
            thread = facts.thread_active
            if thread and request.multitask_strategy is MultitaskStrategy.REJECT:
                raise ThreadBusyError(request.thread_id, thread[0].run_id)
            counts = Counts(facts.active, facts.queued, facts.all_active, facts.all_queued)
            check_caps(limits, counts, queued=bool(thread))
            # Made under the lock: run ids (time-ordered) follow the order of admission.
            live = self._new_live_run(user, request, fingerprint, trace_parent)
            live.gated = False
            assert self._peers is not None
            live.predecessors = [self._peers.predecessor(r, self._admitting) for r in thread]
            admitted.append(live)
            self._admitting[live.run_id] = live
            if thread:
                return StartWrite(new=live.run)
            event, running = running_change(live, self._clock)
            event.wire = self._writer.encode(event)
            started.append(event)
            return StartWrite(new=live.run, events=[event], updated=running)

        def settle(outcome: Run | Exception) -> None:
            """Runs right after the decision's commit, whether or not the caller waits."""
            for live in admitted:
                self._admitting.pop(live.run_id, None)
            if not admitted or not isinstance(outcome, Run) or outcome.run_id != admitted[0].run_id:
                return
            live = admitted[0]
            queued = live.run
            if started:
                live.advance(Phase.RUNNING)
                live.log.publish(started)
                self._metrics.events_committed(len(started))
            self._registry.add(live)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            live.committed = done
            live.task = self._registry.spawn(
                self._supervise(live, agent), name=f"run:{live.run_id}"
            )
            self._on_run_committed(queued, created=True)  # as the writer publishes a start
            if started:
                self._on_run_committed(outcome, created=False)

        ask = StartAsk(user, request.request_id, request.thread_id, limits.server_wide, decide)
        try:
            run = await self._decisions.decide(ask, settle)
        except RunFencedError as exc:
            raise DatabaseUnavailableError("this server is taking a new lease") from exc
        live = self._registry.get(run.run_id)
        return self._view(live) if live is not None else run

    def resumes(self) -> Resumes:
        """How this server resumes runs no server executes any more (their agent is here
        and resumable; --max-resumes)."""

        def allowed(run: Run) -> bool:
            return run.agent in self._agents and is_resumable(self._agents.get(run.agent))

        return Resumes(allowed, self._settings.max_resumes, self._writer.encode)

    def _take_over(self, run: Run) -> None:
        """A run of a replica that died, taken over here to resume from its checkpoint."""

        async def take_over() -> None:
            checkpoint = await self._store.latest_checkpoint(run.run_id)
            assert checkpoint is not None  # what the sweep resumed it from
            await self.resume(Resumed(run, checkpoint))

        self._registry.spawn(take_over(), name=f"resume:{run.run_id}")

    async def resume(self, taken: Resumed) -> None:
        """Executes here a run resumed from its checkpoint (its RUNNING event committed):
        the agent is called again with `ctx.resumed_from`, its inputs in place."""
        run, checkpoint = taken.run, taken.checkpoint
        agent = self._agents.get(run.agent)
        inputs = [dict(e.data or {}) for e in await self._store.input_events(run.run_id)]
        live = self._live_run(run, None)
        live.resumable = live.checkpointed = True
        live.resumed_from = json.loads(checkpoint.state)
        for data in inputs:
            live.inputs.add(data)
        live.inputs.used = min(checkpoint.inputs_used, len(inputs))
        live.snapshots.restore(run.last_seq, checkpoint.snapshot)
        if checkpoint.snapshot:
            live.snapshots.latest = Snapshot(run.run_id, run.last_seq, checkpoint.snapshot)
        live.advance(Phase.RUNNING)
        self._gate.register(live, [])
        self._registry.add(live)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        live.committed = done
        live.task = self._registry.spawn(self._supervise(live, agent), name=f"run:{run.run_id}")
        self._metrics.run_started(run.agent)
        logger.warning(
            "run %s resumed from its checkpoint at seq %d (resume %d of at most %d)",
            run.run_id,
            checkpoint.seq,
            run.resume_count,
            self._settings.max_resumes,
            extra=log_fields(run),
        )
        if self._feed.watched:
            self._feed.publish(WatchUpdate(RunChange.STATE_CHANGED, self._view(live)))
        self._take_inputs_soon(live)

    def _runs_fenced(self, run_ids: frozenset[str]) -> None:
        if self._peers is not None:
            self._peers.runs_fenced(run_ids)

    async def _supervise(self, live: LiveRun, agent: Agent) -> None:
        """Drives a run once its row is committed; forgets it if the row never was."""
        assert live.committed is not None
        try:
            await live.committed
        except (StoreError, DatabaseUnavailableError):
            self._forget(live)
            return
        for predecessor in live.predecessors if self._interrupts(live) else ():
            predecessor.request_end(RunState.STOPPED, f"interrupted by run {live.run_id}")
        live.resumable = is_resumable(agent)
        await drive_run(
            live,
            agent,
            self._writer,
            self._clock,
            grace=self._settings.stop_grace,
            on_start=self._gate.started,
            on_lost=self._on_lost,
            max_event_bytes=self._settings.max_event_bytes,
        )

    async def _find_request(self, user: str, request_id: str, fingerprint: str) -> Run | None:
        twin = self._gate.twin(user, request_id, fingerprint)
        if twin is not None:
            return await self._same_request(twin)
        run = await self._store.find_by_request_id(Scope(user), request_id)
        if run is None:
            return None
        if run.request_hash != fingerprint:
            raise RequestIdReusedError(request_id, run.run_id)
        live = self._registry.get(run.run_id)
        return self._view(live) if live is not None else run

    async def _same_request(self, twin: LiveRun) -> Run:
        if twin.committed is not None:
            await asyncio.shield(twin.committed)
        return self._view(twin)

    def _new_live_run(
        self, user: str, request: StartRequest, fingerprint: str, trace_parent: Context
    ) -> LiveRun:
        """The admitted run, PENDING, with its log; not yet registered or committed."""
        return self._live_run(self._new_run(user, request, fingerprint), trace_parent)

    def _new_run(self, user: str, request: StartRequest, fingerprint: str) -> Run:
        run = Run(
            run_id=str(uuid7()),
            owner=user,
            agent=request.agent,
            state=RunState.PENDING,
            created_at=self._clock.now(),
            input=dict(request.input),
            thread_id=request.thread_id,
            labels=dict(request.labels),
            request_id=request.request_id,
            multitask_strategy=request.multitask_strategy,
            timeout=request.timeout,
            retention=request.retention,
            webhook_url=request.webhook_url,
            request_hash=fingerprint if request.request_id else "",
            executor=self._peers.holder if self._peers is not None else "",
        )
        return run

    def _live_run(self, run: Run, trace_parent: Context | None) -> LiveRun:
        """A LiveRun of `run`, its log going on after `run.last_seq`."""
        log = RunLog(
            run.run_id,
            run.last_seq,
            window_events=self._settings.window_events,
            window_bytes=self._settings.window_bytes,
        )
        snapshots = Snapshots(
            run.run_id,
            every=self._settings.snapshot_every,
            max_bytes=self._settings.snapshot_bytes,
            max_data=self._settings.max_event_bytes,
        )
        live = LiveRun(run, log, trace_parent, snapshots)
        log.on_fail = partial(live.request_end, RunState.FAILED, LOG_GIVEN_UP)
        live.fields.on_change = partial(self._fields_changed, live)
        return live

    def _interrupts(self, live: LiveRun) -> bool:
        return live.run.multitask_strategy is MultitaskStrategy.INTERRUPT

    def _forget(self, live: LiveRun) -> None:
        """Undoes the admission of a run whose row could not be committed."""
        self._registry.discard(live)
        self._release(live)
        self._gate.forget_request(live)

    def _release(self, live: LiveRun) -> None:
        if live.gated:
            self._gate.release(live)

    def _on_lost(self, live: LiveRun) -> None:
        """Not even the run's terminal state could be stored: it leaves memory unfinished,
        as after a crash, and the next start reconciles it."""
        live.log.abandon()
        live.idle_since = self._clock.now()
        self._release(live)
        self._registry.evict(live.run_id)

    async def get_run(self, principal: Principal, run_id: str) -> Run:
        """The run, from memory while live, else from the store. RunNotFoundError for a run
        the caller may not see: another user's, or, for a read token, any but its own
        (every operation on one run looks it up here first)."""
        if principal.read_only_run is not None and principal.read_only_run != run_id:
            raise RunNotFoundError(run_id)
        scope = principal.own_scope()
        live = self._registry.get(run_id)
        if live is not None and not live.log.fenced:  # fenced: the store has its end
            if not scope.allows(live.run.owner):
                raise RunNotFoundError(run_id)
            return self._view(live)
        run = await self._store.get_run(scope, run_id)
        if run is None:
            raise RunNotFoundError(run_id)
        return (await self._reached([run]))[0]

    async def _reached(self, runs: list[Run]) -> list[Run]:
        return runs if self._peers is None else await self._peers.reached(runs)

    async def list_runs(
        self,
        principal: Principal,
        run_filter: RunFilter,
        *,
        all_users: bool,
        before_run_id: str | None,
        limit: int,
    ) -> list[Run]:
        """A page of runs newest first; live runs carry their current log position."""
        scope = self._list_scope(principal, all_users, "listing all users' runs")
        runs = await self._store.list_runs(scope, run_filter, before_run_id, limit)
        views = []
        for run in await self._reached(runs):
            live = self._registry.get(run.run_id)
            view = self._view(live) if live is not None else run
            if run_filter.waiting_for_input and not view.waiting_for_input:
                continue  # it stopped waiting since its row was last written
            views.append(view)
        return views

    async def stop_run(self, principal: Principal, run_id: str, reason: str) -> Run:
        """Stops the run and returns it once terminal; a finished run is returned unchanged."""
        run = await self.get_run(principal, run_id)
        live = self._registry.get(run_id)
        reason = reason or f"stopped by {principal.user}"
        if run.state.terminal:
            return run
        if run.agent == EXTERNAL_AGENT and self.external is not None:
            return await self.external.stop(principal, run_id, reason)
        if live is not None and not live.log.fenced:
            live.request_end(RunState.STOPPED, reason, principal.user)
            await live.ended.wait()
            if not live.log.fenced:
                return self._view(live)
        elif self._peers is None:
            return run
        else:  # another replica executes it: ask it through the database, wait for the end
            await self._peers.request_stop(run_id, reason, principal.user)
        assert self._peers is not None

        async def get() -> Run:
            return await self.get_run(principal, run_id)

        return await self._peers.wait_end(run_id, get)

    async def delete_run(self, principal: Principal, run_id: str) -> None:
        """Deletes a finished run and its log."""
        run = await self.get_run(principal, run_id)
        if run.agent == EXTERNAL_AGENT and self.external is not None:
            await self.external.delete(principal, run_id=run_id)  # open ones too
            return
        if not run.state.terminal:
            raise RunActiveError(run_id, "deleting it")
        if not await self._store.delete_run(principal.own_scope(), run_id):
            raise RunNotFoundError(run_id)
        live = self._registry.get(run_id)
        self._registry.evict(run_id)  # its request_id is free again, too
        if live is not None:
            live.log.finished = True
        self._feed.publish(WatchUpdate(RunChange.DELETED, run))

    async def send_input(
        self, principal: Principal, run_id: str, data: Mapping[str, Any], request_id: str
    ) -> RunEvent:
        """Appends `data` to the run's log as an `input` event, for its agent to receive;
        returns the event once committed. Idempotent by `request_id`."""
        run = await self.get_run(principal, run_id)
        if run.agent == EXTERNAL_AGENT:
            raise ExternalRunInputError(run_id)
        body = json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        encoded, limit = body.encode(), self._settings.max_event_bytes
        if len(encoded) > limit:
            raise InvalidInputError("input", f"{len(encoded)} bytes {over_limit(limit)}")
        request_id = request_id or str(uuid7())
        digest = hashlib.sha256(encoded).hexdigest()
        now_us = int(self._clock.now().timestamp() * 1_000_000)
        offered = await self._store.offer_input(run_id, request_id, digest, body, now_us)
        if offered is None:
            ended = await self.get_run(principal, run_id)
            raise RunEndedError(run_id, ended.state.value)
        if offered[0] != digest:
            raise InputRequestIdReusedError(request_id, run_id)
        if offered[1] is not None:
            return await self._input_event(run_id, offered[1])
        live = self._registry.get(run_id)
        if live is not None and not live.log.fenced and live.run.executor == run.executor:
            receipt = live.inputs.expect(request_id)
            if live.closed:  # ending: its state is not known yet
                live.inputs.close(run_id, "ending")
            self._take_inputs_soon(live)
            return await asyncio.shield(receipt)
        return await self._input_elsewhere(principal, run_id, request_id)

    async def _input_elsewhere(
        self, principal: Principal, run_id: str, request_id: str
    ) -> RunEvent:
        """Waits for another replica (the run's executor) to append an offered input."""
        if self._peers is None:  # nothing executes the run here: it is ending
            run = await self.get_run(principal, run_id)
            raise RunEndedError(run_id, run.state.value)
        await self._peers.request_inputs(run_id)
        with self._peers.follow(run_id) as heard:
            while True:
                _, seq = await self._store.input_receipt(run_id, request_id)
                if seq is not None:
                    return await self._input_event(run_id, seq)
                run = await self.get_run(principal, run_id)
                if run.state.terminal:
                    _, seq = await self._store.input_receipt(run_id, request_id)
                    if seq is not None:
                        return await self._input_event(run_id, seq)
                    raise RunEndedError(run_id, run.state.value)
                await heard.wait_beyond(max(run.last_seq, heard.committed_seq))

    async def _input_event(self, run_id: str, seq: int) -> RunEvent:
        events = await self._store.read_events(run_id, seq, 1)
        if not events or events[0].seq != seq:
            raise RunNotFoundError(run_id)  # deleted meanwhile
        return events[0]

    def _take_inputs_soon(self, live: LiveRun) -> None:
        """Appends the run's offered inputs in a task of its own (callers may leave)."""
        self._registry.spawn(self._take_inputs(live), name=f"inputs:{live.run_id}")

    async def _take_inputs(self, live: LiveRun) -> None:
        inputs = live.inputs
        async with inputs.lock:
            if live.closed:
                return
            try:
                pending = await self._store.pending_inputs(live.run_id)
            except StoreError as exc:
                logger.warning("run %s: reading its inputs failed (%s)", live.run_id, exc)
                inputs.fail(DatabaseUnavailableError("the run's inputs could not be read"))
                return
            for offered in pending:
                if offered.request_id in inputs.appended:
                    continue
                if live.closed or live.log.broken is not None:
                    break
                await self._append_input(live, offered)

    async def _append_input(self, live: LiveRun, offered: PendingInput) -> None:
        log = live.log
        event = RunEvent(
            live.run_id, log.last_assigned + 1, self._clock.now(), INPUT_EVENT, offered.data
        )
        event.wire = self._writer.encode(event)
        log.assign_seq()
        live.inputs.appended.add(offered.request_id)
        try:
            await self._writer.append(log, event)
        except StoreError:
            live.inputs.fail(DatabaseUnavailableError("the run's log could not be stored"))
            return
        live.inputs.add(offered.data)
        receipt = InputReceipt(live.run_id, offered.request_id, event.seq)
        committed = self._writer.put_beside(log, receipt)
        committed.add_done_callback(partial(self._input_committed, live, offered.request_id, event))

    @staticmethod
    def _input_committed(
        live: LiveRun, request_id: str, event: RunEvent, committed: asyncio.Future[None]
    ) -> None:
        if committed.exception() is None:
            live.inputs.committed(request_id, event)
        else:
            live.inputs.fail(DatabaseUnavailableError("the run's log could not be stored"))

    def _fields_changed(self, live: LiveRun) -> None:
        """Coalesces changes of the run's live fields into a commit of its row at most
        every FIELDS_INTERVAL_S (watchers hear of each commit)."""
        fields = live.fields
        if live.closed or fields.flush is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, fields.flushed_at + FIELDS_INTERVAL_S - loop.time())
        fields.flush = loop.call_later(delay, self._flush_fields, live)

    def _flush_fields(self, live: LiveRun) -> None:
        fields = live.fields
        fields.flush = None
        if live.closed or live.log.broken is not None:
            return  # its end writes its final fields
        fields.flushed_at = asyncio.get_running_loop().time()
        done = self._writer.commit_run(updated=self._view(live))
        done.add_done_callback(consume_outcome)

    def list_agents(self) -> list[AgentInfo]:
        """The agents this server can run (and `external`, when it keeps external runs)."""
        infos = self._agents.infos()
        if self.external is not None:
            infos.append(AgentInfo(EXTERNAL_AGENT, EXTERNAL_DESCRIPTION))
            infos.sort(key=lambda info: info.name)
        return infos

    @overload
    async def subscribe(
        self, principal: Principal, run_id: str, from_seq: int, *, snapshot: Literal[False] = False
    ) -> AsyncIterator[Sequence[EncodedEvent]]: ...

    @overload
    async def subscribe(
        self, principal: Principal, run_id: str, from_seq: int, *, snapshot: bool
    ) -> AsyncIterator[Snapshot | Sequence[EncodedEvent]]: ...

    async def subscribe(
        self, principal: Principal, run_id: str, from_seq: int, *, snapshot: bool = False
    ) -> AsyncIterator[Snapshot | Sequence[EncodedEvent]]:
        """Batches of the run's events with `seq >= from_seq`, ending after the terminal event.

        With `snapshot`, the run's latest snapshot comes first if it covers `from_seq` - 1
        or later, and the batches start right after its seq; without one that far, only
        the batches. Raises RunNotFoundError or SeqOutOfRangeError before yielding anything.
        """
        run = await self.get_run(principal, run_id)
        cursor = max(from_seq, 1)
        if cursor > run.last_seq + 1:
            raise SeqOutOfRangeError(run_id, from_seq, run.last_seq)
        live = self._registry.get(run_id)
        external = run.agent == EXTERNAL_AGENT and self.external is not None
        start = await self._latest_snapshot(run_id, live) if snapshot and not external else None
        if start is not None and start.seq < cursor - 1:
            start = None  # older than what the caller has
        subscription = Subscription(
            self._store,
            run_id,
            live,
            cursor if start is None else start.seq + 1,
            limits=self._read_limits,
            clock=self._clock,
            remote=self.external if external else self._peers,
            opened=self._subscriptions,
        )
        return subscription.batches() if start is None else subscription.after(start)

    async def _latest_snapshot(self, run_id: str, live: LiveRun | None) -> Snapshot | None:
        """The run's latest committed snapshot: from memory while this process executes
        the run and has committed one, else from the store."""
        if live is not None and not live.log.fenced and live.snapshots.latest is not None:
            return live.snapshots.latest
        return await self._store.latest_snapshot(run_id)

    async def watch(
        self, principal: Principal, run_filter: RunFilter, *, all_users: bool
    ) -> AsyncIterator[WatchUpdate]:
        """A snapshot of matching runs, a SNAPSHOT_END marker, then every change."""
        scope = self._list_scope(principal, all_users, "watching all users' runs")
        if self._draining:
            raise ServerDrainingError()
        watcher = self._feed.open(scope, run_filter)
        try:
            snapshot_filter = run_filter
            if not run_filter.states:
                snapshot_filter = dataclasses.replace(
                    run_filter, states=frozenset({RunState.PENDING, RunState.RUNNING})
                )
            runs = await self._store.list_runs(scope, snapshot_filter, None, SNAPSHOT_LIMIT)
        except BaseException:
            self._feed.discard(watcher)
            raise
        return self._watch_stream(watcher, runs)

    async def _watch_stream(self, watcher: Any, runs: list[Run]) -> AsyncIterator[WatchUpdate]:
        for run in runs:
            watcher.seen.add(run.run_id)
            live = self._registry.get(run.run_id)
            yield WatchUpdate(RunChange.EXISTING, self._view(live) if live else run)
        yield WatchUpdate(RunChange.SNAPSHOT_END, None)
        async for update in self._feed.follow(watcher):
            yield update

    # -- internals ----------------------------------------------------------------------

    def _list_scope(self, principal: Principal, all_users: bool, what: str) -> Scope:
        if all_users and not principal.is_admin:
            raise AdminOnlyError(what)
        return principal.scope(all_users=all_users)

    def _view(self, live: LiveRun) -> Run:
        return live.row().replace(last_seq=live.log.committed_seq)

    def _on_run_committed(self, run: Run, created: bool) -> None:
        if created:
            self._metrics.run_started(run.agent)
        elif run.state.terminal:  # only its supervisor commits a run's end (lifecycle)
            self._metrics.run_finished(run.agent, run.state.value)
        live = self._registry.get(run.run_id)
        change = RunChange.CREATED if created else RunChange.STATE_CHANGED
        if live is not None:
            if not created and live.run.state is run.state:
                change = RunChange.UPDATED  # its live fields, written by _flush_fields
            live.run = run
            if run.state.terminal:
                live.idle_since = run.ended_at
                self._release(live)
        if self._feed.watched:
            view = self._view(live) if live is not None else run
            self._feed.publish(WatchUpdate(change, view))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sweep_interval)
            self.sweep()

    def sweep(self) -> int:
        """Evicts finished runs idle for the memory grace period; returns how many left memory."""
        return self._registry.sweep(self._clock.now(), self._settings.memory_grace)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.purge_interval)
            try:
                await self.purge()
            except StoreUnavailableError:
                logger.exception("purging expired runs failed; will retry")

    @property
    def default_retention(self) -> float:
        """How long runs that set no retention are kept after they end, in seconds."""
        return self._settings.retention

    async def purge(self) -> int:
        """Deletes the runs whose retention has ended (their own, else the server's
        default), in bounded batches."""
        now = self._clock.now()
        total = 0
        while True:
            purged = await self._store.purge_expired(
                now, self._settings.retention, self._settings.purge_batch
            )
            total += len(purged)
            for run_id in purged:  # retention outranks the memory grace period
                self._registry.evict(run_id)
            if len(purged) < self._settings.purge_batch:
                break
        if total:
            logger.info("purged %d runs whose retention ended by %s", total, now.isoformat())
        return total

    def in_memory(self, run_id: str) -> bool:
        """True while the run is held in memory (for tests and metrics)."""
        return run_id in self._registry
