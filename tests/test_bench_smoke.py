"""`make bench` in miniature: every scenario completes and produces its figures.

Runs `python -m bench --quick --reps 1` (tiny sizes, one runservice and one bare server
shared by the scenarios; isolation starts a server of its own) into a temporary
directory. It asserts only that each scenario finished (the PostgreSQL one may be skipped where
PostgreSQL is not installed, never under CI), that each figure has a finite
value and that every isolation phase made victim calls; it never asserts a time or a
ratio: the figures are measurements, and the full run (`make bench`) is where they are
read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import reference
from bench.isolation import PHASES
from bench.scenarios import SCENARIOS

REPO = Path(__file__).resolve().parent.parent


def test_quick_bench_runs_every_scenario_and_writes_its_outputs(tmp_path: Path) -> None:
    """Each scenario yields figures with finite values; JSON, Markdown and charts exist."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--reps", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((out / "results.json").read_text())
    assert [s["key"] for s in results["scenarios"]] == list(SCENARIOS)
    for scenario in results["scenarios"]:
        if scenario.get("skipped"):  # stores, without PostgreSQL installed (never under CI)
            assert scenario["key"] in ("stores", "replicas") and not os.environ.get("CI"), scenario
            continue
        assert scenario["figures"], f"{scenario['key']} produced no figures"
        for figure in scenario["figures"]:
            values = figure["runservice"]["values"]
            assert len(values) == 1, figure["id"]
            assert all(math.isfinite(v) for v in values), figure["id"]
            if figure["baseline"] is not None:
                assert all(math.isfinite(v) for v in figure["baseline"]["values"]), figure["id"]
    for name in ("results.md", "throughput.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    assert "replay events/s" in proc.stdout  # the table was printed
    isolation = next(s for s in results["scenarios"] if s["key"] == "isolation")
    phases = isolation["details"]["phases"]
    assert list(phases) == list(PHASES)
    assert all(rep["victim"]["calls"] > 0 for reps in phases.values() for rep in reps)
    assert "## Isolation" in (out / "results.md").read_text()


def test_quick_http_scenario_sets_each_transport_beside_the_reference_server(
    tmp_path: Path,
) -> None:
    """`--scenarios http` alone measures runservice's /v1/streams, /v1/runs/{id}/events
    and gRPC, and the Node reference server where node is there (always under CI), with
    finite figures, and prints every transport side by side."""
    out = tmp_path / "out"
    args = ["--quick", "--reps", "1", "--scenarios", "http", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    [scenario] = json.loads((out / "results.json").read_text())["scenarios"]
    assert scenario["key"] == "http"
    measured = set(scenario["details"]["values"])
    assert {"streams", "runs", "grpc"} <= measured
    if os.environ.get("CI") or (shutil.which("node") and reference.PACKAGE.exists()):
        assert "reference" in measured, scenario["params"]
    for figure in scenario["figures"]:
        assert all(math.isfinite(v) for v in figure["runservice"]["values"]), figure["id"]
        if figure["baseline"] is not None:
            assert all(math.isfinite(v) for v in figure["baseline"]["values"]), figure["id"]
    assert "every transport side by side" in proc.stdout
