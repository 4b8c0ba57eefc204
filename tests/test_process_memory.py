"""Promise 7 on a real process: a long run with a lagging subscriber does not grow memory."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import psutil
from google.protobuf import struct_pb2

from runservice.tokens import add_token
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.serverproc import assert_gap_free, bearer, read_log, running_server, wait_for

EVENTS = 200_000
PAD = 100
MB = 1024 * 1024
# Measured growth of the server's peak RSS over its warmed-up baseline: ~13 MiB (see the
# test's docstring); GROWTH_BOUND_MB leaves 3x headroom.
GROWTH_BOUND_MB = 40


def struct(**values: object) -> struct_pb2.Struct:
    """A Struct of `values`."""
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def test_server_rss_stays_bounded_while_a_slow_subscriber_lags_a_200k_event_run(
    tmp_path: Path,
) -> None:
    """Peak server RSS grows < GROWTH_BOUND_MB over a 200k-event run its subscriber lags behind.

    Measured on the 2-core reference machine (9 runs): baseline 74.6-76.0 MiB after the
    warm-up, peak growth over it 12.2-13.4 MiB, reached within the first second and then
    flat (the run log's window, the writer's pending batch, SQLite's page cache). The bound,
    40 MiB, is 3x that. It still catches buffering: with the run log's window made
    unbounded (a deliberate break, not committed) this test measured 83.5 MiB of growth;
    200k such events are ~75 MB as Python objects and ~38 MB serialized.
    """
    data_dir = tmp_path / "data"
    token = add_token(data_dir / "tokens.toml", "alice", [])
    md = bearer(token)
    async with (
        running_server(data_dir) as server,
        grpc.aio.insecure_channel(server.addr) as channel,
    ):
        stub = pb_grpc.RunServiceStub(channel)
        server_proc = psutil.Process(server.pid)

        # Warm up: one-time allocations (imports, statement caches, gRPC buffers) belong to
        # the baseline, not to the growth this test bounds.
        warm = (
            await stub.StartRun(
                pb.StartRunRequest(agent="ticker", input=struct(count=5000, size=PAD)), metadata=md
            )
        ).run
        assert len(await read_log(stub, md, warm.run_id)) == 5002
        baseline = server_proc.memory_info().rss

        samples: list[int] = []
        sampling = True

        async def sample() -> None:
            while sampling:
                samples.append(server_proc.memory_info().rss)
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        run = (
            await stub.StartRun(
                pb.StartRunRequest(agent="ticker", input=struct(count=EVENTS, size=PAD)),
                metadata=md,
            )
        ).run
        call = stub.Subscribe(
            pb.SubscribeRequest(run_id=run.run_id, from_seq=1), metadata=md, timeout=90
        )
        events: list[run_pb2.RunEvent] = []
        stream = aiter(call)

        # A slow reader for a while: one message, then a pause.
        while time.monotonic() - started < 1.5:
            events.extend((await anext(stream)).events)
            await asyncio.sleep(0.05)
        read_while_slow = len(events)

        # Then it stops reading altogether; the run must still run to its end.
        async def terminal() -> bool:
            got = (
                await stub.GetRun(pb.GetRunRequest(run_id=run.run_id), metadata=md, timeout=5)
            ).run
            return got.state == run_pb2.RUN_STATE_SUCCEEDED

        await wait_for(terminal, limit=45, interval=0.1, message="the run did not finish")
        produced_s = time.monotonic() - started

        # Finally it catches up from where it stopped.
        async for response in stream:
            events.extend(response.events)
        assert await call.code() == grpc.StatusCode.OK
        sampling = False
        await sampler

    growth_mb = (max(samples) - baseline) / MB
    print(
        f"baseline {baseline / MB:.1f} MiB, peak growth {growth_mb:.1f} MiB "
        f"(bound {GROWTH_BOUND_MB} MiB); {len(samples)} samples; run took {produced_s:.1f}s; "
        f"subscriber had read {read_while_slow} events when it paused"
    )
    assert read_while_slow < EVENTS // 2, "the subscriber was meant to lag far behind"
    assert len(events) == EVENTS + 2
    assert_gap_free(events)
    assert sum(e.type == "tick" for e in events) == EVENTS
    assert events[-1].type == "run.state"
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    assert growth_mb < GROWTH_BOUND_MB
