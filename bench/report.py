"""What `make bench` writes: the printed table, results.json, results.md and the charts."""

from __future__ import annotations

import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from bench import isolation
from bench.stats import summary

CHARTS = ("throughput.png", "latency.png")
NOISY = 10.0  # foreign CPU % above which a scenario is flagged as measured on a busy machine
TIMES = "\u00d7"  # the multiplication sign
EN = "\u2013"  # the en dash of "min-max" ranges


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory and the versions that matter."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "revision": revision(),
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": version("sqlalchemy"),
        "aiosqlite": version("aiosqlite"),
        "asyncpg": version("asyncpg"),
        "uvloop": version("uvloop"),
    }


def revision() -> str:
    """The commit of the code measured: $BENCH_REVISION, else `git describe` of the repo."""
    if os.environ.get("BENCH_REVISION"):
        return os.environ["BENCH_REVISION"]
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


# -- formatting --------------------------------------------------------------------------


def num(value: float | None) -> str:
    """A figure rounded for reading: 3 significant digits, thousands separated."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    mag = abs(value)
    if mag >= 100:  # noqa: PLR2004 - formatting thresholds
        return f"{value:,.0f}"
    if mag >= 10:  # noqa: PLR2004
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def spread(s: dict[str, Any] | None) -> str:
    """'median (min-max)', with an en dash."""
    if s is None:
        return "—"
    if len(s["values"]) == 1:
        return num(s["median"])
    return f"{num(s['median'])} ({num(s['min'])}{EN}{num(s['max'])})"


def ratio_text(fig: dict[str, Any]) -> str:
    """The ratio runservice / baseline."""
    r = fig["ratio"]
    if r is None:
        return "—"
    return f"{num(r) if r >= 10 else f'{r:.2f}'}{TIMES}"  # noqa: PLR2004


def met_text(fig: dict[str, Any]) -> str:
    """Whether the target is met (measured, never asserted)."""
    if not fig["target"]:
        return ""
    return {True: "met", False: "NOT met", None: "?"}[fig["met"]]


COLUMNS = ("figure", "unit", "runservice", "baseline", "ratio", "target", "")


def rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per figure against a baseline server, in scenario order (the stores and
    replicas scenarios have tables of their own)."""
    out: list[tuple[str, ...]] = []
    for sc in results["scenarios"]:
        if sc["key"] in OWN_TABLES:
            continue
        for fig in sc["figures"]:
            out.append(
                (
                    fig["name"],
                    fig["unit"],
                    spread(fig["runservice"]),
                    spread(fig["baseline"]),
                    ratio_text(fig),
                    fig["target"],
                    met_text(fig),
                )
            )
    return out


STORES = "stores"
REPLICAS = "replicas"
OWN_TABLES = (STORES, REPLICAS)  # scenarios printed in tables of their own
STORES_COLUMNS = ("figure", "unit", "SQLite", "PostgreSQL", "PostgreSQL / SQLite", "target", "")
STORES_CPU_COLUMNS = ("phase", "server on SQLite", "server on PostgreSQL", "PostgreSQL processes")


def stores_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """The stores scenario's figures: SQLite's beside PostgreSQL's, and their ratio."""
    out: list[tuple[str, ...]] = []
    for sc in results["scenarios"]:
        if sc["key"] != STORES:
            continue
        for fig in sc["figures"]:
            out.append(
                (
                    fig["name"],
                    fig["unit"],
                    spread(fig["baseline"]) if fig["baseline"] else "(in the server)",
                    spread(fig["runservice"]),
                    ratio_text(fig),
                    fig["target"],
                    met_text(fig),
                )
            )
    return out


