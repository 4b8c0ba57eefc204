"""The error vocabulary: every domain error maps to a code and a reason the proto declares."""

from __future__ import annotations

import grpc
import pytest

from runservice.api import status
from runservice.api.convert import STATE_FROM_PROTO, STATE_TO_PROTO
from runservice.domain import errors
from runservice.domain.model import RunState
from runservice.v1 import error_reason_pb2, run_pb2

REASONS = {
    name.removeprefix("ERROR_REASON_")
    for name in error_reason_pb2.ErrorReason.keys()  # noqa: SIM118 - an enum wrapper, not a dict
}


def _all_error_classes() -> list[type[errors.RunServiceError]]:
    found, todo = [], [errors.RunServiceError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_reason_is_declared_in_the_proto(cls: type[errors.RunServiceError]) -> None:
    """Each domain error's reason is a value of the ErrorReason enum."""
    assert cls.reason in REASONS


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.RunNotFoundError("r"), grpc.StatusCode.NOT_FOUND),
        (errors.UnknownAgentError("a", ["echo"]), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InvalidArgumentError("f", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InvalidInputError("input", "big"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InvalidPageTokenError(), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.SeqOutOfRangeError("r", 9, 3), grpc.StatusCode.OUT_OF_RANGE),
        (errors.ThreadBusyError("t", "r"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.RunActiveError("r", "x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.RequestIdReusedError("q", "r"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.TooManyActiveRunsError("cap"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.TooManyStreamsError("cap"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ServerDrainingError(), grpc.StatusCode.UNAVAILABLE),
        (errors.AdminOnlyError("x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.AuthenticationError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.CredentialsMissingError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.TokenExpiredError("x"), grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_each_domain_error_maps_to_its_status_code(
    error: errors.RunServiceError, code: grpc.StatusCode
) -> None:
    """The one table gives each domain error the code DESIGN §2 names."""
    assert status.status_for(error) == code
    assert status.to_status(error).code == code


def test_unknown_exceptions_become_internal_without_their_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected exception is INTERNAL with an error id; its text stays in the log."""
    result = status.to_status(ValueError("secret detail /etc/passwd"))
    assert result.code == grpc.StatusCode.INTERNAL
    assert "secret" not in result.details and "error id" in result.details
    assert "secret detail" in caplog.text


def test_a_store_that_cannot_be_reached_is_unavailable_with_its_cause_only() -> None:
    """A store error worth retrying is UNAVAILABLE (STORE_UNAVAILABLE) naming the cause in
    words; the driver's own text never reaches the client."""
    try:
        raise OSError("connection refused to 10.0.0.7:5432 as user secret_admin")
    except OSError as driver:
        try:
            raise errors.StoreUnavailableError(
                "read failed", "the database cannot be reached"
            ) from driver
        except errors.StoreUnavailableError as exc:
            result = status.to_status(exc)
    assert result.code == grpc.StatusCode.UNAVAILABLE
    assert "the database cannot be reached" in result.details
    assert "secret_admin" not in result.details and "10.0.0.7" not in result.details


def test_every_proto_run_state_has_a_domain_twin() -> None:
    """RunState values map one to one between proto and domain (UNSPECIFIED excepted)."""
    proto_values = set(run_pb2.RunState.values()) - {run_pb2.RUN_STATE_UNSPECIFIED}
    assert set(STATE_FROM_PROTO) == proto_values
    assert set(STATE_TO_PROTO) == set(RunState)
