"""`python -m bench`: run the scenarios, print the table, write JSON, Markdown and charts."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import http_edge, pg, report
from bench.clients import Workers
from bench.noise import ForeignLoad, loadavg
from bench.scenarios import QUICK, SCENARIOS, Bench, Sizes
from runservice.config import EVENT_LOOPS
from tools.pg import PgUnavailableError

log = logging.getLogger("bench")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="runservice's figures beside a bare grpc.aio baseline, measured in one run.",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    p.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--out", type=Path, default=Path("docs/performance"), help="output directory")
    p.add_argument("--workers", type=int, default=2, help="load-client processes (default 2)")
    p.add_argument(
        "--server-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="event loop of both servers, runservice and bare (default uvloop, "
        "runservice's own default)",
    )
    p.add_argument(
        "--client-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="event loop of the load clients (default uvloop)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, server logs)")
    p.add_argument(
        "--replace",
        action="store_true",
        help="write only the scenarios measured now; by default a full-size run of some "
        "scenarios keeps the others' results from the results.json already in --out",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: print and write the table, Markdown and charts of a results.json",
    )
    sizes = p.add_argument_group("sizes (defaults fit 2 cores in under 10 minutes)")
    d = Sizes()
    sizes.add_argument("--payload", type=int, help=f"pad bytes per event ({d.payload})")
    sizes.add_argument("--replay-events", type=int, help=f"events replayed ({d.replay_events})")
    sizes.add_argument(
        "--fanout-subscribers",
        type=_ints,
        help=f"subscriber counts ({','.join(map(str, d.fanout_subscribers))})",
    )
    sizes.add_argument(
        "--fanout-delivered",
        type=int,
        help=f"events delivered per fan-out case, all subscribers ({d.fanout_delivered})",
    )
    sizes.add_argument(
        "--fanout-min-events", type=int, help=f"least events per run ({d.fanout_min_events})"
    )
    sizes.add_argument("--latency-runs", type=int, help=f"concurrent runs ({d.latency_runs})")
    sizes.add_argument("--latency-rate", type=float, help=f"events/s per run ({d.latency_rate})")
    sizes.add_argument("--latency-seconds", type=float, help=f"duration ({d.latency_seconds})")
    sizes.add_argument(
        "--startrun-callers", type=int, help=f"concurrent callers ({d.startrun_callers})"
    )
    sizes.add_argument(
        "--startrun-seconds", type=float, help=f"measured duration ({d.startrun_seconds})"
    )
    sizes.add_argument("--ingest-runs", type=int, help=f"concurrent runs ({d.ingest_runs})")
    sizes.add_argument("--ingest-events", type=int, help=f"events per run ({d.ingest_events})")
    sizes.add_argument(
        "--capacity-runs", type=int, help=f"live runs and subscriptions ({d.capacity_runs})"
    )
    sizes.add_argument(
        "--capacity-finished-runs",
        type=int,
        help=f"finished runs held in memory ({d.capacity_finished_runs})",
    )
    sizes.add_argument(
        "--isolation-seconds",
        type=float,
        help=f"duration of each isolation phase ({d.isolation_seconds})",
    )
    sizes.add_argument("--isolation-rate", type=float, help=f"victim calls/s ({d.isolation_rate})")
    sizes.add_argument(
        "--isolation-stream-cap",
        type=int,
        help=f"--max-streams-per-user of the isolation server ({d.isolation_stream_cap})",
    )
    sizes.add_argument(
        "--stores-live-runs",
        type=int,
        help=f"stores: runs at --latency-rate events/s, a subscriber each ({d.stores_live_runs})",
    )
    sizes.add_argument(
        "--stores-live-seconds",
        type=float,
        help=f"stores: duration of the fixed-load phase ({d.stores_live_seconds})",
    )
    replicas = p.add_argument_group(
        "replicas scenario (loads marked 'per core' are the defaults on this machine)"
    )
    replicas.add_argument(
        "--replicas",
        type=_ints,
        help=f"replica counts on one PostgreSQL ({','.join(map(str, d.replicas))})",
    )
    replicas.add_argument(
        "--serve-workers",
        type=int,
        help="also measure one `runservice serve --workers N` on one port, once the server "
        f"has that option; 0 = never ({d.serve_workers})",
    )
    replicas.add_argument(
        "--replicas-ingest-runs",
        type=int,
        help=f"runs emitting as fast as accepted (50 per core: {d.replicas_ingest_runs})",
    )
    replicas.add_argument(
        "--replicas-ingest-events", type=int, help=f"events per run ({d.replicas_ingest_events})"
    )
    replicas.add_argument(
        "--replicas-live-runs",
        type=int,
        help=f"runs at --latency-rate events/s, a subscriber each (25 per core, at most "
        f"300: "
        f"{d.replicas_live_runs})",
    )
    replicas.add_argument(
        "--replicas-live-seconds",
        type=float,
        help=f"duration of the fixed-load phase ({d.replicas_live_seconds})",
    )
    replicas.add_argument(
        "--replicas-startrun-callers",
        type=int,
        help=f"concurrent StartRun callers (25 per core: {d.replicas_startrun_callers})",
    )
    replicas.add_argument(
        "--replicas-startrun-users",
        type=int,
        help=f"users the StartRun callers are spread over ({d.replicas_startrun_users})",
    )
    replicas.add_argument(
        "--replicas-startrun-seconds",
        type=float,
        help=f"measured duration of the StartRun phase ({d.replicas_startrun_seconds})",
    )
    replicas.add_argument(
        "--replicas-held",
        type=int,
        help=f"runs each held with a subscriber (250 per core: {d.replicas_held})",
    )
    http_edge.add_arguments(p, d)
    return p


def sizes_from(args: argparse.Namespace) -> Sizes:
    """The defaults (or QUICK), overridden by any size flag given."""
    base = QUICK if args.quick else Sizes()
    changes = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(Sizes)
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(base, **changes)


NEEDS_POSTGRESQL = ("stores", "replicas")


def chosen_scenarios(args: argparse.Namespace) -> list[str]:
    """The scenarios to run, in the order given; exits on an unknown one, and when a
    scenario that needs PostgreSQL is chosen but cannot run here (bench.pg.unavailable)."""
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(unknown)}; pick from {list(SCENARIOS)}")
    sizes = sizes_from(args)
    if any(s < 1 for s in sizes.replicas):
        raise SystemExit(f"--replicas: counts of 1 or more, not {sizes.replicas}")
    if http_edge.KEY in chosen:  # before anything is measured, as for PostgreSQL
        http_edge.check(sizes)
    needing = [s for s in chosen if s in NEEDS_POSTGRESQL]
    if needing:  # before anything is measured: say now that it cannot run
        try:
            pg.unavailable(sizes.pg_optional)
        except PgUnavailableError as exc:
            raise SystemExit(
                f"the {' and '.join(needing)} scenarios need PostgreSQL: {exc}"
            ) from None
    return chosen


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Runs the chosen scenarios; the results document."""
    chosen = chosen_scenarios(args)
    sizes = sizes_from(args)
    started = time.monotonic()
    results: dict[str, Any] = {
        "started": report.stamp(),
        "command": report.command(),
        "reps": args.reps,
        "quick": args.quick,
        "workers": args.workers,
        "client_loop": args.client_loop,
        "server_loop": args.server_loop,
        "machine": report.machine(),
        "sizes": dataclasses.asdict(sizes),
        "loadavg_start": loadavg(),
        "scenarios": [],
    }
    foreign = ForeignLoad()
    workers = await asyncio.to_thread(Workers, args.workers)
    bench = Bench(sizes, work, workers, args.reps, args.client_loop, server_loop=args.server_loop)
    try:
        for name in chosen:
            t0 = time.monotonic()
            log.info("scenario %s ...", name)
            outcome = await SCENARIOS[name](bench)
            t1 = time.monotonic()
            outcome.seconds = t1 - t0
            noise = foreign.window(t0, t1)
            log.info(
                "scenario %s done in %.1fs (other processes: %.0f%% CPU mean, %.0f%% max)",
                name,
                outcome.seconds,
                noise["mean"],
                noise["max"],
            )
            results["scenarios"].append(
                {
                    "key": outcome.key,
                    "started": results["started"],
                    "revision": results["machine"]["revision"],
                    "reps": args.reps,
                    "title": outcome.title,
                    "params": outcome.params,
                    "seconds": outcome.seconds,
                    "figures": [f.to_json() for f in outcome.figures],
                    "details": outcome.details,
                    "foreign_cpu_pct": noise,
                    **({"skipped": outcome.skipped} if outcome.skipped else {}),
                }
            )
    finally:
        await bench.close()
        workers.close()
        foreign.close()
    results["seconds"] = time.monotonic() - started
    results["loadavg_end"] = loadavg()
    return results


