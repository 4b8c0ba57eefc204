"""Typed errors: one exception class per status code, with the ErrorInfo reason attached."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "runservice"


class RunServiceError(Exception):
    """A call failed. `code` is the gRPC status, `reason` the ErrorInfo reason (or "").

    `metadata` carries the ErrorInfo metadata (e.g. `field`, `last_seq`, `error_id`).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.reason = reason
        self.metadata = metadata or {}

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"


class InvalidArgumentError(RunServiceError):
    """INVALID_ARGUMENT: a request field was refused (reason names which kind)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(RunServiceError):
    """NOT_FOUND: the run does not exist or is not yours."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(RunServiceError):
    """ALREADY_EXISTS: the request_id was used for a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(RunServiceError):
    """FAILED_PRECONDITION: the thread is busy, or the run is still active."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRangeError(RunServiceError):
    """OUT_OF_RANGE: a cursor past the end of a run's log."""

    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhaustedError(RunServiceError):
    """RESOURCE_EXHAUSTED: a cap on runs or streams, or a message too large."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(RunServiceError):
    """UNAUTHENTICATED: missing, invalid or expired credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RunServiceError):
    """PERMISSION_DENIED: the request needs the admin role."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(RunServiceError):
    """UNAVAILABLE: the server is draining or unreachable; retrying later can succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(RunServiceError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AbortedError(RunServiceError):
    """ABORTED: e.g. a WatchRuns stream that fell behind; reopen it."""

    code = grpc.StatusCode.ABORTED


class InternalError(RunServiceError):
    """INTERNAL: a server error; `metadata["error_id"]` finds it in the server log."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[RunServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        OutOfRangeError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        AbortedError,
        InternalError,
    )
}


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The runservice ErrorInfo detail of a failed call, if it carries one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None


def from_rpc_error(error: grpc.aio.AioRpcError) -> RunServiceError:
    """The typed error for a failed call."""
    code = error.code()
    info = error_info(error)
    cls = _BY_CODE.get(code, RunServiceError)
    return cls(
        error.details() or code.name,
        code=code,
        reason=info.reason if info is not None else "",
        metadata=dict(info.metadata) if info is not None else {},
    )


def is_transient(error: grpc.aio.AioRpcError) -> bool:
    """True for failures a resumed stream can ride through.

    UNAVAILABLE (draining, restarting, unreachable) and DEADLINE_EXCEEDED (a per-attempt
    deadline on a long stream) always; INTERNAL, UNKNOWN and CANCELLED only when they come
    from the transport (a reset connection), i.e. carry no runservice ErrorInfo.
    """
    code = error.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    transport_codes = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
    return code in transport_codes and error_info(error) is None
