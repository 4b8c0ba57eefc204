"""pytest wiring of the fault matrix: the report, a row fixture, a fresh node per row."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import pytest

from faults.harness import Node, make_node
from faults.report import Report, Row

REPORT = Report()
FAILURE_CHARS = 1500


@pytest.fixture
def row(request: pytest.FixtureRequest) -> Row:
    """The report row of this test: its name without `test_`, its docstring."""
    name = request.node.name.removeprefix("test_")
    doc = " ".join((request.node.function.__doc__ or "").split())
    return REPORT.row(name, doc)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    """A data directory with three users; its server is killed at the end if still up."""
    node = make_node(tmp_path)
    try:
        yield node
    finally:
        if node.server is not None and node.server.returncode is None:
            await node.server.kill()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, Any]:
    """Records each row's outcome and duration (the call phase, or a failed setup)."""
    report = yield
    name = item.name.removeprefix("test_")
    row = REPORT.rows.get(name)
    if row is not None and (report.when == "call" or report.failed):
        row.outcome = report.outcome
        row.seconds += report.duration
        if report.failed:
            row.failure = str(report.longreprtext)[-FAILURE_CHARS:]
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Writes docs/reliability/faults.{json,md}."""
    REPORT.write()