def merged(results: dict[str, Any], previous: Path) -> dict[str, Any]:
    """`results`, plus the scenarios of `previous` (a results.json) not measured now, each
    stamped with the date, commit and reps of the run that measured it."""
    old = json.loads(previous.read_text())
    measured = {sc["key"] for sc in results["scenarios"]}
    kept = [sc for sc in old["scenarios"] if sc["key"] not in measured]
    for sc in kept:
        sc.setdefault("started", old["started"])
        sc.setdefault("revision", old["machine"]["revision"])
        sc.setdefault("reps", old["reps"])
    if kept:
        order = list(SCENARIOS)
        rank = {key: i for i, key in enumerate(order)}
        results["scenarios"] = sorted(
            [*results["scenarios"], *kept], key=lambda sc: rank.get(sc["key"], len(order))
        )
        log.info("kept the results of %s from %s", ", ".join(sc["key"] for sc in kept), previous)
    return results


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render:
        results = json.loads(args.render.read_text())
        print(report.text_table(results))
        if side := http_edge.text_table(results):
            print(side)
        print("wrote " + ", ".join(str(p) for p in report.write(results, args.out)))
        return 0
    chosen_scenarios(args)
    work = Path(tempfile.mkdtemp(prefix="runservice-bench-"))
    try:
        results = asyncio.run(run(args, work))
    except BaseException:
        log.error("bench failed; servers' logs are in %s", work)
        raise
    previous = args.out / "results.json"
    if not (args.replace or args.quick) and previous.exists():
        results = merged(results, previous)
    print()
    print(report.text_table(results))
    if side := http_edge.text_table(results):
        print(side)
    paths = report.write(results, args.out)
    print()
    print("wrote " + ", ".join(str(p) for p in paths))
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
