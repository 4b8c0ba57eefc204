"""The run supervisor: the only code that writes a run's lifecycle states.

`drive_run` moves one run from PENDING through RUNNING to exactly one terminal state. The
agent runs in a task of its own, so a stop, a timeout or a shutdown can cancel it, give
it a bounded grace period for cleanup, and still record the outcome if it never returns.
Why a run is being ended is recorded on the LiveRun before anything is cancelled.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from runservice.domain.errors import (
    RunFencedError,
    ServerDrainingError,
    StoreError,
    StoreUnavailableError,
)
from runservice.domain.model import (
    INPUT_REQUESTED_EVENT,
    SERVER_EVENTS,
    STATE_EVENT,
    STOP_REQUESTED_EVENT,
    Checkpoint,
    Run,
    RunEvent,
    RunFailure,
    RunState,
    Snapshot,
)
from runservice.domain.ports import Clock, RunStore
from runservice.runtime.agent import Agent, EventTooLargeError, RunClosedError, RunError, over_limit
from runservice.runtime.interaction import Inputs, LiveFields, consume_outcome
from runservice.runtime.runlog import RunLog
from runservice.runtime.snapshots import Snapshots, encode_data
from runservice.runtime.tracing import NO_SPAN, Context, Span, record_state, run_span
from runservice.runtime.writer import Writer

logger = logging.getLogger(__name__)

SHUTDOWN = "server shutdown"
"""The reason of a run the server's shutdown interrupted."""

LOG_GIVEN_UP = "the server could not store its events; see the server log"
"""The reason of a run whose log the store refused for good."""

