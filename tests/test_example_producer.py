"""examples/producer-go: a producer written in Go feeds a stream through a proxy that
cuts its connections; the stream holds every message exactly once."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Harness
from tests.faults import CuttingProxy

EXAMPLE = Path(__file__).parent.parent / "examples" / "producer-go"


async def test_the_go_producer_survives_cuts_and_writes_each_message_once(
    make_server: object, tmp_path: Path
) -> None:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("go is missing")
        pytest.skip("go is needed")
    server: Harness = await make_server(http_listen="127.0.0.1:0")  # type: ignore[operator]
    token = tmp_path / "token"
    token.write_text(server.tokens["alice"])
    build = await asyncio.create_subprocess_exec(
        go, "build", "-o", str(tmp_path / "producer"), ".", cwd=EXAMPLE
    )
    assert await build.wait() == 0
    proxy = await CuttingProxy("127.0.0.1", server.app.http_port).start()
    stop = asyncio.Event()

    async def cutter() -> None:
        while not stop.is_set():
            await asyncio.sleep(random.uniform(0.01, 0.04))
            proxy.cut()

    cutting = asyncio.create_task(cutter())
    try:
        producer = await asyncio.create_subprocess_exec(
            str(tmp_path / "producer"),
            "-url",
            f"http://127.0.0.1:{proxy.port}",
            "-token-file",
            str(token),
            "-stream",
            "demo/feed",
            "-count",
            "100",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(producer.communicate(), 120)
    finally:
        stop.set()
        await cutting
        await proxy.close()
    assert producer.returncode == 0, err.decode()
    assert b"appended 100 messages" in out
    assert proxy.cuts > 3 and b"retrying" in err  # it was cut, and went on
    url = f"http://127.0.0.1:{server.app.http_port}/v1/streams/demo/feed?offset=-1"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bearer {server.tokens['alice']}"}) as read,
    ):
        assert read.headers["Stream-Closed"] == "true"
        assert [m["n"] for m in await read.json()] == list(range(100))
