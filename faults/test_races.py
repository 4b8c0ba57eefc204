"""Races of stop, delete, timeout and completion; StartRun calls cancelled mid-flight."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import grpc

from faults.checker import SeenLog, records_from_db, verify
from faults.harness import SCALE, TERMINAL_CODES, Load, Node, load_on, state_name, struct
from faults.report import Row
from faults.test_shutdown import read_once
from runservice.client.errors import error_info
from runservice.v1 import run_service_pb2 as pb

RACES = 400 * SCALE
CANCELLED_STARTS = 300
CONCURRENT_STARTS = 10


def outcome(exc: grpc.aio.AioRpcError) -> str:
    """code:reason of a refusal."""
    info = error_info(exc)
    return f"{exc.code().name}:{info.reason if info else ''}"


async def race_one(load: Load, kind: str, tally: Counter[str], deleted: set[str]) -> None:
    """One run whose natural end races a StopRun, a timeout and a DeleteRun."""
    if kind == "completion":
        run = await load.start("echo", "alice", text="one two three")
    else:  # the timeout falls about when the run would complete
        run = await load.start("ticker", "alice", count=10, interval=0.01, run_timeout=0.09)
    load.follow(run.run_id, "alice")
    await asyncio.sleep(random.uniform(0, 0.12))

    async def stop() -> None:
        try:
            stopped = await load.stop(run.run_id)
        except grpc.aio.AioRpcError as exc:
            tally[f"stop {outcome(exc)}"] += 1
            return
        tally[f"stop -> {state_name(stopped.state)}"] += 1
        if stopped.state not in TERMINAL_CODES:
            tally["stop returned an active run"] += 1

    async def delete() -> None:
        await asyncio.sleep(random.uniform(0, 0.02))
        request = pb.DeleteRunRequest(run_id=run.run_id)
        try:
            await load.stub.DeleteRun(request, metadata=load.node.md("alice"), timeout=10)
        except grpc.aio.AioRpcError as exc:
            tally[f"delete {outcome(exc)}"] += 1
            return
        deleted.add(run.run_id)
        tally["delete OK"] += 1

    await asyncio.gather(stop(), delete())
    if run.run_id not in deleted:  # a refused delete was refused because the run was active
        final = await load.get(run.run_id)
        if final.state not in TERMINAL_CODES:
            tally["active after stop"] += 1


async def test_races_of_stop_delete_timeout_and_completion(node: Node, row: Row) -> None:
    """RACES runs that complete in milliseconds or time out just as they would complete, each
    raced by StopRun and DeleteRun at random moments: StopRun always returns a terminal run
    (or NOT_FOUND once deleted), DeleteRun only ever refuses an active run, every remaining
    run ends exactly once (checker), deleted runs leave nothing behind."""
    node.args = ["--stop-grace", "1s"]
    await node.start()
    seen = SeenLog()
    tally: Counter[str] = Counter()
    deleted: set[str] = set()
    async with load_on(node, seen) as load:
        kinds = ["completion", "timeout"] * (RACES // 2)
        for start in range(0, len(kinds), 10):
            batch = kinds[start : start + 10]
            await asyncio.gather(*(race_one(load, k, tally, deleted) for k in batch))
        results = await asyncio.gather(*load._tasks, return_exceptions=True)
        follower_errors = Counter(
            outcome(r) if isinstance(r, grpc.aio.AioRpcError) else type(r).__name__
            for r in results
            if isinstance(r, BaseException)
        )
    exit_code = await node.terminate()
    seen.streams = [s for s in seen.streams if s.run_id not in deleted]
    records = records_from_db(node.db)
    leftovers = sum(r.run_id in deleted for r in records)
    figures = verify(records, seen, owners=load.owners)
    allowed = {"stop NOT_FOUND:RUN_NOT_FOUND", "delete FAILED_PRECONDITION:RUN_ACTIVE"}
    odd = {k: n for k, n in tally.items() if not k.startswith(("stop ->", "delete OK"))}
    odd = {k: n for k, n in odd.items() if k not in allowed}
    odd.pop("stop -> RUNNING", None)
    row.set(
        **figures.as_dict(),
        races=len(kinds),
        outcomes=dict(sorted(tally.items())),
        deleted=len(deleted),
        deleted_runs_left_behind=leftovers,
        follower_errors=dict(follower_errors),
        exit_code=exit_code,
    )
    figures.assert_clean()
    assert not odd, odd
    assert leftovers == 0
    assert exit_code == 0
    assert set(follower_errors) <= {"NOT_FOUND:RUN_NOT_FOUND"}, follower_errors


async def test_startrun_cancelled_mid_call(node: Node, row: Row) -> None:
    """300 StartRun calls with deadlines of 0.5-10 ms, so many are cancelled while the server
    works on them: every run that exists afterwards can be stopped (StopRun returns it
    terminal), its log read from seq 1 ends with its terminal event, and the checker passes
    with no run left active. No per-user cap, so every call that gets through makes a run."""
    node.args = ["--stop-grace", "1s", "--max-active-per-user", "0"]
    await node.start()
    tally: Counter[str] = Counter()
    seen = SeenLog()
    async with load_on(node, seen) as load:
        semaphore = asyncio.Semaphore(CONCURRENT_STARTS)

        async def start() -> None:
            request = pb.StartRunRequest(agent="ticker", input=struct(count=100, interval=0.02))
            async with semaphore:
                try:
                    await load.stub.StartRun(
                        request,
                        metadata=load.node.md("alice"),
                        timeout=random.uniform(0.0005, 0.010),
                    )
                    tally["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    tally[exc.code().name] += 1

        await asyncio.gather(*(start() for _ in range(CANCELLED_STARTS)))
        await asyncio.sleep(0.5)
        listed = await load.stub.ListRuns(
            pb.ListRunsRequest(page_size=1000), metadata=load.node.md("alice")
        )
        stop_results: Counter[str] = Counter()
        tails_not_ended: list[str] = []
        for run in listed.runs:
            try:
                stopped = await load.stop(run.run_id)
                stop_results[state_name(stopped.state)] += 1
            except grpc.aio.AioRpcError as exc:
                stop_results[outcome(exc)] += 1
            stream = seen.stream(run.run_id)
            code = await asyncio.wait_for(read_once(load, run.run_id, "alice", stream), 20)
            if code != "OK" or not stream.saw_terminal:
                tails_not_ended.append(run.run_id)
    exit_code = await node.terminate(limit=60)
    figures = verify(records_from_db(node.db), seen)
    row.set(
        **figures.as_dict(),
        start_calls=CANCELLED_STARTS,
        start_outcomes=dict(tally),
        runs_created=len(listed.runs),
        stop_results=dict(stop_results),
        tails_not_ended=len(tails_not_ended),
        exit_code=exit_code,
    )
    figures.assert_clean()
    assert not tails_not_ended
    assert set(stop_results) <= {state_name(s) for s in TERMINAL_CODES}, stop_results
    assert exit_code == 0
