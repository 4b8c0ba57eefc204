"""The built-in agents: `echo`, `ticker`, `approval` and `counter`, for demos, tests and
benchmarks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from runservice.runtime.agent import Agent, AgentContext, RunError, resumable


def _number(value: Any, name: str, *, integer: bool = False, default: float = 0) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RunError(f"input.{name} must be a number")
    if value < 0:
        raise RunError(f"input.{name} must not be negative")
    if integer and value != int(value):
        raise RunError(f"input.{name} must be a whole number")
    return value


async def echo(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Streams its input text back, one `token` event per word.

    Input: {"text": str, "delay": float = 0} (seconds between words).
    Result: {"text": text}.
    """
    text = input.get("text", "")
    if not isinstance(text, str):
        raise RunError("input.text must be a string")
    delay = _number(input.get("delay"), "delay")
    for i, word in enumerate(text.split()):
        if i and delay:
            await asyncio.sleep(delay)
        await ctx.emit("token", text=word)
    return {"text": text}


async def ticker(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Emits `count` `tick` events with data {"i": k}, `interval` seconds apart.

    Input: {"count": int, "interval": float = 0, "size": int = 0, "fail_at": int = 0}.
    `size` pads each event with that many characters; `fail_at` > 0 raises an unexpected
    error right after that tick. Result: {"count": count}.
    """
    count = int(_number(input.get("count"), "count", integer=True))
    interval = _number(input.get("interval"), "interval")
    size = int(_number(input.get("size"), "size", integer=True))
    fail_at = int(_number(input.get("fail_at"), "fail_at", integer=True))
    pad = "x" * size
    for k in range(1, count + 1):
        if k > 1 and interval:
            await asyncio.sleep(interval)
        data: dict[str, Any] = {"i": k}
        if size:
            data["pad"] = pad
        await ctx.emit("tick", data=data)
        if k == fail_at:
            raise RuntimeError(f"ticker failed at tick {k} as asked (fail_at)")
        if not interval and k % 256 == 0:
            await asyncio.sleep(0)  # let the writer and subscribers run between bursts
    return {"count": count}


async def approval(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Asks a person to approve something and waits for the answer (SendInput).

    Input: {"question": str}. Emits `input.requested` with data {"prompt": question,
    "question": question}, then waits for an input {"approve": bool, "note": str = ""}
    (an input of another shape is answered with an `input.invalid` event and waited for
    again). Result: {"approved": bool, "note": str}.
    """
    question = input.get("question", "")
    if not isinstance(question, str) or not question.strip():
        raise RunError("input.question must be a non-empty string")
    answer = await ctx.ask(question, data={"question": question})
    while True:
        approve, note = answer.get("approve"), answer.get("note", "")
        if isinstance(approve, bool) and isinstance(note, str):
            return {"approved": approve, "note": note}
        await ctx.emit(
            "input.invalid",
            data={"message": 'expected {"approve": true or false, "note": "optional text"}'},
        )
        answer = await ctx.receive()


@resumable
async def counter(ctx: AgentContext, input: Mapping[str, Any]) -> Mapping[str, Any]:
    """Counts to `count`, one `tick` event {"i": k} every `interval` seconds, and survives
    a crash: it checkpoints every `checkpoint_every` ticks and resumes from the last one.

    Input: {"count": int, "interval": float = 0, "checkpoint_every": int = 10}.
    Result: {"count": count}.
    """
    count = int(_number(input.get("count"), "count", integer=True))
    interval = _number(input.get("interval"), "interval")
    every = int(
        _number(input.get("checkpoint_every"), "checkpoint_every", integer=True, default=10)
    )
    done = 0
    if ctx.resumed_from is not None:
        done = int(ctx.resumed_from["i"])
    for k in range(done + 1, count + 1):
        if k > done + 1 and interval:
            await asyncio.sleep(interval)
        await ctx.emit("tick", data={"i": k})
        ctx.progress(k, count)
        if every and k % every == 0:
            await ctx.checkpoint({"i": k})
    return {"count": count}


BUILTINS: dict[str, Agent] = {
    "echo": echo,
    "ticker": ticker,
    "approval": approval,
    "counter": counter,
}
