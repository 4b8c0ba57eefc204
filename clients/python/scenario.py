"""The cross-language scenario, in Python: replay and live reads across a server crash.

    python clients/python/scenario.py --addr HOST:PORT --token TOKEN --scenario replay|live

Without --token it uses RUNSERVICE_TOKEN, else, on a loopback address, the development
token of `make run`, as the runservice CLI does.

Prints JSON lines: progress lines with a "phase" key (a test harness kills and restarts
the server when it sees them), then a last line {"summary": {...}}. The Go and
TypeScript examples print the same, so the three can be compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import grpc

from runservice import config
from runservice.client import AsyncRunClient, RetryPolicy
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

FIRST = 50  # events read before the connection is dropped (replay)
LIVE_CRASH_AT = 100  # the seq after which the harness crashes the server (live)


def emit(line: dict[str, Any]) -> None:
    """Prints one JSON line at once."""
    print(json.dumps(line), flush=True)


def state_name(state: int) -> str:
    """RUN_STATE_SUCCEEDED → SUCCEEDED."""
    return str(run_pb2.RunState.Name(state)).removeprefix("RUN_STATE_")


def token_for(addr: str) -> str | None:
    """RUNSERVICE_TOKEN, else (for a loopback address) the development token, as the CLI."""
    token = os.environ.get("RUNSERVICE_TOKEN")
    if token:
        return token
    dev = config.default_data_dir() / "dev-token"
    if config.is_loopback(addr) and dev.exists():
        return dev.read_text().strip()
    return None


async def first_events(addr: str, token: str | None, run_id: str, count: int) -> list[Any]:
    """The first `count` events through a plain stub: one stream, no resume, then dropped."""
    events: list[Any] = []
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.RunServiceStub(channel)
        call = stub.Subscribe(pb.SubscribeRequest(run_id=run_id, from_seq=1), metadata=metadata)
        async for response in call:
            events.extend(response.events)
            if len(events) >= count:
                break
        call.cancel()
    return events[:count]


async def replay(client: AsyncRunClient, addr: str, token: str | None) -> tuple[str, list[Any]]:
    """A finished 200-tick run: 50 events, drop, resume from 51 slowly across a crash."""
    run = await client.start_run("ticker", {"count": 200})
    await client.wait(run.run_id)
    events = await first_events(addr, token, run.run_id, FIRST)
    emit({"phase": "first50", "last_seq": events[-1].seq})
    async for event in client.subscribe(run.run_id, from_seq=FIRST + 1):
        events.append(event)
        if event.seq == FIRST + 1:
            emit({"phase": "resumed", "seq": event.seq})
        await asyncio.sleep(0.02)
    return run.run_id, events


async def live(client: AsyncRunClient) -> tuple[str, list[Any]]:
    """A 10,000-tick run read live; the server crashes under it."""
    run = await client.start_run("ticker", {"count": 10_000, "interval": 0.01})
    events: list[Any] = []
    announced = False
    async for event in client.subscribe(run.run_id, from_seq=1):
        events.append(event)
        if event.seq >= LIVE_CRASH_AT and not announced:
            emit({"phase": "live", "seq": event.seq})
            announced = True
    return run.run_id, events


def summary(scenario: str, events: list[Any], final: Any) -> dict[str, Any]:
    """The fields every language's example reports."""
    seqs = [e.seq for e in events]
    return {
        "scenario": scenario,
        "first_seq": seqs[0],
        "last_seq": seqs[-1],
        "count": len(seqs),
        "gap_free": seqs == list(range(seqs[0], seqs[-1] + 1)),
        "duplicates": len(seqs) - len(set(seqs)),
        "ticks": sum(1 for e in events if e.type == "tick"),
        "final_state": state_name(events[-1].state),
        "get_run_last_seq": final.last_seq,
        "get_run_state": state_name(final.state),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", required=True, help="server address, HOST:PORT")
    # The token's source is named, never its value: --help must not print a secret.
    parser.add_argument("--token", help="bearer token (from RUNSERVICE_TOKEN or the dev token)")
    parser.add_argument("--scenario", choices=("replay", "live"), required=True)
    args = parser.parse_args()
    token = args.token or token_for(args.addr)
    retry = RetryPolicy(initial_backoff=0.1, max_backoff=2.0, give_up_after=30.0)
    async with AsyncRunClient(args.addr, token=token, retry=retry) as client:
        if args.scenario == "replay":
            run_id, events = await replay(client, args.addr, token)
        else:
            run_id, events = await live(client)
        final = await client.get_run(run_id)
    emit({"summary": summary(args.scenario, events, final)})
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
