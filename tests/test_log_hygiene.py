"""Log hygiene: credentials and large inputs never reach the server's log records.

Each test records everything logged at DEBUG (the `runservice` loggers and the root
logger, so third-party libraries too) across a session of calls: successful ones, refused
credentials, inputs carrying a 100 KB string with a unique marker, agents that fail, and
a StopRun. Then it searches every record: message, raw arguments, exception and stack
text.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass

import grpc
import pytest

from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import Harness, wait_for
from tests.helpers import TERMINAL, read_all, read_until

BIG = 100 * 1024


@dataclass(frozen=True)
class Session:
    """What a session sent that must stay out of the log."""

    tokens: tuple[str, ...]
    marker: str


def _texts(record: logging.LogRecord) -> list[str]:
    """Everything a handler could write for `record`."""
    parts = [str(record.msg), repr(record.args)]
    with contextlib.suppress(TypeError, ValueError):  # msg and args are searched anyway
        parts.append(record.getMessage())
    if record.exc_info:
        parts.append(logging.Formatter().formatException(record.exc_info))
    if record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return parts


def _big(marker: str) -> str:
    return (marker + " ") * (BIG // (len(marker) + 1) + 1)


async def _finished(server: Harness, run_id: str) -> run_pb2.Run:
    alice = server.caller("alice")

    async def done() -> run_pb2.Run | None:
        run = (await alice.GetRun(pb.GetRunRequest(run_id=run_id))).run
        return run if run.state in TERMINAL else None

    result: run_pb2.Run = await wait_for(done)
    return result


async def _refused(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("the call was not refused")


async def _session(server: Harness) -> Session:
    """Successful calls, refused credentials, a 100 KB marked input, failing agents, a stop."""
    marker = f"LEAKMARK{uuid.uuid4().hex}"
    garbage = f"garbage-{uuid.uuid4().hex}"
    alice = server.caller("alice")
    root = server.caller("root")

    def request(agent: str, **input: object) -> pb.StartRunRequest:
        message = pb.StartRunRequest(agent=agent)
        message.input.update(input)
        return message

    # Successful calls, with a large marked input.
    run = (await alice.StartRun(request("echo", text="hello world", blob=_big(marker)))).run
    await read_all(alice, run.run_id)
    await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))
    await alice.ListRuns(pb.ListRunsRequest())
    await root.ListRuns(pb.ListRunsRequest(all_users=True))
    await alice.ListAgents(pb.ListAgentsRequest())
    watch = alice.WatchRuns(pb.WatchRunsRequest())
    async for _ in watch:
        break
    watch.cancel()

    # Refused credentials: garbage, a real token under the wrong scheme, a forged JWT.
    for token in (garbage, f"{garbage}.{garbage}.{garbage}"):
        code = await _refused(server.raw(token).ListAgents(pb.ListAgentsRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    stub = pb_grpc.RunServiceStub(server.channel)
    basic = (("authorization", f"Basic {server.tokens['bob']}"),)
    code = await _refused(stub.ListRuns(pb.ListRunsRequest(), metadata=basic))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code = await _refused(server.raw(None).ListRuns(pb.ListRunsRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED

    # Refused inputs that carry the marker: over the input limit, a non-finite number.
    too_big = request("echo", blob=_big(marker) * 3)
    assert await _refused(alice.StartRun(too_big)) == grpc.StatusCode.INVALID_ARGUMENT
    odd = request("echo", blob=_big(marker))
    odd.input["x"] = float("nan")
    assert await _refused(alice.StartRun(odd)) == grpc.StatusCode.INVALID_ARGUMENT

    # Agents that fail: unexpectedly (ticker fail_at) and deliberately (refusing).
    failing = (await alice.StartRun(request("ticker", count=3, fail_at=2, blob=_big(marker)))).run
    assert (await _finished(server, failing.run_id)).state == run_pb2.RUN_STATE_FAILED
    refusing = (await alice.StartRun(request("refusing", blob=_big(marker)))).run
    assert (await _finished(server, refusing.run_id)).state == run_pb2.RUN_STATE_FAILED

    # A StopRun of a run with a marked input, while a subscriber follows it.
    gated = (
        await alice.StartRun(request("gated", gate=marker[:16], before=1, blob=_big(marker)))
    ).run
    await read_until(alice, gated.run_id, 0, 2)
    stopped = await alice.StopRun(pb.StopRunRequest(run_id=gated.run_id, reason="enough"))
    assert stopped.run.state == run_pb2.RUN_STATE_STOPPED

    return Session((*server.tokens.values(), garbage), marker)


def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="runservice")


def _leaks(records: list[logging.LogRecord], secrets: tuple[str, ...]) -> list[str]:
    found = []
    for record in records:
        for text in _texts(record):
            for secret in secrets:
                if secret in text:
                    found.append(
                        f"{record.name} {record.levelname}: {secret[:24]}… in {text[:200]!r}"
                    )
    return found


async def test_credentials_never_reach_the_log(
    server: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """No token (accepted, refused or forged) and no 'Bearer' appears in any record."""
    _capture(caplog)
    session = await _session(server)
    assert caplog.records, "nothing was logged: the capture is not working"
    assert _leaks(caplog.records, (*session.tokens, "Bearer", "bearer")) == []


async def test_large_inputs_never_reach_the_runservice_log(
    server: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """runservice's own records never carry the marked 100 KB input."""
    _capture(caplog)
    session = await _session(server)
    ours = [r for r in caplog.records if r.name == "runservice" or r.name.startswith("runservice.")]
    assert any(r.levelno >= logging.ERROR for r in ours), "the failing agent was not logged"
    assert _leaks(ours, (session.marker,)) == []


async def test_large_inputs_never_reach_any_log_even_at_debug(
    server: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """No record from any logger (third-party libraries included) carries the input."""
    _capture(caplog)
    session = await _session(server)
    assert _leaks(caplog.records, (session.marker,)) == []
