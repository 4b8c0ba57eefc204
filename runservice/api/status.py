"""The one table from domain errors to gRPC statuses, and the wrapper that applies it.

Handlers raise domain errors; the wrapper turns them into a status code, a message and a
`google.rpc.ErrorInfo` detail (domain `runservice`). It catches inside streaming handlers
too, where errors raised mid-stream would escape a wrapper that only awaits. Unknown
exceptions become INTERNAL with an error id; their text goes to the log, never the wire.

`describe` is the one answer to "what does a caller learn of this exception": the gRPC
edge sends it as a status, the HTTP edge (runservice/web) as a problem+json document.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from runservice.api.limits import StreamLimiter
from runservice.domain import errors
from runservice.domain.model import Principal

logger = logging.getLogger(__name__)

DOMAIN = "runservice"

# Most specific class first: the first match wins.
STATUS_TABLE: tuple[tuple[type[errors.RunServiceError], grpc.StatusCode], ...] = (
    (errors.RunNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.UnknownAgentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidPageTokenError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.SeqOutOfRangeError, grpc.StatusCode.OUT_OF_RANGE),
    (errors.ThreadBusyError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RunActiveError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RunEndedError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ExternalRunInputError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RequestIdReusedError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.TooManyActiveRunsError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.TooManyStreamsError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ServerDrainingError, grpc.StatusCode.UNAVAILABLE),
    (errors.DatabaseUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.StreamStalledError, grpc.StatusCode.UNAVAILABLE),
    (errors.AdminOnlyError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ReadTokenScopeError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.WatchLaggedError, grpc.StatusCode.ABORTED),
    (errors.StreamClosedError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ProducerEpochStaleError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ProducerSeqGapError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.StreamSeqConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.StreamExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.ContentTypeMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.TooManyOpenStreamsError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StreamDeletedError, grpc.StatusCode.NOT_FOUND),
    (errors.NotExternalError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: errors.RunServiceError) -> grpc.StatusCode:
    """The gRPC code for a domain error."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def rich_status(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]
) -> grpc.Status:
    """A status whose details carry an ErrorInfo."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return rpc_status.to_status(proto)


@dataclass(frozen=True)
class ErrorDescription:
    """What a caller learns of an error, whichever edge it called: the gRPC code, the
    message, and the ErrorInfo's reason and metadata (its domain is DOMAIN)."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]


def describe(exc: BaseException) -> ErrorDescription:
    """What a caller learns of `exc`.

    A store that cannot be reached or read now is UNAVAILABLE (STORE_UNAVAILABLE) with its
    cause in words (never the driver's text), so clients retry or resume as for any
    UNAVAILABLE. Any other exception that is not a domain error is INTERNAL with a new
    error id: logged here, once, with its traceback; its text never reaches the caller.
    """
    if isinstance(exc, errors.StoreUnavailableError):
        exc = errors.DatabaseUnavailableError(exc.cause)
    if isinstance(exc, errors.RunServiceError):
        return ErrorDescription(status_for(exc), exc.message, exc.reason, dict(exc.metadata))
    error_id = uuid.uuid4().hex[:16]
    logger.error("internal error %s", error_id, exc_info=exc, extra={"error_id": error_id})
    return ErrorDescription(
        grpc.StatusCode.INTERNAL,
        f"internal error (error id {error_id}); the server log has the details",
        "INTERNAL_ERROR",
        {"error_id": error_id},
    )


def to_status(exc: BaseException) -> grpc.Status:
    """The status a client sees for `exc` (see `describe`)."""
    found = describe(exc)
    return rich_status(found.code, found.message, found.reason, found.metadata)


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """Ends the RPC with the status for `exc` (raises AbortError)."""
    status = to_status(exc)
    await context.abort(status.code, status.details, status.trailing_metadata)


