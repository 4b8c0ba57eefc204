"""Soak: mixed load on a real server for a while, sampled, plotted, with each metric's slope.

    python -m faults.soak --duration 30m --out docs/reliability

The load: runs started all the time by two users (some stopped early, some colliding on a
thread under each multitask strategy), subscribers joining and leaving at random. Every
sample interval it records the server's RSS and open files, the event-loop lag as the client
sees it (the latency of ListAgents, a call that does no I/O) and the commit latency (from
calling StartRun to receiving the run's RUNNING event). At the end the load stops, the
server drains, and the checker reads every run's log. `soak.md` gets the figures, a PNG per
metric and each metric's least-squares slope per hour, over the whole run and over its
second half (after warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import psutil

from faults.checker import records_from_db, verify
from faults.harness import MB, Load, make_node
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb

UNITS = {"s": 1, "m": 60, "h": 3600}
USERS = ("alice", "bob")
THREADS = 8
STRATEGIES = (
    run_pb2.MULTITASK_STRATEGY_REJECT,
    run_pb2.MULTITASK_STRATEGY_ENQUEUE,
    run_pb2.MULTITASK_STRATEGY_INTERRUPT,
)
METRICS = {
    "rss_mb": "server RSS (MiB)",
    "open_files": "server open file descriptors",
    "loop_lag_ms": "ListAgents latency, ms (event-loop lag)",
    "commit_ms": "StartRun to RUNNING event, ms (commit latency)",
    "active_runs": "active runs",
}


def parse_duration(text: str) -> float:
    """'30m', '90s', '1h', '2m' -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 30m, 90s, 1h)")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


@dataclass
class Soak:
    """The load's counters and the samples."""

    load: Load
    samples: list[dict[str, float]] = field(default_factory=list)
    tally: Counter[str] = field(default_factory=Counter)
    active: set[str] = field(default_factory=set)

    async def starter(self) -> None:
        """Starts runs back to back; some are stopped early."""
        while True:
            user = random.choice(USERS)
            try:
                run = await self.load.start(
                    "ticker", user, count=random.randint(20, 400), interval=0.01, size=100
                )
            except grpc.aio.AioRpcError as exc:
                self.tally[f"start {exc.code().name}"] += 1
                await asyncio.sleep(0.5)
                continue
            self.tally["started"] += 1
            self.active.add(run.run_id)
            if random.random() < 0.1:  # noqa: PLR2004 - the share of runs stopped early
                asyncio.get_running_loop().call_later(
                    random.uniform(0.1, 3), self._stop, run.run_id, user
                )
            await asyncio.sleep(random.uniform(0.05, 0.3))

    def _stop(self, run_id: str, user: str) -> None:
        task = asyncio.create_task(self.load.stop(run_id, user))
        task.add_done_callback(_retrieve)
        self.tally["stopped"] += 1

    async def collider(self) -> None:
        """Starts runs on a few shared threads under each multitask strategy."""
        while True:
            request = pb.StartRunRequest(
                agent="ticker",
                thread_id=f"t{random.randrange(THREADS)}",
                multitask_strategy=random.choice(STRATEGIES),
            )
            request.input.update({"count": random.randint(10, 100), "interval": 0.02})
            try:
                await self.load.stub.StartRun(request, metadata=self.load.node.md("alice"))
                self.tally["thread start OK"] += 1
            except grpc.aio.AioRpcError as exc:
                self.tally[f"thread start {exc.code().name}"] += 1
            await asyncio.sleep(random.uniform(0.1, 0.5))

    async def subscriber(self) -> None:
        """Joins a random recent run, reads a while, leaves."""
        while True:
            await asyncio.sleep(random.uniform(0.05, 0.5))
            if not self.active:
                continue
            run_id = random.choice(sorted(self.active)[-50:])
            owner = self.load.owners.get(run_id, "alice")
            call = self.load.stub.Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=random.choice((1, 1, 50))),
                metadata=self.load.node.md(owner),
                timeout=30,
            )
            leave_after = random.randint(1, 40)
            try:
                async for response in call:
                    leave_after -= 1
                    if response.events[-1].type == "run.state" and response.events[-1].state in (
                        run_pb2.RUN_STATE_SUCCEEDED,
                        run_pb2.RUN_STATE_STOPPED,
                    ):
                        self.active.discard(run_id)
                    if leave_after <= 0:
                        break
                self.tally["subscriptions"] += 1
            except grpc.aio.AioRpcError as exc:
                self.tally[f"subscribe {exc.code().name}"] += 1
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                    self.active.discard(run_id)
            finally:
                call.cancel()

    async def sample(self, proc: psutil.Process, began: float) -> None:
        """One sample of every metric."""
        md = self.load.node.md("alice")
        lags = []
        for _ in range(3):
            t0 = time.perf_counter()
            await self.load.stub.ListAgents(pb.ListAgentsRequest(), metadata=md, timeout=10)
            lags.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run = (
            await self.load.stub.StartRun(pb.StartRunRequest(agent="echo"), metadata=md, timeout=10)
        ).run
        call = self.load.stub.Subscribe(
            pb.SubscribeRequest(run_id=run.run_id, from_seq=1), metadata=md, timeout=10
        )
        await call.read()
        commit = time.perf_counter() - t0
        call.cancel()
        listed = await self.load.stub.ListRuns(
            pb.ListRunsRequest(page_size=1000, states=[run_pb2.RUN_STATE_RUNNING]),
            metadata=md,
            timeout=10,
        )
        self.samples.append(
            {
                "t_s": time.monotonic() - began,
                "rss_mb": proc.memory_info().rss / MB,
                "open_files": float(proc.num_fds()),
                "loop_lag_ms": statistics.median(lags) * 1000,
                "commit_ms": commit * 1000,
                "active_runs": float(len(listed.runs)),
            }
        )


