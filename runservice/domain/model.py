"""Runs, their events and their lifecycle: plain data, shared by every layer."""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

STATE_EVENT = "run.state"
"""The `type` of lifecycle events in a run's log."""

INPUT_EVENT = "input"
"""The `type` of the events SendInput appends (the input in `data`)."""

INPUT_REQUESTED_EVENT = "input.requested"
"""The `type` of the event an agent's `ctx.ask` appends: the run waits for input."""

STOP_REQUESTED_EVENT = "run.stop_requested"
"""The `type` of the event a StopRun appends before the run's end (`reason`, `by`)."""

SERVER_EVENTS = frozenset({STATE_EVENT, INPUT_EVENT, INPUT_REQUESTED_EVENT, STOP_REQUESTED_EVENT})
"""Event types only the server writes (an agent asks with `ctx.ask`)."""


class RunState(enum.StrEnum):
    """Where a run is in its lifecycle; values match the proto names without `RUN_STATE_`."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    INTERRUPTED = "INTERRUPTED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        """True for the states a run never leaves."""
        return self not in _ACTIVE


_ACTIVE = frozenset({RunState.PENDING, RunState.RUNNING})


class MultitaskStrategy(enum.StrEnum):
    """What StartRun does with a run already active on the same thread."""

    REJECT = "REJECT"
    INTERRUPT = "INTERRUPT"
    ENQUEUE = "ENQUEUE"


class RunChange(enum.StrEnum):
    """The kinds of change WatchRuns reports."""

    EXISTING = "EXISTING"
    SNAPSHOT_END = "SNAPSHOT_END"
    CREATED = "CREATED"
    STATE_CHANGED = "STATE_CHANGED"
    DELETED = "DELETED"
    UPDATED = "UPDATED"  # a live field changed (waiting_for_input, progress, usage)


@dataclass(frozen=True, slots=True)
class RunFailure:
    """Why a run did not succeed, safe to show to its owner.

    `code` is a canonical gRPC status code name (e.g. "CANCELLED"), kept as text so that
    this layer does not depend on gRPC. `error_id` points at the server log entry that
    holds the details of an unexpected failure.
    """

    code: str
    message: str
    error_id: str | None = None


@dataclass(frozen=True, slots=True)
class RunProgress:
    """How far an agent says its run has come: `done` of `total` (0: unknown)."""

    done: float
    total: float = 0.0
    message: str = ""


@dataclass(frozen=True, slots=True)
class Run:
    """A run as its owner sees it. Times are aware UTC datetimes."""

    run_id: str
    owner: str
    agent: str
    state: RunState
    created_at: datetime
    input: Mapping[str, Any] = field(default_factory=dict)
    result: Mapping[str, Any] | None = None
    error: RunFailure | None = None
    thread_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    last_seq: int = 0
    stop_reason: str = ""
    request_id: str = ""
    multitask_strategy: MultitaskStrategy = MultitaskStrategy.REJECT
    timeout: float | None = None
    # How long the run is kept after it ends, in seconds, if the run asked for a retention
    # of its own; None: the server's default (--retention), whatever it is at the time.
    retention: float | None = None
    request_hash: str = ""  # digest of the StartRun request, to tell a retry from a reuse
    # The lease under which a replica executes the run ("" on a single server): only
    # while that lease lives may anything of the run be written (see store/cluster.py).
    executor: str = ""
    # The run's own webhook (StartRunRequest.webhook_url): told of the run's end.
    webhook_url: str = ""
    # Live fields the agent moves (ctx.receive / ctx.ask, ctx.progress, ctx.usage).
    waiting_for_input: bool = False
    progress: RunProgress | None = None
    usage: Mapping[str, float] = field(default_factory=dict)
    resume_count: int = 0  # times it was resumed from a checkpoint

    def replace(self, **changes: Any) -> Run:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def expire_at(self, default_retention: float) -> datetime | None:
        """When the run and its log are purged: its end plus its own retention, else plus
        `default_retention` seconds; None while the run is active."""
        if self.ended_at is None:
            return None
        retention = default_retention if self.retention is None else self.retention
        return self.ended_at + timedelta(seconds=retention)


@dataclass(slots=True)
class RunEvent:
    """One entry of a run's log.

    At most one of `data`, `text`, `binary` and `value` is set; `value` is the JSON text
    of any JSON value (null included), the payload of external runs' JSON messages.
    `state` is set only on lifecycle events (type `run.state`), `error` only on the
    terminal event of a run that did not succeed.

    Not frozen only because a frozen dataclass costs four times as much to build, and one
    is built per event: nothing changes an event once it is queued for commit.
    """

    run_id: str
    seq: int
    at: datetime
    type: str
    data: Mapping[str, Any] | None = None
    text: str | None = None
    binary: bytes | None = None
    state: RunState | None = None
    error: RunFailure | None = None
    value: str | None = None
    # On the RUNNING event of a run resumed from a checkpoint: the seq the checkpoint covers.
    resumed_from_seq: int = 0
    # The event's encoded (wire) form, made once by the writer with the server's encoder
    # and shared by every subscriber. Opaque to the domain.
    wire: bytes | None = None

    @property
    def terminal(self) -> bool:
        """True for the last event of a finished run."""
        return self.state is not None and self.state.terminal


class EncodedEvent(NamedTuple):
    """An event as stored on the wire: what replay needs, without decoding it (a tuple,
    the cheapest object to build: replay makes one per row it reads)."""

    seq: int
    wire: bytes
    terminal: bool


encoded_event = functools.partial(tuple.__new__, EncodedEvent)
"""`encoded_event((seq, wire, terminal))`: an EncodedEvent built in C. The NamedTuple's own
constructor is a Python function, a measurable share of a replay's time, and one is built
per event a subscriber reads."""


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Which runs a listing or a watch selects; empty fields select everything."""

    states: frozenset[RunState] = frozenset()
    agent: str = ""
    thread_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    waiting_for_input: bool = False  # True: only runs whose agent waits for input

    def matches(self, run: Run) -> bool:
        """True when `run` passes every part of the filter."""
        return (
            (not self.states or run.state in self.states)
            and (not self.waiting_for_input or run.waiting_for_input)
            and (not self.agent or run.agent == self.agent)
            and (not self.thread_id or run.thread_id == self.thread_id)
            and all(run.labels.get(k) == v for k, v in self.labels.items())
        )


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose runs a query may see: one user's, or (for admins) everyone's.

    Every store query takes one; there is no default that means "all users".
    """

    user: str
    everyone: bool = False

    def allows(self, owner: str) -> bool:
        """True when a run owned by `owner` is visible in this scope."""
        return self.everyone or owner == self.user


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller; `expires_at` is when its credentials stop being valid.

    `read_only_run` is set for the bearer of a read token (CreateReadToken): the caller
    acts as `user`, the run's owner, but may only read that one run (see READ_TOKEN_CALLS).
    """

    user: str
    roles: frozenset[str] = frozenset()
    expires_at: datetime | None = None
    read_only_run: str | None = None

    @property
    def is_admin(self) -> bool:
        """True for callers with the `admin` role (never the bearer of a read token)."""
        return "admin" in self.roles and self.read_only_run is None

    def scope(self, *, all_users: bool = False) -> Scope:
        """The scope of this caller's queries; `all_users` is honoured for admins only."""
        return Scope(self.user, everyone=all_users and self.is_admin)

    def own_scope(self) -> Scope:
        """The scope for looking up a single run: admins see every run."""
        return Scope(self.user, everyone=self.is_admin)


