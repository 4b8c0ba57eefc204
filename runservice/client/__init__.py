"""The Python client of runservice: AsyncRunClient and its blocking twin RunClient."""

from runservice.client.aio import TERMINAL_STATES, AsyncRunClient, RetryPolicy, TLSConfig
from runservice.client.errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RunServiceError,
    UnauthenticatedError,
    UnavailableError,
)
from runservice.client.sync import RunClient

__all__ = [
    "TERMINAL_STATES",
    "AbortedError",
    "AlreadyExistsError",
    "AsyncRunClient",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RunClient",
    "RunServiceError",
    "TLSConfig",
    "UnauthenticatedError",
    "UnavailableError",
]
