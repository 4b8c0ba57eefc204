"""A subscriber that stops reading: `python -m faults.stuck_client ADDR TOKEN RUN_ID`.

It opens Subscribe from seq 1, reads one response, prints "ready" and then never reads
again (the fault rows also SIGSTOP it, so not even its gRPC library drains the socket).
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc


async def main(addr: str, token: str, run_id: str) -> None:
    """Subscribes, takes one message, then sleeps holding the stream open."""
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.RunServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Subscribe(
            pb.SubscribeRequest(run_id=run_id, from_seq=1),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        await call.read()
        print("ready", flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
