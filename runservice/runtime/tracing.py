"""A run's trace: one span covering its life, a child of the StartRun call that made it.

Only the OpenTelemetry API is used here. Until a tracer provider is configured (the
tracing extra, see runservice/tracing.py) every span is a no-op and costs next to nothing.

The run's span is current while its agent runs, so the spans an agent opens itself (an LLM
call, a tool) join the caller's trace with no work from the agent; `ctx.span` hands it the
run's span for attributes and events of its own. The context of the call that started the
run is taken when the run is admitted (`parent_context`), since runs decided in the
database are admitted by another task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from runservice.domain.model import Run, RunFailure, RunState

__all__ = ["NO_SPAN", "TRACER", "Context", "Span", "parent_context", "record_state", "run_span"]

TRACER = trace.get_tracer("runservice")
"""A proxy: it follows whichever tracer provider is set, even one set after import."""

Context = otel_context.Context

NO_SPAN: Span = trace.INVALID_SPAN
"""A run's span before it runs, and with tracing off: records nothing."""

_ERROR_STATES = frozenset({RunState.FAILED, RunState.TIMED_OUT, RunState.INTERRUPTED})


def parent_context() -> Context:
    """The current trace context: the StartRun call's server span, when tracing is on."""
    return otel_context.get_current()


@contextlib.contextmanager
def run_span(run: Run, parent: Context | None) -> Iterator[Span]:
    """The run's span, current inside; ended on leaving. Its events are the run's
    lifecycle states (`state_changed`) and its status is ERROR when the run failed,
    timed out or was interrupted."""
    span = TRACER.start_span(
        f"run {run.agent}",
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes={
            "runservice.run_id": run.run_id,
            "runservice.agent": run.agent,
            "runservice.thread_id": run.thread_id,
        },
    )
    with trace.use_span(span, end_on_exit=True, record_exception=False):
        yield span


def record_state(
    span: Span, state: RunState, seq: int | None = None, failure: RunFailure | None = None
) -> None:
    """Adds a lifecycle state of the run to its span; a terminal one also sets the span's
    status (ERROR when the run failed, timed out or was interrupted)."""
    if not span.is_recording():
        return
    attributes: dict[str, str | int] = {"runservice.state": state.value}
    if seq is not None:
        attributes["runservice.seq"] = seq
    if failure is not None:
        attributes["runservice.error.code"] = failure.code
        attributes["runservice.error.message"] = failure.message
    span.add_event("state_changed", attributes)
    if state.terminal:
        span.set_attribute("runservice.state", state.value)
        if seq is not None:
            span.set_attribute("runservice.last_seq", seq)
        if state in _ERROR_STATES:
            span.set_status(Status(StatusCode.ERROR, failure.message if failure else state.value))