def stores_cpu_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per phase of the stores scenario, the CPU % of each server and of PostgreSQL."""
    out: list[tuple[str, ...]] = []
    for sc in results["scenarios"]:
        if sc["key"] != STORES or sc.get("skipped"):
            continue
        for phase, parts in sc["details"]["cpu_pct"].items():
            cells = [
                spread(summary(parts[k])) + " %" if parts.get(k) else "—"
                for k in ("sqlite server", "postgresql server", "postgresql db")
            ]
            out.append((phase, *cells))
    return out


def stores_text(results: dict[str, Any]) -> list[str]:
    """The stores scenario for the terminal: its table, or why it was skipped."""
    for sc in results["scenarios"]:
        if sc["key"] == STORES and sc.get("skipped"):
            return ["", f"Stores: skipped: {sc['skipped']}"]
    body = stores_rows(results)
    if not body:
        return []
    return [
        "",
        "Stores, the same server on PostgreSQL beside SQLite:",
        *aligned(STORES_COLUMNS, body),
        "",
        "Stores, CPU % (100 = one core) while measured:",
        *aligned(STORES_CPU_COLUMNS, stores_cpu_rows(results)),
    ]


ISOLATION_COLUMNS = (
    "phase",
    "victim calls",
    "succeeded %",
    "p50 ms",
    "p99 ms",
    "max ms",
    "server CPU %",
    "victim's failed calls",
    "abuser's calls by status",
)
VICTIM_KEYS = ("ok_pct", "p50_ms", "p99_ms", "max_ms")  # the victim's columns, in order


def tally(counts: list[dict[str, int]]) -> str:
    """Counters summed over the reps, as 'NAME n, NAME n' (most first); '—' when none."""
    total: dict[str, int] = {}
    for c in counts:
        for name, n in c.items():
            total[name] = total.get(name, 0) + n
    ranked = sorted(total.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {n:,}" for name, n in ranked) or "—"


def isolation_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per phase of the isolation scenario: the victim's calls (median of the reps, counts
    summed) and what the abuser's calls got."""
    out: list[tuple[str, ...]] = []
    for sc in results["scenarios"]:
        if sc["key"] != "isolation":
            continue
        for phase, reps in sc["details"]["phases"].items():
            victim = [r["victim"] for r in reps]
            others = [isolation.failed(v["statuses"]) for v in victim]
            out.append(
                (
                    phase,
                    f"{sum(v['calls'] for v in victim):,}",
                    *(spread(summary([v[k] for v in victim])) for k in VICTIM_KEYS),
                    spread(summary([r["server_cpu_pct"] for r in reps])),
                    tally(others),
                    tally([r["abuser"] for r in reps]),
                )
            )
    return out


