"""The agent API: `agent(ctx, input) -> result`, and where agents come from.

An agent is an async callable. It reads its input (a JSON object), reports progress with
`await ctx.emit(...)`, and returns its result (a JSON object, or None). Cancellation (a
stop, a timeout, a shutdown) arrives as `asyncio.CancelledError`; an agent may catch it to
emit a last event and return a partial result, within the server's grace period. Raising
`RunError` fails the run with a message the client sees; any other exception fails it
with a sanitized error whose details go to the server log.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar

from runservice.domain.errors import UnknownAgentError
from runservice.domain.model import AgentInfo
from runservice.runtime.tracing import Span

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "runservice.agents"


class RunError(Exception):
    """Raised by an agent to fail its run with a message meant for the client."""


class EventTooLargeError(RunError, ValueError):
    """An event (or a snapshot's data) is larger than the server takes (--max-event-size).
    Uncaught, it fails the run with this message: the client sees what was too large."""

    def __init__(self, size: int, limit: int, what: str = "an event") -> None:
        super().__init__(f"{what} of {size} bytes (encoded) {over_limit(limit)}")
        self.size = size
        self.limit = limit


def over_limit(limit: int) -> str:
    """The end of a message about something larger than `limit` bytes."""
    return (
        f"exceeds this server's limit of {limit} bytes (--max-event-size); split it into "
        "smaller events, or store large data elsewhere and emit a reference"
    )


A = TypeVar("A")


def resumable(agent: A) -> A:
    """Declares an agent resumable: a run of it that the server stopped executing (a crash,
    a drain that had to interrupt it, a replica that died) is resumed from its last
    `ctx.checkpoint` instead of interrupted, the agent called again with
    `ctx.resumed_from` holding that checkpoint's state. The same as setting the agent's
    `resumable` attribute to True (so `--agent NAME=module:attr` registrations can be
    resumable too)."""
    agent.resumable = True  # type: ignore[attr-defined]
    return agent


def is_resumable(agent: object) -> bool:
    """True for an agent declared resumable (its `resumable` attribute is True)."""
    return getattr(agent, "resumable", False) is True


class RunClosedError(RuntimeError):
    """The run has ended; an abandoned agent can emit nothing more."""


class AgentContext(Protocol):
    """What a running agent can see and do."""

    @property
    def run_id(self) -> str:
        """The run's identifier."""
        ...

    @property
    def owner(self) -> str:
        """The user who started the run."""
        ...

    @property
    def thread_id(self) -> str:
        """The run's thread, or an empty string."""
        ...

    @property
    def labels(self) -> Mapping[str, str]:
        """The run's labels."""
        ...

    @property
    def span(self) -> Span:
        """The run's OpenTelemetry span, current while the agent runs: spans the agent
        opens are its children, in the trace of the StartRun call. A no-op span while
        tracing is off."""
        ...

    async def emit(
        self,
        type: str,
        *,
        data: Mapping[str, Any] | None = None,
        text: str | None = None,
        binary: bytes | None = None,
        at: datetime | None = None,
    ) -> int:
        """Appends an event to the run's log and returns its `seq`.

        At most one payload is given. Waits when the log's writer is behind (backpressure).
        Raises EventTooLargeError (taking no seq) for an event over the server's
        --max-event-size, and RunClosedError once the run has ended.
        """
        ...

    def save_partial(self, result: Mapping[str, Any]) -> None:
        """Records output to keep if the run is stopped, interrupted or times out."""
        ...

    def snapshot(self, data: Any) -> None:
        """Records the state of the run's output as of its last event: `data`, any JSON
        value, is what a client would have after applying every event so far. Subscribe
        with `snapshot` sends the latest one stored, then only the events after it.

        Stored as the run goes (at most every --snapshot-every events or 256 KiB of them,
        and at the run's end: the latest data wins), never as an event. From the first
        call on, the run's snapshots are the agent's: the built-in reducer of `token`
        text events makes none. Raises TypeError or ValueError for data that is not JSON,
        EventTooLargeError for data over the server's --max-event-size (as JSON), and
        RunClosedError once the run has ended.
        """
        ...

    async def receive(self, timeout: float | None = None) -> Mapping[str, Any]:  # noqa: ASYNC109
        """The next input sent to the run with SendInput, in the order of the run's log,
        whether it arrived before or after this call; waits for one while there is none
        (the run's `waiting_for_input` is true meanwhile). Raises TimeoutError after
        `timeout` seconds (None: no limit)."""
        ...

    async def ask(
        self,
        prompt: str = "",
        *,
        data: Mapping[str, Any] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the agent API's own deadline
    ) -> Mapping[str, Any]:
        """Appends an `input.requested` event, whose data is {"prompt": prompt} with
        `data`'s fields, so that every subscriber sees the run waits and for what; then
        returns the next input, as receive() does."""
        ...

    def progress(self, done: float, total: float = 0, message: str = "") -> None:
        """Reports the run's progress: `done` of `total` (0: unknown), with a short message.
        Updates the run's `progress` (GetRun, ListRuns, WatchRuns), not its log."""
        ...

    def usage(self, **counters: float) -> None:
        """Reports running totals of what the run consumed, e.g. `input_tokens=1200,
        cost_usd=0.03`: each counter as last reported. Updates the run's `usage`."""
        ...

    async def checkpoint(self, state: Any) -> None:
        """Stores `state` (any JSON value) beside the run's log, as of the last event the
        agent emitted and with its place in the inputs, committed with the events before
        it; returns once committed. A resumable agent's run that the server stopped
        executing resumes from its latest checkpoint."""
        ...

    @property
    def resumed_from(self) -> Any:
        """The state of the checkpoint this execution resumes from; None on a first run."""
        ...


Agent = Callable[[AgentContext, Mapping[str, Any]], Coroutine[Any, Any, Mapping[str, Any] | None]]


class AgentRegistry:
    """The agents a server can run, by name."""

    def __init__(self) -> None:
        self._agents: dict[str, tuple[Agent, str]] = {}

    def register(self, name: str, agent: Agent, description: str | None = None) -> None:
        """Adds (or replaces) the agent called `name`."""
        if not inspect.iscoroutinefunction(agent) and not inspect.iscoroutinefunction(
            getattr(agent, "__call__", None)  # noqa: B004 - callable objects with async __call__
        ):
            raise TypeError(f"agent {name!r} must be an async callable")
        doc = description if description is not None else _first_paragraph(agent.__doc__)
        self._agents[name] = (agent, doc)

    def load_entry_points(self) -> None:
        """Registers every agent installed under the `runservice.agents` entry-point group."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            self.register(ep.name, ep.load())

    def load_spec(self, spec: str) -> None:
        """Registers `NAME=module:attr`."""
        name, sep, target = spec.partition("=")
        module_name, colon, attr = target.partition(":")
        if not sep or not colon or not name or not module_name or not attr:
            raise ValueError(f"agent spec {spec!r} is not NAME=module:attr")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        self.register(name, obj)

    def get(self, name: str) -> Agent:
        """The agent called `name`; UnknownAgentError when there is none."""
        try:
            return self._agents[name][0]
        except KeyError:
            raise UnknownAgentError(name, sorted(self._agents)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    def infos(self) -> list[AgentInfo]:
        """Every agent's name and description, sorted by name."""
        return [AgentInfo(n, d) for n, (_, d) in sorted(self._agents.items())]


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
