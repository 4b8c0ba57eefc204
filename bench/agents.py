"""The bench agent, registered on the bench server with `--agent paced=bench.agents:paced`.

`ticker` (built in) emits as soon as it starts and spaces its ticks by sleeping
`interval` after each one, so its rate drifts below the asked one and subscribers that
join a moment later see the first ticks as replay. `paced` emits the same `tick` events
(data {"i": k, "pad": "x" * size}) on an absolute schedule that starts at a given wall
time, so every subscriber can be attached before the first tick and the offered rate
is exact. The bare baseline server (bench/bare.py) runs the same schedule.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from runservice.runtime.agent import AgentContext

BURST = 256  # ticks emitted back to back before yielding to the loop (as `ticker` does)


def schedule(input: Mapping[str, Any]) -> tuple[int, float, int, float, float]:
    """(count, interval, size, first tick's wall time or 0, hold) from the run's input."""
    count = int(input.get("count", 0))
    interval = float(input.get("interval", 0.0))
    size = int(input.get("size", 0))
    start_at = float(input.get("start_at", 0.0))
    if start_at:
        start_at += float(input.get("phase", 0.0))
    hold = float(input.get("hold", 0.0))
    return count, interval, size, start_at, hold


def tick_data(k: int, pad: str) -> dict[str, Any]:
    """The data of tick k, as `ticker` builds it."""
    data: dict[str, Any] = {"i": k}
    if pad:
        data["pad"] = pad
    return data


async def ticks(count: int, interval: float, start_at: float) -> AsyncIterator[int]:
    """k = 1..count on the bench schedule: tick k at `start_at` + (k-1) * `interval`.

    With no interval, as fast as the consumer takes them, yielding the loop every BURST.
    runservice's agent and the bare baseline both pace themselves with it.
    """
    if start_at:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    t0 = start_at or time.time()
    for k in range(1, count + 1):
        if interval:
            delay = t0 + (k - 1) * interval - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        yield k
        if not interval and k % BURST == 0:
            await asyncio.sleep(0)


async def paced(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits `count` ticks from `start_at` (+ `phase`), one per `interval` s, then holds.

    Input: {"count": int, "interval": float = 0 (as fast as the server accepts),
    "size": int = 0, "start_at": epoch seconds = now, "phase": float = 0,
    "hold": float = 0 (seconds to stay running after the last tick)}.
    """
    count, interval, size, start_at, hold = schedule(input)
    pad = "x" * size
    async for k in ticks(count, interval, start_at):
        await ctx.emit("tick", data=tick_data(k, pad))
    if hold:
        await asyncio.sleep(hold)
    return {"count": count}