def _retrieve(task: asyncio.Task[run_pb2.Run]) -> None:
    """Marks a background StopRun's outcome as seen (its failure is not the soak's concern)."""
    if not task.cancelled():
        task.exception()


def slope_per_hour(samples: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of `key` over time, per hour."""
    if len(samples) < 2:  # noqa: PLR2004 - a line needs two points
        return 0.0
    t = np.array([s["t_s"] / 3600 for s in samples])
    y = np.array([s[key] for s in samples])
    return float(np.polyfit(t, y, 1)[0])


async def soak(duration: float, out: Path, interval: float) -> dict[str, object]:
    """Runs the soak; returns its summary (also written to out/soak.json)."""
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        node = make_node(Path(tmp))
        # Finished runs leave memory 30 s after they end (default 5m), so a short soak reaches
        # its steady state early and the second half shows the trend, not the filling.
        node.args = ["--drain-timeout", "5s", "--stop-grace", "1s", "--memory-grace", "30s"]
        await node.start()
        assert node.server is not None
        proc = psutil.Process(node.server.pid)
        load = Load(node)
        state = Soak(load)
        tasks = [asyncio.create_task(state.starter()) for _ in range(2)]
        tasks.append(asyncio.create_task(state.collider()))
        tasks += [asyncio.create_task(state.subscriber()) for _ in range(10)]
        began = time.monotonic()
        try:
            while time.monotonic() - began < duration:
                await state.sample(proc, began)
                await asyncio.sleep(interval)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        exit_code = await node.terminate()
        await load.close()
        figures = verify(records_from_db(node.db))
    summary: dict[str, object] = {
        "duration_s": round(duration),
        "samples": state.samples,
        "load": dict(sorted(state.tally.items())),
        "checker": figures.as_dict(),
        "checker_problems": figures.problems[:20],
        "exit_code": exit_code,
    }
    write_report(summary, out)
    return summary


def write_report(summary: dict[str, object], out: Path) -> None:
    """soak.json, soak.md and one PNG per metric."""
    out.mkdir(parents=True, exist_ok=True)
    samples = summary["samples"]
    assert isinstance(samples, list)
    half = samples[len(samples) // 2 :]
    rows = []
    for key, label in METRICS.items():
        values = [s[key] for s in samples]
        whole, second = slope_per_hour(samples, key), slope_per_hour(half, key)
        rows.append(
            f"| {label} | {values[0]:.1f} | {statistics.median(values):.1f} | {max(values):.1f} "
            f"| {values[-1]:.1f} | {whole:+.2f} | {second:+.2f} |"
        )
        figure, axes = plt.subplots(figsize=(7, 3))
        axes.plot([s["t_s"] / 60 for s in samples], values, marker=".", linewidth=1)
        axes.set_xlabel("minutes")
        axes.set_ylabel(label)
        axes.set_title(f"{label}: slope {second:+.2f}/h over the second half")
        axes.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out / f"soak-{key}.png", dpi=80)
        plt.close(figure)
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    minutes = float(str(summary["duration_s"])) / 60
    lines = [
        "# Soak: results",
        "",
        f"Written by `make soak DURATION={minutes:.0f}m` (`faults/soak.py`): {minutes:.1f} min of",
        "mixed load on one server (two users starting runs, 10% stopped early, runs colliding",
        "on 8 threads under REJECT/ENQUEUE/INTERRUPT, 10 subscribers joining and leaving; finished",
        "runs leave memory after 30 s, `--memory-grace 30s`), one",
        f"sample every few seconds ({len(samples)} samples). Slopes are least-squares fits, per",
        "hour; the second half leaves out the warm-up (caches, the first runs' allocations).",
        "",
        "| metric | first | median | max | last | slope/h (all) | slope/h (2nd half) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Load: {summary['load']}.",
        "",
        f"Checker over every run's log after the drain: {summary['checker']}; "
        f"server exit code {summary['exit_code']}.",
        "",
        *[f"![{label}](soak-{key}.png)" for key, label in METRICS.items()],
        "",
    ]
    (out / "soak.md").write_text("\n".join(lines))


def main() -> None:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("30m"))
    parser.add_argument("--out", type=Path, default=Path("docs/reliability"))
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples")
    args = parser.parse_args()
    interval = args.interval or max(2.0, args.duration / 150)
    summary = asyncio.run(soak(args.duration, args.out, interval))
    checker = summary["checker"]
    assert isinstance(checker, dict)
    print(json.dumps({"checker": checker, "exit_code": summary["exit_code"]}))
    with contextlib.suppress(KeyError):
        clean = all(checker[k] == 0 for k in ("lost", "gaps", "duplicates", "unfinished"))
        raise SystemExit(0 if clean and summary["exit_code"] == 0 else 1)


if __name__ == "__main__":
    main()
