"""The server's log: JSON lines with structured run fields, and what a first start says.

The process tests run a real `runservice serve` and read its stderr; the rest check the
formatter and the option's way to `--workers` children in this process.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from runservice import config, logs, workers
from runservice.api import status
from runservice.api.convert import failure_from_proto
from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.helpers import TERMINAL
from tests.serverproc import ServerProcess, bearer, running_server, wait_for

RUN_FIELDS = ("run_id", "owner", "agent", "state")


def _request(agent: str, **input: object) -> pb.StartRunRequest:
    struct = struct_pb2.Struct()
    struct.update(input)
    return pb.StartRunRequest(agent=agent, input=struct)


def _entries(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line the server wrote, each parsed as one JSON object (the `===` lines are
    serverproc's own headers)."""
    lines = [line for line in server.log_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines if not line.startswith("=== ")]
    assert all(isinstance(entry, dict) for entry in entries)
    return entries


def _one(entries: list[dict[str, Any]], message: str) -> dict[str, Any]:
    found = [entry for entry in entries if entry["message"] == message]
    assert len(found) == 1, f"{len(found)} lines read {message!r}"
    return found[0]


async def _finished(stub: Any, md: Any, run_id: str) -> run_pb2.Run:
    async def done() -> run_pb2.Run | None:
        run = (await stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=md)).run
        return run if run.state in TERMINAL else None

    result: run_pb2.Run = await wait_for(done, limit=20)
    return result


async def test_json_log_lines_carry_the_run_fields_and_the_clients_error_id(
    tmp_path: Path,
) -> None:
    """With --log-format json every line is one JSON object with time (RFC 3339 UTC), level,
    logger and message; a run's end line carries run_id, owner, agent, state and duration_s;
    an agent failing unexpectedly logs the error_id its client sees, with the traceback as
    one string field; no token and no input reaches the log."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = add_token(data_dir / "tokens.toml", "alice", [])
    md = bearer(token)
    marker = f"LEAKMARK{uuid.uuid4().hex}"
    async with running_server(data_dir, args=["--log-format", "json"]) as server:
        channel = grpc.aio.insecure_channel(server.addr)
        stub = pb_grpc.RunServiceStub(channel)
        echo = (await stub.StartRun(_request("echo", text=marker), metadata=md)).run
        ticker = (
            await stub.StartRun(_request("ticker", count=3, fail_at=2, note=marker), metadata=md)
        ).run
        assert (await _finished(stub, md, echo.run_id)).state == run_pb2.RUN_STATE_SUCCEEDED
        failed = await _finished(stub, md, ticker.run_id)
        await channel.close()
        assert await server.terminate() == 0

    entries = _entries(server)
    for entry in entries:
        assert set(entry) >= {"time", "level", "logger", "message"}
        assert entry["time"].endswith("Z")
        assert datetime.fromisoformat(entry["time"]).utcoffset().total_seconds() == 0
    ended = _one(entries, f"run {echo.run_id} ended SUCCEEDED")
    assert {k: ended[k] for k in RUN_FIELDS} == {
        "run_id": echo.run_id,
        "owner": "alice",
        "agent": "echo",
        "state": "SUCCEEDED",
    }
    assert isinstance(ended["duration_s"], float | int) and ended["duration_s"] >= 0
    assert ended["level"] == "INFO" and ended["logger"] == "runservice.runtime.lifecycle"

    error_id = failure_from_proto(failed.error).error_id
    assert error_id and f"(error id {error_id})" in failed.error.message
    failure = _one(entries, f"run {ticker.run_id} failed (error id {error_id})")
    assert failure["error_id"] == error_id
    assert {k: failure[k] for k in RUN_FIELDS} == {
        "run_id": ticker.run_id,
        "owner": "alice",
        "agent": "ticker",
        "state": "FAILED",
    }
    assert "RuntimeError: ticker failed at tick 2" in failure["exception"]
    assert _one(entries, f"run {ticker.run_id} ended FAILED")["error_id"] == error_id

    text = server.log_text()
    assert token not in text and marker not in text


async def test_a_first_start_with_a_dev_token_says_where_it_is(tmp_path: Path) -> None:
    """A first start with --dev-token (json from RUNSERVICE_LOG_FORMAT) names the dev token's
    file, never the token, and does not claim that no token is accepted; the first SIGTERM
    says that a second one interrupts the drain at once."""
    data_dir = tmp_path / "data"
    env = {"RUNSERVICE_LOG_FORMAT": "json"}
    async with running_server(data_dir, args=["--dev-token"], env=env) as server:
        token = (data_dir / "dev-token").read_text().strip()
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait_exit() == 0

    messages = [entry["message"] for entry in _entries(server)]
    assert any(str(data_dir / "dev-token") in m for m in messages), messages
    assert not any("does not exist" in m or "no token is accepted" in m for m in messages)
    assert "loaded 1 tokens from " + str(data_dir / "tokens.toml") in messages
    drain = next(m for m in messages if m.startswith("shutting down: draining runs"))
    assert "a second Ctrl-C (SIGINT or SIGTERM) interrupts them at once" in drain
    assert token not in server.log_text()


@pytest.fixture
def json_records() -> Iterator[io.StringIO]:
    """What the runservice loggers write, as --log-format json writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger("runservice")
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


def test_an_internal_error_logs_the_error_id_its_client_sees(json_records: io.StringIO) -> None:
    """An unknown exception becomes INTERNAL; its error_id is a field of its one log line."""
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError as exc:
        answer = status.to_status(exc)
    details = dict(answer.trailing_metadata)["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(details).details[0].Unpack(info)
    (line,) = json_records.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["error_id"] == info.metadata["error_id"]
    assert entry["message"] == f"internal error {entry['error_id']}"
    assert "ZeroDivisionError: boom" in entry["exception"]


def test_a_json_line_keeps_its_core_fields_and_one_line(json_records: io.StringIO) -> None:
    """Fields cannot overwrite time, level, logger or message; newlines stay escaped."""
    log = logging.getLogger("runservice.test")
    log.warning("two\nlines", extra={"time": "forged", "run_id": "r1", "worker": 2})
    (line,) = json_records.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "two\nlines" and entry["time"] != "forged"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert (entry["level"], entry["logger"], entry["run_id"]) == ("WARNING", log.name, "r1")


def test_workers_get_the_log_format_of_their_parent(tmp_path: Path) -> None:
    """A worker's command line carries --log-format json when its parent has it."""
    settings = config.Settings(data_dir=tmp_path, workers=2, log_format="json")
    argv, _ = workers.worker_invocation(settings, 1, ready_fd=9)
    assert "--log-format=json" in argv
    plain, _ = workers.worker_invocation(config.Settings(data_dir=tmp_path), 0, ready_fd=9)
    assert not any(arg.startswith("--log-format") for arg in plain)