_FAILURE_CODES = {
    RunState.FAILED: "INTERNAL",
    RunState.STOPPED: "CANCELLED",
    RunState.INTERRUPTED: "UNAVAILABLE",
    RunState.TIMED_OUT: "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True)
class EndRequest:
    """Why a run is being ended from outside: the state it will end in and the reason."""

    state: RunState
    reason: str
    by: str = ""  # the user whose StopRun asked for it ("" for the server's own reasons)


class Phase(enum.IntEnum):
    """Where a live run is in its life; it only moves forward."""

    QUEUED = 1  # admitted; waits for its row to commit and its turn on its thread
    RUNNING = 2  # its RUNNING event is committed, or queued with its row: the agent runs
    CLOSING = 3  # its agent returned or was given up: nothing more may be emitted
    ENDED = 4  # its terminal state is committed (or it was abandoned unfinished)


class Predecessor(Protocol):
    """A run of the same thread that a queued run waits for: here, or on another replica."""

    @property
    def run_id(self) -> str:
        """The run's identifier."""
        ...

    @property
    def ended(self) -> asyncio.Event:
        """Set once the run is terminal."""
        ...

    def request_end(self, state: RunState, reason: str) -> bool:
        """Asks for the run to end (INTERRUPT)."""
        ...


class LiveRun:
    """A run this process owns: its committed view, its log, its tasks and its end request."""

    def __init__(
        self,
        run: Run,
        log: RunLog,
        trace_parent: Context | None = None,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.run = run
        self.log = log
        # The snapshots of its output, made as it goes, and the latest one committed.
        self.snapshots = snapshots or Snapshots(run.run_id)
        # The trace of the call that started the run, and the run's own span while it runs.
        self.trace_parent = trace_parent
        self.span: Span = NO_SPAN
        self.phase = Phase.QUEUED
        self.task: asyncio.Task[None] | None = None
        self.end_request: EndRequest | None = None
        self.ended = asyncio.Event()  # set together with Phase.ENDED, for waiters
        self.partial: Mapping[str, Any] | None = None
        self.subscribers = 0
        self.idle_since: datetime | None = None
        # Runs of the same thread this one waits for (ENQUEUE, INTERRUPT); empty otherwise.
        self.predecessors: list[Predecessor] = []
        # Admitted by the start gate of this process (False: decided in the database).
        self.gated = True
        self.committed: asyncio.Future[None] | None = None
        # Resolved by request_end; waited on with asyncio.wait (which never cancels it).
        self.end_requested: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.inputs = Inputs()  # SendInput's, in log order, and the agent's place in them
        self.fields = LiveFields()  # waiting_for_input, progress and usage, live
        # Resumable agents: whether it may resume from a checkpoint, whether it made one,
        # and the state of the checkpoint this execution resumed from (None: a first run).
        self.resumable = False
        self.checkpointed = False
        self.resumed_from: Any = None

    def row(self) -> Run:
        """The run's row as it is now: the committed one with its live fields."""
        fields = self.fields
        return self.run.replace(
            waiting_for_input=fields.waiting and not self.closed,
            progress=fields.progress,
            usage=dict(fields.usage),
        )

    @property
    def run_id(self) -> str:
        """The run's identifier."""
        return self.run.run_id

    @property
    def closed(self) -> bool:
        """True once the run may emit nothing more."""
        return self.phase >= Phase.CLOSING

    def advance(self, phase: Phase) -> None:
        """Moves the run forward to `phase` (never back); ENDED wakes whoever waits."""
        self.phase = max(self.phase, phase)
        if phase is Phase.ENDED:
            self.fields.on_change = None  # it refers to this run: no cycle outlives the run
            self.ended.set()

    def request_end(self, state: RunState, reason: str, by: str = "") -> bool:
        """Asks the supervisor to end the run; the first request wins. False if already asked.
        `by` names the user of a StopRun: the log then records the request."""
        if self.end_request is not None or self.ended.is_set():
            return False
        self.end_request = EndRequest(state, reason, by)
        self.end_requested.set_result(None)
        return True


class RunContext:
    """The AgentContext handed to an agent."""

    def __init__(
        self, live: LiveRun, writer: Writer, clock: Clock, max_event_bytes: int = 0
    ) -> None:
        self._live = live
        self._writer = writer
        self._clock = clock
        self._max_event_bytes = max_event_bytes or MAX_EVENT_BYTES

    @property
    def run_id(self) -> str:
        """The run's identifier."""
        return self._live.run.run_id

    @property
    def owner(self) -> str:
        """The user who started the run."""
        return self._live.run.owner

    @property
    def thread_id(self) -> str:
        """The run's thread, or an empty string."""
        return self._live.run.thread_id

    @property
    def labels(self) -> Mapping[str, str]:
        """The run's labels."""
        return self._live.run.labels

    @property
    def span(self) -> Span:
        """The run's OpenTelemetry span (a no-op one while tracing is off)."""
        return self._live.span

    async def emit(
        self,
        type: str,
        *,
        data: Mapping[str, Any] | None = None,
        text: str | None = None,
        binary: bytes | None = None,
        at: datetime | None = None,
    ) -> int:
        """Appends an event to the run's log and returns its seq."""
        if type in SERVER_EVENTS:
            raise ValueError(f"event type {type!r} is reserved for the server's own events")
        return await self._emit(type, data=data, text=text, binary=binary, at=at)

    async def _emit(
        self,
        type: str,
        *,
        data: Mapping[str, Any] | None = None,
        text: str | None = None,
        binary: bytes | None = None,
        at: datetime | None = None,
    ) -> int:
        if self._live.closed:
            raise RunClosedError(f"run {self.run_id} has ended")
        if sum(p is not None for p in (data, text, binary)) > 1:
            raise ValueError("an event carries at most one of data, text and binary")
        log = self._live.log
        event = RunEvent(
            self.run_id, log.last_assigned + 1, at or self._clock.now(), type, data, text, binary
        )
        # Encoded here, once (the writer and every subscriber reuse the bytes), and
        # measured as sent, so every client can receive it.
        wire = event.wire = self._writer.encode(event)
        if len(wire) > self._max_event_bytes:
            raise EventTooLargeError(len(wire), self._max_event_bytes)
        log.assign_seq()  # the seq is taken only by an event that will be stored
        await self._writer.append(log, event)
        made = self._live.snapshots.observe(event)
        if made is not None:
            store_snapshot(self._live, self._writer, made)
        return event.seq

    def save_partial(self, result: Mapping[str, Any]) -> None:
        """Records output to keep if the run does not finish."""
        self._live.partial = dict(result)

    def _stored_json(self, value: Any, what: str) -> str:
        """`value` as the JSON text of a snapshot or checkpoint of the open run; TypeError
        or ValueError if it is no JSON value, EventTooLargeError over --max-event-size."""
        if self._live.closed:
            raise RunClosedError(f"run {self.run_id} has ended")
        try:
            text = encode_data(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"ctx.{what} takes a JSON value: {exc}") from None
        size = len(text.encode())
        if size > self._max_event_bytes:
            raise EventTooLargeError(size, self._max_event_bytes, f"a {what}")
        return text

    def snapshot(self, data: Any) -> None:
        """Records the state of the run's output as of its last event (see
        AgentContext.snapshot)."""
        live = self._live
        text = self._stored_json(data, "snapshot")
        # As of the agent's last event queued (an event of another task of the agent that
        # waits for room in the writer is not); before any, as of what is committed.
        made = live.snapshots.record(live.snapshots.seen or live.log.committed_seq, text)
        if made is not None:
            store_snapshot(live, self._writer, made)

    async def checkpoint(self, state: Any) -> None:
        """Stores `state` beside the log as of the agent's last event; waits for its commit."""
        live = self._live
        text = self._stored_json(state, "checkpoint")
        seq = live.log.last_assigned
        record = Checkpoint(self.run_id, seq, text, live.inputs.used, live.snapshots.state())
        await self._writer.put_beside(live.log, record)
        live.checkpointed = True

    @property
    def resumed_from(self) -> Any:
        """The state of the checkpoint this execution resumed from; None on a first run."""
        return self._live.resumed_from

    async def receive(self, timeout: float | None = None) -> Mapping[str, Any]:  # noqa: ASYNC109
        """The next input sent to the run (SendInput), in log order; waits for one."""
        live = self._live
        if live.inputs.queued:
            return await live.inputs.next(0)
        live.fields.set_waiting(True)
        try:
            return await live.inputs.next(timeout)
        finally:
            live.fields.set_waiting(False)

    async def ask(
        self,
        prompt: str = "",
        *,
        data: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent API's own deadline
    ) -> Mapping[str, Any]:
        """Appends an `input.requested` event (data: `prompt` and `data`'s fields), then
        returns the next input, as receive() does."""
        requested = {"prompt": prompt, **(data or {})}
        await self._emit(INPUT_REQUESTED_EVENT, data=requested)
        return await self.receive(timeout)

    def progress(self, done: float, total: float = 0, message: str = "") -> None:
        """Reports how far the run has come (the run's `progress`, live)."""
        self._live.fields.set_progress(done, total, message)

    def usage(self, **counters: float) -> None:
        """Reports running totals of what the run consumed (the run's `usage`, live)."""
        self._live.fields.add_usage(counters)


MAX_EVENT_BYTES = 1024 * 1024
"""The default of the largest event an agent may emit (encoded, as sent to subscribers) and
of the largest result it may return (as JSON): the server's --max-event-size."""


def log_fields(run: Run, state: RunState | None = None, **more: object) -> dict[str, object]:
    """The structured fields of a line about `run` (`extra=` of the logging call): run_id,
    owner, agent, and `state` (the run's own unless given), then `more` that are not None."""
    fields: dict[str, object] = {
        "run_id": run.run_id,
        "owner": run.owner,
        "agent": run.agent,
        "state": (state or run.state).value,
    }
    fields.update((key, value) for key, value in more.items() if value is not None)
    return fields


def _json_size(value: Mapping[str, Any]) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))