def aligned(columns: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    """`body` under `columns`, padded into columns for the terminal."""
    widths = [max(len(r[i]) for r in [columns, *body]) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return lines


def text_table(results: dict[str, Any]) -> str:
    """The table for the terminal."""
    body = rows(results)
    lines = aligned(COLUMNS, body) if body else []
    isolated = isolation_rows(results)
    if isolated:
        lines += ["", "Isolation, per phase:", *aligned(ISOLATION_COLUMNS, isolated)]
    lines += stores_text(results)
    lines += replicas_text(results)
    m = results["machine"]
    lines.append("")
    lines.append(
        f"median (min{EN}max) of {reps_text(results)}; ratio = runservice median / baseline "
        f"median. {m['cores']} cores, {m['cpu']}; Python {m['python']}, grpcio {m['grpcio']}, "
        f"SQLite {m['sqlite']}."
    )
    lines.append(noise_text(results))
    return "\n".join(lines)


def noise_text(results: dict[str, Any]) -> str:
    """How busy the machine was with other processes (see bench/noise.py)."""
    parts = [
        f"{sc['key']} {sc['foreign_cpu_pct']['mean']:.0f}%"
        for sc in results["scenarios"]
        if "foreign_cpu_pct" in sc
    ]
    start, end = results.get("loadavg_start"), results.get("loadavg_end")
    text = f"Other processes' CPU (100% = one core), mean per scenario: {', '.join(parts)}."
    if start and end:
        text += f" Load average {start[0]} at the start, {end[0]} at the end."
    busy = [
        sc for sc in results["scenarios"] if sc.get("foreign_cpu_pct", {}).get("mean", 0) > NOISY
    ]
    if busy:
        text += " The machine was busy with other work: compare ratios, not absolute values."
    return text


def markdown(results: dict[str, Any]) -> str:
    """docs/performance/results.md."""
    m = results["machine"]
    out = [
        "# Benchmark results",
        "",
        "<!-- Generated by `make bench` (python -m bench); do not edit by hand. -->",
        "",
        f"Run {results['started']} with `{results['command']}` in "
        f"{results['seconds']:.0f} s. Every figure is the **median (min{EN}max) of "
        f"{reps_text(results, 'repetitions')}**; the baseline ran in the same process tree, "
        "interleaved with runservice. *ratio* = runservice median / baseline median; a "
        "target is printed beside it, measured and never asserted. "
        "[performance.md](../performance.md) explains each scenario and how to read them.",
        *kept_note(results),
        "",
        *markdown_table(tuple(c or "met?" for c in COLUMNS), rows(results)),
        "",
        "![throughput per scenario](throughput.png)",
        "",
        "![latency distributions](latency.png)",
        "",
        "## Server CPU during each measurement",
        "",
        "Percent of one core (100 % = one core, the machine has "
        f"{m['cores']}) used by the server process (all threads) and by the load-client "
        "processes together, median of the reps, per scenario case.",
        "",
        "| figure | runservice | its clients | baseline | its clients |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for sc in results["scenarios"]:
        for fig in sc["figures"]:
            cpu = fig["server_cpu_pct"]
            key = json.dumps(cpu, sort_keys=True)
            if cpu and key not in seen:
                seen.add(key)
                cells = [
                    num(cpu[k]["median"]) + " %" if k in cpu else "—"
                    for k in ("runservice", "runservice clients", "bare", "bare clients")
                ]
                out.append(f"| {sc['title']}: {fig['name']} | " + " | ".join(cells) + " |")
    out += isolation_markdown(results)
    out += stores_markdown(results)
    out += replicas_markdown(results)
    out += ["", "## Parameters", ""]
    for sc in results["scenarios"]:
        params = ", ".join(f"{k} {v}" for k, v in sc["params"].items())
        out.append(
            f"- **{sc['title']}** ({sc['seconds']:.0f} s{provenance(results, sc)}): {params}"
        )
    out += [
        "",
        "## Machine",
        "",
        f"- runservice at commit `{m['revision']}`",
        f"- {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}",
        f"- Python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, "
        f"SQLite {m['sqlite']}, SQLAlchemy {m['sqlalchemy']}, aiosqlite {m['aiosqlite']}, "
        f"asyncpg {m.get('asyncpg', '?')}",
        f"- load clients: {results['workers']} processes on {results['client_loop']}; "
        f"both servers (runservice and bare) on {results.get('server_loop', 'uvloop')}",
        f"- {noise_text(results)}",
        "",
    ]
    return "\n".join(out)


def reps_text(results: dict[str, Any], word: str = "reps") -> str:
    """'3 reps', or '3-5 reps' when scenarios kept from earlier runs had other counts."""
    counts = sorted({sc.get("reps", results["reps"]) for sc in results["scenarios"]})
    if len(counts) > 1:
        return f"{counts[0]}{EN}{counts[-1]} {word} (per scenario under Parameters)"
    return f"{counts[0] if counts else results['reps']} {word}"


def kept_note(results: dict[str, Any]) -> list[str]:
    """A sentence naming the scenarios kept from earlier runs, if any."""
    old = [sc["title"] for sc in results["scenarios"] if provenance(results, sc)]
    if not old:
        return []
    return [
        "",
        f"Kept from earlier runs (date, commit and reps under Parameters): {', '.join(old)}.",
    ]


def provenance(results: dict[str, Any], sc: dict[str, Any]) -> str:
    """', measured DATE at COMMIT, N reps' for a scenario kept from an earlier run."""
    if sc.get("started", results["started"]) == results["started"]:
        return ""
    return f", measured {sc['started']} at `{sc['revision']}`, {sc['reps']} reps"


def markdown_table(columns: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return out


def isolation_markdown(results: dict[str, Any]) -> list[str]:
    """The isolation scenario's section: per phase, the victim's calls and the abuser's."""
    body = isolation_rows(results)
    if not body:
        return []
    return [
        "",
        "## Isolation: the victim's calls and the abuser's, per phase",
        "",
        "One user (the abuser) goes past a limit in each phase while another (the victim) "
        "makes paced calls; `quiet` is the victim alone. Victim latencies and success are "
        f"the median (min{EN}max) of the reps over every call, failed ones included; "
        "counts are summed over the reps.",
        "",
        *markdown_table(ISOLATION_COLUMNS, body),
    ]


def stores_markdown(results: dict[str, Any]) -> list[str]:
    """The stores scenario's section: PostgreSQL beside SQLite, and the CPU per phase."""
    head = ["", "## Stores: the same server on PostgreSQL beside SQLite", ""]
    for sc in results["scenarios"]:
        if sc["key"] == STORES and sc.get("skipped"):
            return [*head, f"Skipped: {sc['skipped']}"]
    body = stores_rows(results)
    if not body:
        return []
    return [
        *head,
        "One runservice server on SQLite (its default store) and one on a private "
        "PostgreSQL started by the bench, measured in turn on the same workloads (the "
        "first of the two alternating per repetition). *CPU per event* is the CPU time "
        "(user + system) of the runservice process, or of all PostgreSQL's processes, "
        "over the measured interval divided by the events committed (ingest) or "
        "delivered (fixed load) in it; per StartRun, by the calls completed. "
        f"Median (min{EN}max) of the repetitions; the 1.3{TIMES} target is measured, "
        "never asserted.",
        "",
        *markdown_table((*STORES_COLUMNS[:-1], "met?"), body),
        "",
        f"CPU % (100 = one core) while measured, median (min{EN}max):",
        "",
        *markdown_table(STORES_CPU_COLUMNS, stores_cpu_rows(results)),
    ]


# -- replicas ----------------------------------------------------------------------------

ONE_REPLICA, SQLITE = "pg-1", "sqlite"  # the replicas scenario's two baselines
REPLICAS_CPU_COLUMNS = (
    "phase",
    "deployment",
    "each server",
    "all servers",
    "PostgreSQL processes",
    "load clients",
)


def replicas_scenario(results: dict[str, Any]) -> dict[str, Any] | None:
    """The replicas scenario's results, if this run has them."""
    return next((sc for sc in results["scenarios"] if sc["key"] == REPLICAS), None)


def replicas_columns(sc: dict[str, Any]) -> tuple[str, ...]:
    """The replicas table's columns: a figure, then each deployment, then one replica
    on PostgreSQL against SQLite."""
    labels = sc["details"]["columns"]
    return ("figure", "unit", *labels.values(), "1 replica / SQLite", "target", "")


def replicas_rows(sc: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per figure, every deployment's median (min-max) side by side, and one replica's
    ratio to SQLite with the target where there is one."""
    d = sc["details"]
    figures = {f["id"]: f for f in sc["figures"]}
    out: list[tuple[str, ...]] = []
    for row in d["rows"]:
        cells = [
            spread(summary(v)) if (v := d["values"].get(dep, {}).get(row["key"])) else "—"
            for dep in d["columns"]
        ]
        if all(c == "—" for c in cells):
            continue
        fig = figures.get(f"replicas.{ONE_REPLICA}.{row['key']}")
        against_sqlite = fig is not None and fig["baseline_name"] == d["columns"].get(SQLITE)
        ratio = ratio_text(fig) if fig is not None and against_sqlite else "—"
        target = (fig["target"], met_text(fig)) if fig is not None else ("", "")
        out.append((row["name"], row["unit"], *cells, ratio, *target))
    return out


def _median_pct(values: list[float] | None) -> str:
    return f"{num(summary(values)['median'])} %" if values else "—"


def replicas_cpu_rows(sc: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per phase and deployment, the median CPU % of each server, of all of them, of
    PostgreSQL's processes and of the load clients."""
    labels = sc["details"]["columns"]
    out: list[tuple[str, ...]] = []
    for phase, by_dep in sc["details"]["cpu_pct"].items():
        for dep, parts in by_dep.items():
            each = sorted((k for k in parts if k.startswith("replica ")), key=lambda k: int(k[8:]))
            shares = " + ".join(num(summary(parts[k])["median"]) for k in each)
            out.append(
                (
                    phase,
                    labels.get(dep, dep),
                    f"{shares} %" if each else "—",
                    _median_pct(parts.get("replicas")),
                    _median_pct(parts.get("db")),
                    _median_pct(parts.get("clients")),
                )
            )
    return out


def replicas_notes(sc: dict[str, Any]) -> list[str]:
    """A line per deployment asked for that could not be measured, with why."""
    missing = sc["details"].get("not_measured", {})
    return [f"Not measured: {label}: {why}." for label, why in missing.items()]


def replicas_text(results: dict[str, Any]) -> list[str]:
    """The replicas scenario for the terminal: its tables, or why it was skipped."""
    sc = replicas_scenario(results)
    if sc is None:
        return []
    if sc.get("skipped"):
        return ["", f"Replicas: skipped: {sc['skipped']}"]
    return [
        "",
        "Replicas on one PostgreSQL, beside one server on SQLite:",
        *aligned(replicas_columns(sc), replicas_rows(sc)),
        *replicas_notes(sc),
        "",
        "Replicas, CPU % (100 = one core) while measured, median of the reps:",
        *aligned(REPLICAS_CPU_COLUMNS, replicas_cpu_rows(sc)),
    ]


def replicas_markdown(results: dict[str, Any]) -> list[str]:
    """The replicas scenario's section: every deployment side by side, and the CPU."""
    sc = replicas_scenario(results)
    if sc is None:
        return []
    head = ["", "## Replicas: N replicas on one PostgreSQL, beside SQLite", ""]
    if sc.get("skipped"):
        return [*head, f"Skipped: {sc['skipped']}"]
    columns = replicas_columns(sc)
    return [
        *head,
        "Each deployment (one server on SQLite; N replicas, each its own process and port, "
        "on one database of a private PostgreSQL started by the bench) measured in turn on "
        "the same workloads, the order rotated per repetition. Runs are started "
        "round-robin over the replicas; with 2 or more, half of the live subscribers are "
        "on another replica than the run's executor (*another replica* rows), so they "
        "hear of new events through NOTIFY. NOTIFYs are counted on a LISTEN connection of "
        "the bench's own. *CPU per event* is the CPU time (user + system) of all the "
        "servers together, or of all PostgreSQL's processes, over the measured interval "
        "divided by the events committed (ingest) or delivered (fixed load), or the "
        f"StartRun calls completed. Median (min{EN}max) of the repetitions; the "
        f"1.3{TIMES} target is measured, never asserted.",
        "",
        *markdown_table((*columns[:-1], "met?"), replicas_rows(sc)),
        *(["", *replicas_notes(sc)] if replicas_notes(sc) else []),
        "",
        "CPU % (100 = one core) while measured, median of the repetitions:",
        "",
        *markdown_table(REPLICAS_CPU_COLUMNS, replicas_cpu_rows(sc)),
    ]


# -- charts ------------------------------------------------------------------------------


def rate_figures(results: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The rate figures against a baseline server (throughput.png's bars), and the
    repetitions they are medians of."""
    shown = [sc for sc in results["scenarios"] if sc["key"] not in OWN_TABLES]
    rates = [f for sc in shown for f in sc["figures"] if "/s" in f["unit"] and f["baseline"]]
    return rates, reps_text({**results, "scenarios": shown})


def charts(results: dict[str, Any], out: Path) -> list[Path]:
    """throughput.png (every rate figure) and latency.png (latency distributions)."""
    import matplotlib  # noqa: PLC0415 - heavy; only needed at the end

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rates, reps = rate_figures(results)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.38
    for offset, key, label, color in (
        (-width / 2, "runservice", "runservice", "#1f77b4"),
        (width / 2, "baseline", "baseline", "#bbbbbb"),
    ):
        meds = [f[key]["median"] for f in rates]
        lows = [f[key]["median"] - f[key]["min"] for f in rates]
        highs = [f[key]["max"] - f[key]["median"] for f in rates]
        xs = [i + offset for i in range(len(rates))]
        ax.bar(xs, meds, width, yerr=[lows, highs], capsize=3, label=label, color=color)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rates)))
    labels = [f"{f['name'].replace(', ', chr(10))}\n({f['unit']})" for f in rates]
    ax.set_xticklabels(labels, fontsize=8)
    for i, f in enumerate(rates):
        if f["ratio"] is not None:
            top = max(f["runservice"]["max"], f["baseline"]["max"])
            ax.annotate(ratio_text(f), (i, top), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("per second (log scale)")
    ax.set_title(f"Throughput per scenario: median, min{EN}max of {reps}")
    ax.legend()
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    paths = [out / CHARTS[0]]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    dists = [
        (sc["title"], sc["details"]["cdf"])
        for sc in results["scenarios"]
        if "cdf" in sc.get("details", {})
    ]
    fig, axes = plt.subplots(1, max(1, len(dists)), figsize=(6 * max(1, len(dists)), 4.5))
    axes = axes if isinstance(axes, list | tuple) or hasattr(axes, "__len__") else [axes]
    for ax, (title, cdfs) in zip(axes, dists, strict=False):
        for key, label, color in (
            ("runservice", "runservice", "#1f77b4"),
            ("bare", "baseline", "#888888"),
        ):
            c = cdfs.get(key)
            if not c:
                continue
            tail = [100.0 - q for q in c["q"]]
            ax.plot(c["v"], tail, label=label, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.005, 100)
        ax.set_xlabel("latency, ms (log)")
        ax.set_ylabel("% of events slower (log)")
        ax.set_title(f"{title}: latency distribution (all reps)")
        ax.grid(which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out / CHARTS[1])
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json, results.md and the charts into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    paths[1].write_text(markdown(results))
    return paths + charts(results, out)


def stamp() -> str:
    """Now, for the report."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def command() -> str:
    """How this run was invoked."""
    return "python -m bench " + " ".join(sys.argv[1:])
