"""The client's resume under injected faults: cut connections and killed servers.

Promise 2 from the caller's side: however often the stream breaks, `subscribe()` yields
exactly 1..N, in order, once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from pathlib import Path

from runservice.client import AsyncRunClient, RetryPolicy
from runservice.tokens import add_token
from runservice.v1 import run_pb2
from tests.conftest import Harness
from tests.faults import CuttingProxy
from tests.serverproc import ServerProcess, free_port, start_server

FAST_RETRY = RetryPolicy(initial_backoff=0.01, max_backoff=0.2, give_up_after=30.0)
TARGET_CUTS = 100


class Progress:
    """Counts events the reader received; the cutter waits on it."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        """One more event arrived."""
        self.count += 1
        self._changed.set()

    async def reach(self, target: int) -> None:
        """Returns once `target` events have arrived."""
        while self.count < target:
            self._changed.clear()
            await self._changed.wait()


async def _cut_while_reading(proxy: CuttingProxy, progress: Progress) -> None:
    """Cuts the proxy's connections at random moments, each after the reader made progress."""
    rng = random.Random(20261121)
    while True:
        await progress.reach(progress.count + rng.randint(1, 40))
        await asyncio.sleep(rng.uniform(0, 0.01))
        proxy.cut()


async def _read(client: AsyncRunClient, run_id: str, progress: Progress) -> list[int]:
    seqs = []
    async for event in client.subscribe(run_id):
        seqs.append(event.seq)
        progress.bump()
    return seqs


async def test_a_hundred_random_cuts_never_break_the_sequence(server: Harness) -> None:
    """Through a proxy that resets the connection at random points, every read is 1..N."""
    proxy = await CuttingProxy("127.0.0.1", server.app.port).start()
    direct = AsyncRunClient(server.address, token=server.tokens["alice"])
    client = AsyncRunClient(proxy.address, token=server.tokens["alice"], retry=FAST_RETRY)
    progress = Progress()
    cutter = asyncio.create_task(_cut_while_reading(proxy, progress))
    reads = 0
    try:
        for round_no in range(200):
            if proxy.cuts >= TARGET_CUTS:
                break
            if round_no % 2 == 0:  # a live run, followed while it emits
                run = await direct.start_run("ticker", {"count": 600, "interval": 0.001})
            else:  # a finished run, replayed from the store and the window
                run = await direct.start_run("ticker", {"count": 1500, "size": 32})
                await direct.wait(run.run_id)
            seqs = await _read(client, run.run_id, progress)
            final = await direct.get_run(run.run_id)
            assert seqs == list(range(1, final.last_seq + 1))
            assert final.state == run_pb2.RUN_STATE_SUCCEEDED
            reads += 1
    finally:
        cutter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cutter
        await client.close()
        await direct.close()
        await proxy.close()
    assert proxy.cuts >= TARGET_CUTS, f"only {proxy.cuts} cuts in {reads} reads"


async def test_resume_rides_through_server_kills_on_the_same_port(tmp_path: Path) -> None:
    """SIGKILL and restart the server three times mid-read: replay and live stay 1..N."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = add_token(data_dir / "tokens.toml", "alice", [])
    port = free_port()
    server = await start_server(data_dir, port=port)
    client = AsyncRunClient(f"127.0.0.1:{port}", token=token, retry=FAST_RETRY)
    try:
        done = await client.start_run("ticker", {"count": 3000})
        await client.wait(done.run_id)
        live = await client.start_run("ticker", {"count": 100_000, "interval": 0.005})
        replayed: list[int] = []
        async for event in client.subscribe(done.run_id):
            replayed.append(event.seq)
            if event.seq in (500, 1500, 2500):  # kill between two reads of the replay
                server = await _kill_and_restart(server, data_dir, port)
        assert replayed == list(range(1, 3003))
        followed: list[int] = []
        async for event in client.subscribe(live.run_id):
            followed.append(event.seq)
            if event.seq == 50:
                server = await _kill_and_restart(server, data_dir, port)
        final = await client.get_run(live.run_id)
        assert followed == list(range(1, final.last_seq + 1))
        assert final.state == run_pb2.RUN_STATE_INTERRUPTED  # the kill orphaned it
    finally:
        await client.close()
        if server.returncode is None:
            server.proc.send_signal(signal.SIGTERM)
            await server.wait_exit()
        await server.kill()


async def _kill_and_restart(server: ServerProcess, data_dir: Path, port: int) -> ServerProcess:
    await server.kill()
    return await start_server(data_dir, port=port)
