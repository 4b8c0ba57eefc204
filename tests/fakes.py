"""Small, named fakes: a clock you move and agents a test can steer."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry import trace

from runservice.domain.errors import StoreError, StoreUnavailableError
from runservice.runtime.agent import AgentContext, EventTooLargeError, RunError, resumable


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        """The fake current time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Moves the clock forward."""
        self._now += timedelta(seconds=seconds)


GATES: dict[str, asyncio.Event] = {}
"""Gates that `gated` agents wait on, keyed by the `gate` input; tests open them."""


def gate(name: str) -> asyncio.Event:
    """The gate called `name` (created on first use)."""
    return GATES.setdefault(name, asyncio.Event())


async def gated(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits `before` events, waits for its gate, emits `after` events, returns.

    On cancellation it emits a `cleanup` event and returns a partial result.
    """
    before, after = int(input.get("before", 0)), int(input.get("after", 0))
    try:
        for i in range(before):
            await ctx.emit("step", data={"i": i + 1})
        await gate(str(input["gate"])).wait()
        for i in range(after):
            await ctx.emit("step", data={"i": before + i + 1})
    except asyncio.CancelledError:
        await ctx.emit("cleanup", text="saving partial output")
        return {"partial": True}
    return {"done": True}


async def refusing(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Fails deliberately with a message meant for the client."""
    raise RunError("the input names no such document")


TIMELINE: list[tuple[str, str]] = []
"""(what, run_id) pairs appended by `recorder` agents: ("start", id) and ("end", id)."""


async def recorder(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Records when it starts and ends in TIMELINE, yielding to the loop in between."""
    TIMELINE.append(("start", ctx.run_id))
    for _ in range(3):
        await asyncio.sleep(0)
    await ctx.emit("work", text="done")
    TIMELINE.append(("end", ctx.run_id))
    return {}


async def stubborn(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Ignores the first cancellation and keeps going: the server must abandon it.

    It gives in to the second one, so the test's event loop can still close.
    """
    await ctx.emit("started", text="not stopping")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(3600)
    return {}


async def poisoned(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits `before` steps, one `poison` event (which a FailingStore may refuse), then
    `after` steps, waiting for its gate (if any) between the two halves."""
    for i in range(int(input.get("before", 0))):
        await ctx.emit("step", data={"i": i + 1})
    if "gate" in input:
        await gate(str(input["gate"])).wait()
    await ctx.emit("poison", text="the store refuses this event")
    for i in range(int(input.get("after", 0))):
        await ctx.emit("step", data={"i": i + 1})
    return {"done": True}


class FailingStore:
    """A real store whose commits fail on cue.

    While `down` names a cause, every commit and probe fails as unavailable (a locked
    database, a full disk); `refuse` rejects for good any commit holding an event of that
    type (data the database will never take). Everything else goes to the real store.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down: str | None = None
        self.refuse: str | None = None
        self.failed_commits = 0

    async def commit(self, new_runs: Any, events: Any, updated_runs: Any, beside: Any = ()) -> None:
        """The real commit, unless the store is down or refuses one of the events."""
        if self.down is not None:
            self.failed_commits += 1
            raise StoreUnavailableError("database operation failed", self.down)
        if self.refuse is not None and any(e.type == self.refuse for e in events):
            self.failed_commits += 1
            raise StoreError("database refused the operation")
        await self.inner.commit(new_runs, events, updated_runs, beside)

    async def probe(self) -> None:
        """Fails while the store is down."""
        if self.down is not None:
            raise StoreUnavailableError("database operation failed", self.down)
        await self.inner.probe()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def traced(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Opens a span of its own, as an agent's LLM call would, and marks the run's span."""
    ctx.span.set_attribute("test.marked", True)
    with trace.get_tracer("tests.fakes").start_as_current_span("agent work") as span:
        span.set_attribute("test.step", 1)
        await ctx.emit("worked", data={"trace_id": f"{span.get_span_context().trace_id:032x}"})
    if input.get("fail"):
        raise RunError("traced failure")
    return {"ok": True}


async def collector(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Waits for its gate (if any), then receives `n` inputs, emitting each as `got`.

    Result: {"inputs": [each input, in the order received]}.
    """
    if "gate" in input:
        await gate(str(input["gate"])).wait()
    received = []
    for _ in range(int(input.get("n", 1))):
        data = await ctx.receive()
        await ctx.emit("got", data=dict(data))
        received.append(dict(data))
    return {"inputs": received}


async def worker(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Works `steps` steps, each after its gate `<gate>-<k>` opens: reports progress k of
    steps and usage tokens = 10 k, cost = k / 100. Result: {"steps": steps}."""
    steps = int(input["steps"])
    for k in range(1, steps + 1):
        await gate(f"{input['gate']}-{k}").wait()
        ctx.progress(k, steps, f"step {k}")
        ctx.usage(tokens=10 * k, cost=k / 100)
    return {"steps": steps}


@resumable
async def crasher(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits a `tick`, checkpoints, then kills its own server process (SIGKILL): every
    attempt, first run and resumes alike. For --max-resumes."""
    attempt = 0 if ctx.resumed_from is None else int(ctx.resumed_from["attempt"]) + 1
    await ctx.emit("tick", data={"attempt": attempt})
    await ctx.checkpoint({"attempt": attempt})
    await asyncio.sleep(0.2)  # the StartRun call that started it has its answer
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


async def fragile(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Not resumable: checkpoints, then waits for ever (a crash interrupts it)."""
    await ctx.emit("tick", data={"i": 1})
    await ctx.checkpoint({"i": 1})
    await asyncio.Event().wait()
    return {}


async def talker(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits `before` tokens (`t0 `, `t1 `, ...), waits for its gate if it names one, then
    emits `after` more, letting the loop run after each of those."""
    before, after = int(input.get("before", 0)), int(input.get("after", 0))
    for i in range(before):
        await ctx.emit("token", text=f"t{i} ")
    if "gate" in input:
        await gate(str(input["gate"])).wait()
    for i in range(before, before + after):
        await ctx.emit("token", text=f"t{i} ")
        await asyncio.sleep(0)
    return {}


async def noting(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits `count` tokens and, after token number `at`, records a snapshot of its own,
    {"tokens": at}; first it tries data that is not JSON, and data too large, and returns
    what each attempt raised."""
    refused = []
    for bad in ({1, 2}, "x" * int(input.get("too_large", 0))):
        try:
            ctx.snapshot(bad)
        except (TypeError, EventTooLargeError) as exc:
            refused.append(f"{type(exc).__name__}: {exc}")
    for i in range(1, int(input["count"]) + 1):
        await ctx.emit("token", text=f"n{i} ")
        if i == int(input["at"]):
            ctx.snapshot({"tokens": i})
    return {"refused": refused}