@dataclass(frozen=True)
class _Outcome:
    state: RunState
    result: Mapping[str, Any] | None = None
    failure: RunFailure | None = None
    reason: str = ""


async def drive_run(
    live: LiveRun,
    agent: Agent,
    writer: Writer,
    clock: Clock,
    *,
    grace: float,
    on_start: Callable[[LiveRun], None],
    on_lost: Callable[[LiveRun], None],
    max_event_bytes: int = MAX_EVENT_BYTES,
) -> None:
    """Waits for the run's turn on its thread, runs the agent, records one terminal state.

    If the store refuses the run's log for good, the run is abandoned in memory (`on_lost`)
    and its row stays unfinished until the next start reconciles it to INTERRUPTED.
    """
    try:
        with run_span(live.run, live.trace_parent) as span:
            live.span, live.trace_parent = span, None
            if live.phase is Phase.RUNNING:  # its RUNNING event was committed with its row
                record_state(span, RunState.RUNNING)
            await _drive(
                live, agent, writer, clock, grace=grace, on_start=on_start, limit=max_event_bytes
            )
    except RunFencedError:
        live.advance(Phase.ENDED)
        logger.error(
            "run %s dropped here: this server's lease on it is gone (another replica ended it)",
            live.run_id,
            extra=log_fields(live.run),
        )
        on_lost(live)
    except StoreError:
        live.advance(Phase.ENDED)
        logger.error(
            "run %s abandoned: its log could not be stored", live.run_id, extra=log_fields(live.run)
        )
        on_lost(live)


