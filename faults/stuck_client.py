"""Subscribers that stop reading: `python -m faults.stuck_client ADDR TOKEN RUN_ID [STREAMS]`.

It opens STREAMS (default 1) Subscribe calls from seq 1, each on a connection of its own,
reads one response on each, prints "ready" and then never reads again (the fault rows
also SIGSTOP it, so not even its gRPC library drains the sockets).
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc


async def main(addr: str, token: str, run_id: str, streams: int) -> None:
    """Subscribes `streams` times, takes one message on each, then sleeps holding them."""
    # A distinct option per channel keeps gRPC from sharing one connection between them.
    channels = [
        grpc.aio.insecure_channel(addr, options=[("grpc.channel_id", i)]) for i in range(streams)
    ]
    metadata = (("authorization", f"Bearer {token}"),)
    calls = []
    for channel in channels:
        stub = pb_grpc.RunServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Subscribe(pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=metadata)
        calls.append(call)
    await asyncio.gather(*(call.read() for call in calls))
    print("ready", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    addr, token, run_id, *rest = sys.argv[1:]
    asyncio.run(main(addr, token, run_id, int(rest[0]) if rest else 1))
