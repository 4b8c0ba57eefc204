"""The fault matrix's report: docs/reliability/faults.json and faults.md.

Each row (one test) records its figures; the outcome and duration come from pytest. A run
of a few rows (`-k`) updates those rows and keeps the others' last results, so the
committed report always covers the whole matrix.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_DIR = Path(os.environ.get("FAULTS_REPORT_DIR", "docs/reliability"))
HEADLINE = (
    "events_seen",
    "lost",
    "changed",
    "gaps",
    "duplicates",
    "unfinished",
)


@dataclass
class Row:
    """One row's result."""

    name: str
    doc: str
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    outcome: str = "not run"
    seconds: float = 0.0
    failure: str = ""

    def set(self, **figures: Any) -> None:
        """Records figures (numbers, short strings)."""
        self.figures.update(figures)

    def note(self, text: str) -> None:
        """Records a remark shown beside the figures."""
        self.notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        """The row for faults.json."""
        return {
            "doc": self.doc,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 1),
            "figures": self.figures,
            "notes": self.notes,
            "failure": self.failure,
            "command": f"make faults FAULTS_ARGS='-k \"{_keyword(self.name)}\"'",
        }


def _keyword(name: str) -> str:
    """A -k expression selecting the row: `row[param]` becomes `row and param`."""
    base, _, param = name.partition("[")
    return f"{base} and {param.rstrip(']')}" if param else base


@dataclass
class Report:
    """Every row of this session."""

    rows: dict[str, Row] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def row(self, name: str, doc: str) -> Row:
        """The row named `name` (created on first use)."""
        return self.rows.setdefault(name, Row(name, doc))

    def write(self, directory: Path = REPORT_DIR) -> None:
        """Merges this session's rows into faults.json and rewrites faults.md."""
        if not self.rows:
            return
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "faults.json"
        old: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        rows = dict(old.get("rows", {}))
        rows.update({name: row.as_dict() for name, row in self.rows.items()})
        elapsed = time.monotonic() - self.started
        sessions = old.get("sessions", [])[-4:]
        sessions.append(
            {
                "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "rows": sorted(self.rows),
                "seconds": round(elapsed, 1),
                "machine": _machine(),
            }
        )
        doc = {"rows": dict(sorted(rows.items())), "sessions": sessions}
        path.write_text(json.dumps(doc, indent=2) + "\n")
        (directory / "faults.md").write_text(markdown(doc))


def _machine() -> str:
    system = f"{platform.system()} {platform.machine()}"
    return f"{system}, {os.cpu_count()} cores, Python {platform.python_version()}"


def markdown(doc: dict[str, Any]) -> str:
    """faults.md from the merged results."""
    rows: dict[str, Any] = doc["rows"]
    last = doc["sessions"][-1]
    passed = sum(r["outcome"] == "passed" for r in rows.values())
    lines = [
        "# Fault matrix: results",
        "",
        "Written by `make faults` (`faults/`); what each row does and how the checker works:",
        "[../reliability.md](../reliability.md). Regenerate one row with",
        '`make faults FAULTS_ARGS="-k ROW"`; the other rows keep their last results.',
        "",
        f"Last session: {last['when']}, {last['machine']}: rows {', '.join(last['rows'])}; "
        f"{last['seconds']:.0f} s in all.",
        f"Rows passing: {passed} of {len(rows)}.",
        "",
        "| row | outcome | s | " + " | ".join(HEADLINE) + " |",
        "|---|---|---|" + "---|" * len(HEADLINE),
    ]
    for name, row in rows.items():
        cells = [str(row["figures"].get(key, "")) for key in HEADLINE]
        lines.append(f"| {name} | {row['outcome']} | {row['seconds']:.0f} | " + " | ".join(cells))
    lines.append("")
    for name, row in rows.items():
        lines += [f"## {name}", "", row["doc"], "", f"Outcome: **{row['outcome']}** "]
        lines[-1] += f"in {row['seconds']:.1f} s. Reproduce: `{row['command']}`"
        lines.append("")
        for key, value in row["figures"].items():
            lines.append(f"- {key}: {value}")
        for note in row["notes"]:
            lines.append(f"- note: {note}")
        if row["failure"]:
            lines += ["", "Failure:", "", "```", row["failure"], "```"]
        lines.append("")
    return "\n".join(lines)