async def _drive(
    live: LiveRun,
    agent: Agent,
    writer: Writer,
    clock: Clock,
    *,
    grace: float,
    on_start: Callable[[LiveRun], None],
    limit: int,
) -> None:
    try:
        if live.phase is Phase.QUEUED:  # else it was committed RUNNING with its row
            try:
                started = await _wait_turn(live, writer, clock)
                if started:
                    live.advance(Phase.RUNNING)
                    on_start(live)
                    event, running = running_change(live, clock)
                    await writer.commit_run(event=(live.log, event), updated=running)
                    record_state(live.span, RunState.RUNNING, event.seq)
            except StoreError:
                if live.log.broken is None or live.log.fenced:
                    raise
                started = False  # its log was given up (end requested): end it now
            if not started:
                request = live.end_request
                assert request is not None
                note_stop(live, writer, clock)
                await asyncio.shield(_finish(live, writer, clock, _ended_while_queued(request)))
                return
        outcome = await _execute(live, agent, writer, clock, grace, limit=limit)
    except asyncio.CancelledError:
        # Only a shutdown that gave up on the grace period cancels the supervisor itself.
        outcome = _Outcome(
            RunState.INTERRUPTED,
            result=live.partial,
            failure=RunFailure("UNAVAILABLE", "interrupted: server shutdown"),
            reason=SHUTDOWN,
        )
    await asyncio.shield(_finish(live, writer, clock, outcome))


async def _wait_turn(live: LiveRun, writer: Writer, clock: Clock) -> bool:
    """Waits until every predecessor on the thread has ended; False if ended meanwhile."""
    waiting = [p for p in live.predecessors if not p.ended.is_set()]
    # Let go of them: each would hold its own predecessors, so on a thread that never
    # idles every run it ever had would stay reachable from the newest one.
    live.predecessors = []
    if not waiting:
        return live.end_request is None
    event = RunEvent(
        run_id=live.run_id,
        seq=live.log.assign_seq(),
        at=clock.now(),
        type=STATE_EVENT,
        state=RunState.PENDING,
    )
    await writer.commit_run(event=(live.log, event))
    record_state(live.span, RunState.PENDING, event.seq)
    end: asyncio.Future[Any] = live.end_requested
    for predecessor in waiting:
        turn: asyncio.Future[Any] = asyncio.ensure_future(predecessor.ended.wait())
        done, _ = await asyncio.wait({turn, end}, return_when=asyncio.FIRST_COMPLETED)
        turn.cancel()
        if end in done:
            return False
    return live.end_request is None


def _ended_while_queued(request: EndRequest) -> _Outcome:
    failure = _failure_for(request, " before it started")
    return _Outcome(request.state, failure=failure, reason=request.reason)


def _failure_for(request: EndRequest, when: str = "") -> RunFailure:
    """The failure of a run ended from outside: `stopped: <reason>`, `timed out: ...`."""
    word = request.state.value.lower().replace("_", " ")
    return RunFailure(_FAILURE_CODES[request.state], f"{word}{when}: {request.reason}")


