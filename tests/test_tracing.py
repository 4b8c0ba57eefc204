"""Tracing: the StartRun call's span, the run's span and the spans an agent opens share
the caller's trace (W3C traceparent); spans reach an OTLP collector; bad settings are
refused at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import Harness
from tests.helpers import read_all, struct
from tests.serverproc import bearer, start_server, wait_for

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider() -> Iterator[TracerProvider]:
    """This process's tracer provider, as a program embedding the server would set it."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        current.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(current)
    yield current
    EXPORTER.clear()


@pytest.fixture
async def traced_server(
    provider: TracerProvider,
    make_server: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Harness]:
    """A server with tracing on (OTEL_TRACES_EXPORTER set; the provider above is used)."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    EXPORTER.clear()
    yield await make_server()


def _client_span(name: str) -> tuple[trace.Span, tuple[tuple[str, str], ...]]:
    """A span of the calling program and the metadata that carries its context."""
    span = trace.get_tracer("tests").start_span(name, kind=SpanKind.CLIENT)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    assert "traceparent" in carrier
    return span, tuple(carrier.items())


def _spans(name: str) -> list[ReadableSpan]:
    return [s for s in EXPORTER.get_finished_spans() if s.name == name]


async def test_start_run_span_run_span_and_agent_span_share_the_callers_trace(
    traced_server: Harness,
) -> None:
    alice = traced_server.caller("alice")
    client_span, carrier = _client_span("caller")
    response = await alice.StartRun(
        pb.StartRunRequest(agent="traced", input=struct()),
        metadata=alice.metadata + carrier,
    )
    client_span.end()
    run_id = response.run.run_id
    events = await read_all(alice, run_id)
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    trace_id = client_span.get_span_context().trace_id

    def run_span_ended() -> list[ReadableSpan]:
        return [s for s in _spans("run traced") if s.attributes["runservice.run_id"] == run_id]

    (run_span,) = await wait_for(run_span_ended, message="the run's span never ended")
    starts = [s for s in _spans("/runservice.v1.RunService/StartRun")]
    start_span = next(s for s in starts if s.context.trace_id == trace_id)
    (agent_span,) = [s for s in _spans("agent work") if s.context.trace_id == trace_id]

    # One trace: caller → StartRun (server) → run → the agent's own span.
    assert start_span.kind is SpanKind.SERVER
    assert start_span.parent is not None
    assert start_span.parent.span_id == client_span.get_span_context().span_id
    assert run_span.context.trace_id == trace_id
    assert run_span.parent is not None and run_span.parent.span_id == start_span.context.span_id
    assert agent_span.parent is not None
    assert agent_span.parent.span_id == run_span.context.span_id
    # The agent saw its span's trace; ctx.span was the run's span.
    worked = next(e for e in events if e.type == "worked")
    assert dict(worked.data)["trace_id"] == f"{trace_id:032x}"
    assert run_span.attributes["test.marked"] is True
    # The run's span carries its lifecycle and its outcome.
    states = [e.attributes["runservice.state"] for e in run_span.events]
    assert states == ["RUNNING", "SUCCEEDED"]
    assert run_span.attributes["runservice.agent"] == "traced"
    assert run_span.attributes["runservice.last_seq"] == events[-1].seq
    assert run_span.status.status_code is StatusCode.UNSET


async def test_a_failed_run_s_span_is_an_error_and_a_refused_call_s_span_has_its_code(
    traced_server: Harness,
) -> None:
    alice = traced_server.caller("alice")
    response = await alice.StartRun(pb.StartRunRequest(agent="traced", input=struct(fail=1)))
    run_id = response.run.run_id
    events = await read_all(alice, run_id)
    assert events[-1].state == run_pb2.RUN_STATE_FAILED

    def ended() -> list[ReadableSpan]:
        return [s for s in _spans("run traced") if s.attributes["runservice.run_id"] == run_id]

    (run_span,) = await wait_for(ended)
    assert run_span.status.status_code is StatusCode.ERROR
    assert run_span.status.description == "traced failure"
    # A refused call's server span records its gRPC code.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await alice.GetRun(pb.GetRunRequest(run_id="01a243f3-4381-7145-ad58-e965f68c706a"))
    code = refused.value.code()

    def get_spans() -> list[ReadableSpan]:
        return [
            s
            for s in _spans("/runservice.v1.RunService/GetRun")
            if s.attributes.get("rpc.grpc.status_code") == code.value[0]
        ]

    # NOT_FOUND is the caller's problem: by OpenTelemetry's conventions not a server error.
    assert code is grpc.StatusCode.NOT_FOUND
    (get_span,) = await wait_for(get_spans)
    assert get_span.status.status_code is StatusCode.UNSET


async def test_runs_get_no_recording_span_while_tracing_is_off(server: Harness) -> None:
    """Without the OTEL_* variables the server installs no interceptor: no StartRun span."""
    alice = server.caller("alice")
    client_span, carrier = _client_span("caller-off")
    response = await alice.StartRun(
        pb.StartRunRequest(agent="ticker", input=struct(count=1)),
        metadata=alice.metadata + carrier,
    )
    client_span.end()
    await read_all(alice, response.run.run_id)
    trace_id = client_span.get_span_context().trace_id
    assert not [
        s for s in _spans("/runservice.v1.RunService/StartRun") if s.context.trace_id == trace_id
    ]


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get(
                "service.name"
            )
            for scope in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_collector_named_by_the_standard_variables(
    tmp_path: Path,
) -> None:
    collector = _Collector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = add_token(data_dir / "tokens.toml", "alice", [])
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "runservice-test",
    }
    server = await start_server(data_dir, env=env, args=["--log-format", "json"])
    try:
        async with grpc.aio.insecure_channel(server.addr) as channel:
            stub = pb_grpc.RunServiceStub(channel)
            traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            response = await stub.StartRun(
                pb.StartRunRequest(agent="ticker", input=struct(count=3, interval=0)),
                metadata=(*bearer(token), ("traceparent", traceparent)),
            )
            run_id = response.run.run_id
            stream = stub.Subscribe(pb.SubscribeRequest(run_id=run_id), metadata=bearer(token))
            async for _ in stream:
                pass

        def exported() -> dict[str, Any]:
            by_name = {span.name: span for _, span in collector.spans}
            if "run ticker" in by_name and "/runservice.v1.RunService/StartRun" in by_name:
                return by_name
            return {}

        by_name = await wait_for(exported, limit=15, message="no spans reached the collector")
    finally:
        await server.terminate()
        await receiver.stop(0)
    start, run = by_name["/runservice.v1.RunService/StartRun"], by_name["run ticker"]
    assert start.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert start.parent_span_id.hex() == "b7ad6b7169203331"
    assert run.trace_id == start.trace_id and run.parent_span_id == start.span_id
    assert {service for service, _ in collector.spans} == {"runservice-test"}
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    assert any(line["message"].startswith("tracing on") for line in lines)
    # The run's end line names its trace and span: logs lead to the trace.
    (end,) = [line for line in lines if line.get("run_id") == run_id and "ended" in line["message"]]
    assert end["trace_id"] == start.trace_id.hex()
    assert end["span_id"] == run.span_id.hex()


def test_an_unknown_exporter_is_refused_at_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "runservice", "serve", "--listen", "127.0.0.1:0"],
        env={
            **_base_env(),
            "RUNSERVICE_DATA_DIR": str(tmp_path / "data"),
            "OTEL_TRACES_EXPORTER": "zipkin",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "OTEL_TRACES_EXPORTER='zipkin' is not supported here" in result.stderr
    assert "Traceback" not in result.stderr


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RUNSERVICE_"))}