class MalformedRequest:
    """Stands in for a request message that did not decode; refused after authentication."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: grpc would answer UNKNOWN with its text."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, recursion limits, invalid UTF-8
            return MalformedRequest(exc)

    return deserialize


def _check_decoded(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise errors.InvalidArgumentError(
            "request", "is not a valid protobuf message for this method (or nests too deeply)"
        )


Prepare = Callable[[grpc.aio.ServicerContext[Any, Any]], Principal]
"""Authenticates the call (raising AuthenticationError) and returns its principal."""


def wrap_unary(behavior: Callable[..., Any], prepare: Prepare) -> Callable[..., Any]:
    """A unary behaviour that authenticates first, then maps raised errors to statuses."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            prepare(context)
            _check_decoded(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc)

    return unary


def wrap_stream(
    behavior: Callable[..., AsyncGenerator[Any, None]],
    prepare: Prepare,
    streams: StreamLimiter,
    stall_timeout: float,
) -> Callable[..., Awaitable[None]]:
    """A server-streaming behaviour: authenticated, capped per user, ended when the
    credentials expire (UNAUTHENTICATED, TOKEN_EXPIRED) or when the client takes nothing
    for `stall_timeout` seconds (UNAVAILABLE, STREAM_STALLED), errors mapped to statuses.

    The handler writes each response itself (grpc.aio's reader/writer form) so that a
    write can be timed. A write completes once the client's flow-control window has taken
    the whole message, and the next item is produced only then: a client that stops
    reading stops the stream where it is, holding one message.
    """

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        principal: Principal | None = None
        try:
            principal = prepare(context)
            _check_decoded(request)
            with streams.hold(principal.user):
                async with contextlib.aclosing(behavior(request, context)) as produced:
                    await _write_all(context, until_expiry(produced, principal), stall_timeout)
        except grpc.aio.AbortError:
            raise
        except errors.StreamStalledError as exc:
            await _end_stalled(context, exc, principal)
        except Exception as exc:
            await abort(context, exc)

    return stream


async def _write_all(
    context: grpc.aio.ServicerContext[Any, Any],
    items: AsyncGenerator[Any, None],
    stall_timeout: float,
) -> None:
    """Writes every item; raises StreamStalledError when one is not taken in time."""
    async with contextlib.aclosing(items):
        sent_headers = False
        async for item in items:
            # The headers go first, on their own: a status can then follow a write that
            # never completed (grpc.aio would otherwise send them again, and fail).
            if not sent_headers:
                await _within(context.send_initial_metadata(()), stall_timeout)
                sent_headers = True
            await _within(context.write(item), stall_timeout)


async def _within(write: Awaitable[None], stall_timeout: float) -> None:
    try:
        async with asyncio.timeout(stall_timeout):
            await write
    except TimeoutError:
        raise errors.StreamStalledError(
            stall_timeout,
            "read faster, or resume from your last seq + 1 (WatchRuns: open a new watch)",
        ) from None
    except grpc.aio.InternalError:
        # The call is over (the client left, or the server is stopping): there is nobody to
        # tell, and grpc.aio ends a cancelled call quietly.
        raise asyncio.CancelledError from None


async def _end_stalled(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: errors.StreamStalledError,
    principal: Principal | None,
) -> None:
    """Ends a stalled stream. Its status waits behind the message still being written:
    the client sees it after the data it has, whenever it reads again."""
    user = principal.user if principal is not None else "?"
    logger.info("ended a stream of user %s: %s", user, exc.message)
    # The client may leave before its status can be sent: then nothing is owed to it.
    with contextlib.suppress(grpc.aio.InternalError):
        await abort(context, exc)


async def until_expiry(
    items: AsyncIterator[Any], principal: Principal
) -> AsyncGenerator[Any, None]:
    """`items` until the principal's credentials expire: then TokenExpiredError (both
    edges end a stream there; the caller refreshes its credentials and resumes)."""
    if principal.expires_at is None:
        async for item in items:
            yield item
        return
    loop = asyncio.get_running_loop()
    left = (principal.expires_at - datetime.now(UTC)).total_seconds()
    deadline = loop.time() + left
    iterator = aiter(items)
    try:
        while True:
            timeout = asyncio.timeout_at(deadline)
            try:
                async with timeout:
                    item = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not timeout.expired():
                    raise
                raise errors.TokenExpiredError(
                    "the credentials of this stream have expired; refresh them and resume "
                    "from your last seq + 1"
                ) from None
            yield item
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