READ_TOKEN_CALLS = frozenset({"GetRun", "Subscribe"})
"""The only RunService calls a read token authenticates (the HTTP edge's run and events
routes are these calls)."""


@dataclass(frozen=True, slots=True)
class StartRequest:
    """What a caller asks StartRun for, after validation."""

    agent: str
    input: Mapping[str, Any]
    thread_id: str = ""
    multitask_strategy: MultitaskStrategy = MultitaskStrategy.REJECT
    request_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    retention: float | None = None  # None: the server's default
    webhook_url: str = ""  # the run's own webhook, checked against --webhook-allow


@dataclass(frozen=True, slots=True)
class InputReceipt:
    """Stored with the `input` event at `seq`: SendInput's `request_id` was delivered."""

    run_id: str
    request_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The accumulated state of a run's output as of `seq` (`data`: JSON text)."""

    run_id: str
    seq: int
    data: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A resumable agent's state as of `seq` (`state`: JSON text), with how many inputs
    it had received and its snapshot state as of `seq` (JSON text, "" for none)."""

    run_id: str
    seq: int
    state: str
    inputs_used: int = 0
    snapshot: str = ""


Beside = InputReceipt | Snapshot | Checkpoint
"""What is stored beside a run's log, committed with the events before it."""


@dataclass(frozen=True, slots=True)
class PendingInput:
    """An input SendInput recorded that the run's executor has not appended yet."""

    run_id: str
    request_id: str
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class WatchUpdate:
    """One change reported by WatchRuns."""

    change: RunChange
    run: Run | None


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """An agent this server can run."""

    name: str
    description: str


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)
