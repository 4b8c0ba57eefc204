"""Shared helpers for RPC tests: reading streams and decoding error details."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import struct_pb2

from runservice.client import TERMINAL_STATES
from runservice.client.errors import error_info
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb

TERMINAL = TERMINAL_STATES  # the terminal RunState values, as the client defines them

__all__ = [
    "TERMINAL",
    "error_info",
    "read_all",
    "read_until",
    "seqs",
    "start",
    "struct",
]


def struct(**values: Any) -> struct_pb2.Struct:
    """A Struct of `values`."""
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def start(caller: Any, agent: str, **input: Any) -> run_pb2.Run:
    """Starts a run of `agent` with `input`; returns it."""
    response = await caller.StartRun(pb.StartRunRequest(agent=agent, input=struct(**input)))
    return response.run


async def read_all(caller: Any, run_id: str, from_seq: int = 0) -> list[run_pb2.RunEvent]:
    """Every event Subscribe delivers until the stream ends."""
    events: list[run_pb2.RunEvent] = []
    async for response in caller.Subscribe(pb.SubscribeRequest(run_id=run_id, from_seq=from_seq)):
        events.extend(response.events)
    return events


async def read_until(caller: Any, run_id: str, from_seq: int, last: int) -> list[run_pb2.RunEvent]:
    """Events from `from_seq` until one with seq >= `last` arrives; then closes the stream."""
    events: list[run_pb2.RunEvent] = []
    call = caller.Subscribe(pb.SubscribeRequest(run_id=run_id, from_seq=from_seq))
    async for response in call:
        events.extend(response.events)
        if events and events[-1].seq >= last:
            break
    call.cancel()
    return events


def seqs(events: list[run_pb2.RunEvent]) -> list[int]:
    """The seqs of `events`."""
    return [e.seq for e in events]


async def sh(command: str, env: dict[str, str]) -> tuple[int, str]:
    """Runs `command` with bash; its exit status and its output (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()