async def _execute(
    live: LiveRun, agent: Agent, writer: Writer, clock: Clock, grace: float, *, limit: int
) -> _Outcome:
    ctx = RunContext(live, writer, clock, limit)
    agent_task = asyncio.create_task(agent(ctx, live.run.input), name=f"agent:{live.run_id}")
    awaited: set[asyncio.Future[Any]] = {agent_task, live.end_requested}
    try:
        done, _ = await asyncio.wait(
            awaited,
            timeout=live.run.timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
    except asyncio.CancelledError:
        live.request_end(RunState.INTERRUPTED, SHUTDOWN)
        raise
    if agent_task in done and live.log.broken is None:
        return _outcome_of(live, agent_task, limit)
    if agent_task in done:  # it ended on the error of its log, given up meanwhile
        consume_outcome(agent_task)
        request = live.end_request
        assert request is not None
        live.advance(Phase.CLOSING)
        return _Outcome(request.state, live.partial, _failure_for(request), request.reason)
    if live.end_request is None:
        assert live.run.timeout is not None
        live.request_end(RunState.TIMED_OUT, f"time limit of {live.run.timeout:g}s exceeded")
    request = live.end_request
    assert request is not None
    note_stop(live, writer, clock)
    return await _cancel_agent(live, agent_task, request, grace)


def note_stop(live: LiveRun, writer: Writer, clock: Clock) -> None:
    """Appends the `run.stop_requested` event of a StopRun (reason, by) before the run's
    end, so its log tells why and when the stop arrived."""
    request = live.end_request
    if request is None or not request.by or live.log.broken is not None:
        return
    event = RunEvent(
        run_id=live.run_id,
        seq=live.log.assign_seq(),
        at=clock.now(),
        type=STOP_REQUESTED_EVENT,
        data={"reason": request.reason, "by": request.by},
    )
    writer.commit_run(event=(live.log, event)).add_done_callback(consume_outcome)


async def _cancel_agent(
    live: LiveRun, agent_task: asyncio.Task[Any], request: EndRequest, grace: float
) -> _Outcome:
    agent_task.cancel(request.reason)
    done, _ = await asyncio.wait({agent_task}, timeout=grace)
    result: Mapping[str, Any] | None = live.partial
    if agent_task in done and not agent_task.cancelled() and agent_task.exception() is None:
        returned = agent_task.result()
        if returned is not None:
            result = returned
    elif agent_task not in done:
        logger.warning(
            "run %s: agent ignored cancellation for %.1fs; abandoned",
            live.run_id,
            grace,
            extra=log_fields(live.run, request.state),
        )
        agent_task.add_done_callback(consume_outcome)
    elif not agent_task.cancelled() and agent_task.exception() is not None:
        logger.info(
            "run %s: agent raised during cleanup",
            live.run_id,
            exc_info=agent_task.exception(),
            extra=log_fields(live.run, request.state),
        )
    live.advance(Phase.CLOSING)
    failure = _failure_for(request)
    return _Outcome(request.state, result=result, failure=failure, reason=request.reason)


def _outcome_of(live: LiveRun, agent_task: asyncio.Task[Any], limit: int) -> _Outcome:
    if agent_task.cancelled():  # the agent cancelled itself: treat it as a failure
        return _failed(live, RuntimeError("agent task was cancelled"))
    exc = agent_task.exception()
    if exc is not None:
        return _failed(live, exc)
    result = agent_task.result()
    if result is not None and not isinstance(result, Mapping):
        return _failed(live, TypeError(f"agent returned {type(result).__name__}, not a mapping"))
    if result is not None and _json_size(result) > limit:
        size = _json_size(result)
        return _failed(live, RunError(f"the agent's result of {size} bytes {over_limit(limit)}"))
    return _Outcome(RunState.SUCCEEDED, result=dict(result) if result is not None else {})


def _failed(live: LiveRun, exc: BaseException) -> _Outcome:
    error_id = uuid.uuid4().hex[:16]
    fields = log_fields(live.run, RunState.FAILED, error_id=error_id)
    if isinstance(exc, RunError):
        logger.info("run %s failed (error id %s): %s", live.run_id, error_id, exc, extra=fields)
        failure = RunFailure("UNKNOWN", str(exc) or "the agent reported a failure", error_id)
    else:
        logger.error(
            "run %s failed (error id %s)",
            live.run_id,
            error_id,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra=fields,
        )
        failure = RunFailure(
            "INTERNAL", f"the agent failed unexpectedly (error id {error_id})", error_id
        )
    return _Outcome(RunState.FAILED, result=live.partial, failure=failure)


def running_change(live: LiveRun, clock: Clock) -> tuple[RunEvent, Run]:
    """The RUNNING event of a run about to start, and its row in that state."""
    now = clock.now()
    event = RunEvent(
        run_id=live.run_id,
        seq=live.log.assign_seq(),
        at=now,
        type=STATE_EVENT,
        state=RunState.RUNNING,
    )
    return event, live.run.replace(state=RunState.RUNNING, started_at=now, last_seq=event.seq)


def start_now(live: LiveRun, writer: Writer, clock: Clock) -> asyncio.Future[None]:
    """Commits a run that need not wait for its thread: its row, its RUNNING event and its
    row's RUNNING state, in one transaction (watchers still see CREATED, then the change);
    the supervisor then goes straight to the agent."""
    event, running = running_change(live, clock)
    live.advance(Phase.RUNNING)
    return writer.commit_run(new=live.run, event=(live.log, event), updated=running)


async def _finish(live: LiveRun, writer: Writer, clock: Clock, outcome: _Outcome) -> None:
    live.advance(Phase.CLOSING)
    if outcome.reason == SHUTDOWN and live.resumable and live.checkpointed:
        # Left unfinished, as a crash leaves it: the next start resumes it (or, with
        # replicas, a survivor whose sweep finds it without a lease).
        live.inputs.fail(ServerDrainingError())  # a retry finds it appended once resumed
        live.advance(Phase.ENDED)
        logger.warning(
            "run %s left unfinished at shutdown: it resumes from its checkpoint",
            live.run_id,
            extra=log_fields(live.run),
        )
        return
    try:
        ended = await _commit_end(live, writer, clock, outcome)
    except StoreError:
        if live.log.broken is None or live.log.fenced:
            raise
        # Its log was given up while this event waited (it was dropped with the rest):
        # whatever the agent did, events are lost, so the run failed; its end goes at the
        # seq after the last one committed.
        request = EndRequest(RunState.FAILED, LOG_GIVEN_UP)
        outcome = _Outcome(request.state, live.partial, _failure_for(request), request.reason)
        ended = await _commit_end(live, writer, clock, outcome)
    live.advance(Phase.ENDED)
    logger.info("run %s ended %s", live.run_id, outcome.state.value, extra=_end_fields(ended))


def store_snapshot(live: LiveRun, writer: Writer, snapshot: Snapshot) -> None:
    """Queues a snapshot of the run's output, to commit with the events it covers; once
    committed it is the run's latest (what Subscribe with `snapshot` may start from)."""
    done = writer.put_beside(live.log, snapshot)
    done.add_done_callback(partial(live.snapshots.committed, snapshot))


def _end_fields(ended: Run) -> dict[str, object]:
    """log_fields of a run's end line, with how long the run lived (queued time included)."""
    assert ended.ended_at is not None
    lived = (ended.ended_at - ended.created_at).total_seconds()
    error_id = ended.error.error_id if ended.error is not None else None
    return log_fields(ended, duration_s=round(lived, 3), error_id=error_id)


async def _commit_end(live: LiveRun, writer: Writer, clock: Clock, outcome: _Outcome) -> Run:
    """Commits the run's terminal event and its row's final state together; returns the row.
    The run's last snapshot goes before it, covering the events before the terminal one."""
    last = live.snapshots.final()
    if last is not None:
        store_snapshot(live, writer, last)
    now = clock.now()
    result = dict(outcome.result) if outcome.result is not None else None
    event = RunEvent(
        run_id=live.run_id,
        seq=live.log.assign_seq(),
        at=now,
        type=STATE_EVENT,
        state=outcome.state,
        data=result,
        error=outcome.failure,
    )
    updated = live.row().replace(
        state=outcome.state,
        waiting_for_input=False,
        result=result,
        error=outcome.failure,
        ended_at=now,
        stop_reason=outcome.reason,
        last_seq=event.seq,
    )
    live.inputs.close(live.run_id, outcome.state.value)
    await writer.commit_run(event=(live.log, event), updated=updated)
    record_state(live.span, outcome.state, event.seq, outcome.failure)
    return updated


ORPHAN_FAILURE = RunFailure(
    "UNAVAILABLE", "interrupted: the server stopped while the run was active"
)
RECONCILE_ATTEMPTS = 40  # with RECONCILE_PAUSE_S: a lock held by another process for 10 s
RECONCILE_PAUSE_S = 0.25


@dataclass(frozen=True)
class Resumes:
    """How runs no server executes any more are resumed: which may be (their agent is here
    and resumable), how often at most (--max-resumes), and how their events are encoded."""

    allowed: Callable[[Run], bool]
    max_resumes: int
    encode: Callable[[RunEvent], bytes]


NO_RESUMES = Resumes(lambda run: False, 0, lambda event: b"")


@dataclass(frozen=True)
class Resumed:
    """A run taken up again from its checkpoint: its row, RUNNING after its resumed event."""

    run: Run
    checkpoint: Checkpoint


def orphan_fate(
    run: Run,
    checkpoint: Checkpoint | None,
    clock: Clock,
    resumes: Resumes,
    *,
    reason: str = "server restarted",
    failure: RunFailure | None = None,
    executor: str | None = None,
) -> tuple[RunEvent, Run, Snapshot | None]:
    """What becomes of a run no server executes any more (`run.last_seq` is the last seq
    its log really reached): with a checkpoint and resumes left, a RUNNING event carrying
    `resumed_from_seq` and its row (resume_count + 1, under `executor` if given), and the
    snapshot as of the checkpoint ("" data: none); otherwise orphan_end's INTERRUPTED end."""
    failure = failure or ORPHAN_FAILURE
    if checkpoint is not None and run.resume_count < resumes.max_resumes:
        event = RunEvent(
            run_id=run.run_id,
            seq=run.last_seq + 1,
            at=clock.now(),
            type=STATE_EVENT,
            state=RunState.RUNNING,
            resumed_from_seq=checkpoint.seq,
        )
        event.wire = resumes.encode(event)
        row = run.replace(
            state=RunState.RUNNING,
            last_seq=event.seq,
            resume_count=run.resume_count + 1,
            waiting_for_input=False,
            executor=run.executor if executor is None else executor,
        )
        return event, row, Snapshot(run.run_id, event.seq, checkpoint.snapshot)
    if checkpoint is not None:
        failure = RunFailure(
            failure.code,
            f"{failure.message}; it was resumed {run.resume_count} times, the most "
            "--max-resumes allows",
        )
    end, row = orphan_end(run, clock, reason, failure)
    return end, row, None


async def reconcile_orphans(
    store: RunStore, clock: Clock, resumes: Resumes = NO_RESUMES
) -> tuple[int, list[Resumed]]:
    """Takes up every run a previous server left unfinished: a resumable one with a
    checkpoint (and resumes left) is resumed, its log going on with a RUNNING event
    carrying `resumed_from_seq`; every other one ends INTERRUPTED, its terminal event right
    after the last event its log really reached. Returns how many ended, and the resumed.

    A lock another process holds on the database is waited out for about 10 s; any other
    StoreUnavailableError is raised (the server cannot start).
    """
    for attempt in range(1, RECONCILE_ATTEMPTS + 1):
        try:
            return await _reconcile_once(store, clock, resumes)
        except StoreUnavailableError as exc:
            if not exc.contended or attempt == RECONCILE_ATTEMPTS:
                raise
            await asyncio.sleep(RECONCILE_PAUSE_S)
    raise AssertionError("unreachable")  # pragma: no cover


def orphan_end(
    run: Run, clock: Clock, reason: str = "server restarted", failure: RunFailure = ORPHAN_FAILURE
) -> tuple[RunEvent, Run]:
    """The INTERRUPTED end of a run no server executes any more (`run.last_seq` is the
    last seq its log really reached): its terminal event and its row."""
    now = clock.now()
    end = RunEvent(
        run_id=run.run_id,
        seq=run.last_seq + 1,
        at=now,
        type=STATE_EVENT,
        state=RunState.INTERRUPTED,
        error=failure,
    )
    row = run.replace(
        state=RunState.INTERRUPTED,
        error=failure,
        ended_at=now,
        stop_reason=reason,
        last_seq=end.seq,
        waiting_for_input=False,
    )
    return end, row


LEASE_FAILURE = RunFailure(
    "UNAVAILABLE", "interrupted: the server executing the run stopped answering"
)
LEASE_LOST = "its server's lease expired"


async def _reconcile_once(
    store: RunStore, clock: Clock, resumes: Resumes
) -> tuple[int, list[Resumed]]:
    orphans = await store.unfinished_runs()
    if not orphans:
        return 0, []
    events, rows, snapshots, resumed = [], [], [], []
    for run in orphans:
        checkpoint = await store.latest_checkpoint(run.run_id) if resumes.allowed(run) else None
        event, row, snapshot = orphan_fate(run, checkpoint, clock, resumes)
        events.append(event)
        rows.append(row)
        if snapshot is not None and checkpoint is not None:
            snapshots.append(snapshot)
            resumed.append(Resumed(row, checkpoint))
    await store.commit([], events, rows, snapshots)
    if len(resumed) < len(orphans):
        logger.warning(
            "marked %d runs orphaned by the previous process INTERRUPTED",
            len(orphans) - len(resumed),
        )
    if resumed:
        logger.warning("resuming %d runs from their checkpoints", len(resumed))
    return len(orphans) - len(resumed), resumed
