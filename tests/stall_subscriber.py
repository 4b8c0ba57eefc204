"""A subscriber that stops reading on cue: the client side of tests/test_stream_stall.py.

Run as `python -m tests.stall_subscriber ADDR TOKEN RUN_ID MODE [STREAMS]`. Each mode
prints READY once it has read something, then reads nothing until a line arrives on
stdin (the test stops the process in between), and prints one JSON line at the end:

- `raw`: one Subscribe through the generated stub; then reads to the end of the stream
  and reports the seqs it got and the status the stream ended with.
- `client`: `AsyncRunClient.subscribe` (which resumes by itself); reports the seqs.
- `many`: STREAMS Subscribe calls, each on its own connection, each reading one
  response; never reads again (the test kills it).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import grpc

from runservice.client import AsyncRunClient
from runservice.client.errors import error_info
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc


async def _cue() -> None:
    print("READY", flush=True)
    await asyncio.to_thread(sys.stdin.readline)


async def raw(addr: str, token: str, run_id: str) -> dict[str, Any]:
    """Reads one response, waits for the cue, reads the rest; the seqs and the status."""
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        call = stub.Subscribe(
            pb.SubscribeRequest(run_id=run_id, from_seq=1),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        seqs = [e.seq for e in (await call.read()).events]
        await _cue()
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                seqs.extend(e.seq for e in response.events)
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            return _report(seqs, code=exc.code().name, reason=info.reason if info else "")
        return _report(seqs, code=(await call.code()).name, reason="")


async def client(addr: str, token: str, run_id: str) -> dict[str, Any]:
    """Follows the run with the resuming client, pausing after its first event."""
    seqs: list[int] = []
    async with AsyncRunClient(addr, token=token) as runs:
        async for event in runs.subscribe(run_id):
            seqs.append(event.seq)
            if len(seqs) == 1:
                await _cue()
    return _report(seqs)


async def many(addr: str, token: str, run_id: str, streams: int) -> dict[str, Any]:
    """Opens `streams` subscriptions on as many connections and reads one response each."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
    channels = [grpc.aio.insecure_channel(addr, options=options) for _ in range(streams)]
    metadata = (("authorization", f"Bearer {token}"),)
    calls = [
        pb_grpc.RunServiceStub(channel).Subscribe(
            pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=metadata
        )
        for channel in channels
    ]
    for call in calls:
        await call.read()
    await _cue()
    return {}


def _report(seqs: list[int], **extra: str) -> dict[str, Any]:
    return {
        "count": len(seqs),
        "first": seqs[0] if seqs else 0,
        "last": seqs[-1] if seqs else 0,
        "consecutive": seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True,
        **extra,
    }


def main() -> None:
    """Runs the mode named on the command line and prints its report."""
    addr, token, run_id, mode = sys.argv[1:5]
    if mode == "raw":
        report = asyncio.run(raw(addr, token, run_id))
    elif mode == "client":
        report = asyncio.run(client(addr, token, run_id))
    else:
        report = asyncio.run(many(addr, token, run_id, int(sys.argv[5])))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
