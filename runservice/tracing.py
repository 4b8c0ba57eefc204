"""OpenTelemetry tracing for the server (the `tracing` extra), set up by the standard
OTEL_* variables.

Tracing is on when any of these holds, unless OTEL_SDK_DISABLED is true:
- OTEL_TRACES_EXPORTER names an exporter: `otlp` (over gRPC) or `console` (`none`: off);
- an OTLP endpoint is set: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT.
A program that embeds the server and has set an SDK tracer provider of its own keeps it.

The exporter reads its own variables (OTEL_EXPORTER_OTLP_*: endpoint, headers, timeout,
certificate), the resource its own (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES; the
service name defaults to `runservice`), the sampler OTEL_TRACES_SAMPLER and the batch
processor OTEL_BSP_*. W3C trace context (`traceparent`) is read from each call's metadata.

What is traced: a server span per RPC (OpenTelemetry's gRPC instrumentation), and a span
per run (runservice/runtime/tracing.py) under the StartRun span that made it.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace

logger = logging.getLogger(__name__)

_ON_VALUES = ("otlp", "console")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTALL_HINT = "pip install 'runservice[tracing]'"


class TracingSetupError(RuntimeError):
    """Tracing was asked for and cannot be set up (the extra is missing, a bad value)."""


class Tracing:
    """Tracing as set up for one server: its RPC interceptors, and a flush at the end."""

    def __init__(self, provider: Any, *, owned: bool) -> None:
        self._provider = provider
        self._owned = owned  # set up here (else the embedding process owns it)

    def interceptors(self) -> list[Any]:
        """The server interceptors: one server span per RPC, in the caller's trace."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor  # noqa: PLC0415

        return [
            aio_server_interceptor(tracer_provider=self._provider),  # type: ignore[no-untyped-call]
            _StreamsAsGenerators(),
        ]

    def shutdown(self) -> None:
        """Exports the spans still buffered (the batch processor's), then stops."""
        if self._owned:
            self._provider.shutdown()


class _StreamsAsGenerators(grpc.aio.ServerInterceptor):
    """Presents each server-streaming handler as an async generator, the one form the
    OpenTelemetry interceptor (placed before this one) can wrap. The handlers here write
    their responses with `context.write` (runservice/api/status.py `wrap_stream`); as a
    generator that yields nothing they still do, within the RPC's span."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_stream is None:
            return handler
        behavior: Callable[..., Any] = handler.unary_stream
        if inspect.isasyncgenfunction(behavior):
            return handler

        async def as_generator(request: Any, context: Any) -> AsyncIterator[Any]:
            await behavior(request, context)
            nothing: tuple[Any, ...] = ()
            for item in nothing:  # makes this a generator that yields nothing
                yield item

        return grpc.unary_stream_rpc_method_handler(
            as_generator,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _wanted(environ: Mapping[str, str]) -> bool:
    """True when the OTEL_* variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter:
        if exporter not in _ON_VALUES:
            raise TracingSetupError(
                f"OTEL_TRACES_EXPORTER={exporter!r} is not supported here: use otlp, "
                "console or none"
            )
        return True
    return any(environ.get(name, "").strip() for name in _ENDPOINTS)


def start_tracing(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Sets tracing up as the OTEL_* variables say; None when it is off.

    Raises TracingSetupError when tracing is asked for but the extra is not installed.
    """
    env = os.environ if environ is None else environ
    if not _wanted(env):
        return None
    try:
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    except ImportError:
        raise TracingSetupError(
            f"tracing is configured (OTEL_* variables) but not installed: {INSTALL_HINT}"
        ) from None
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):  # set by the program that embeds the server
        return Tracing(current, owned=False)
    provider = _provider_from(env)
    trace.set_tracer_provider(provider)
    logger.info(
        "tracing on: exporting spans to %s",
        env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp",
    )
    return Tracing(provider, owned=True)


def _provider_from(env: Mapping[str, str]) -> Any:
    try:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor  # noqa: F401, PLC0415
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        raise TracingSetupError(f"tracing needs the tracing extra: {INSTALL_HINT}") from None
    exporter: SpanExporter
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )
        except ImportError:
            raise TracingSetupError(
                f"OTLP export needs the tracing extra: {INSTALL_HINT}"
            ) from None
        exporter = OTLPSpanExporter()
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "runservice"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
