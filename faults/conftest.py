"""pytest wiring of the fault matrix: the report, a row fixture, a fresh node per row (on
SQLite, or on a database of the session's private PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from faults.harness import Node, make_node
from faults.pg import ROW_DB_PREFIX, FaultPg, start_pg
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[FaultPg]:
    """The session's private PostgreSQL, started on first use (skipped when PostgreSQL is
    not installed, failed when CI is set)."""
    server = start_pg()
    yield server
    server.stop()


@pytest.fixture
async def pg_node(tmp_path: Path, postgres: FaultPg) -> AsyncIterator[Node]:
    """A node storing in a fresh database of the private PostgreSQL; at the end its server
    is killed if still up, PostgreSQL started if a row left it stopped, the database
    dropped."""
    node = make_node(tmp_path)
    name = await asyncio.to_thread(postgres.create_database, ROW_DB_PREFIX)
    node.db_url = postgres.url(name)
    try:
        yield node
    finally:
        if node.server is not None and node.server.returncode is None:
            await node.server.kill()
        await asyncio.to_thread(postgres.ensure_running)
        await asyncio.to_thread(postgres.drop_database, name)


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
