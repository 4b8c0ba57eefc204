"""What only the SQLite store does: waiting out a database another process has locked.

The behaviour every store shares is the contract suite's, tests/store/."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runservice.domain.errors import StoreUnavailableError
from runservice.domain.model import Run, RunState, Scope
from runservice.store import open_store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _run(run_id: str, owner: str, **kw: object) -> Run:
    return Run(
        run_id=run_id, owner=owner, agent="echo", state=RunState.PENDING, created_at=T0, **kw
    )  # type: ignore[arg-type]


def _url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def test_a_commit_on_a_locked_database_is_unavailable_naming_the_lock(
    tmp_path: Path,
) -> None:
    """A commit while another process holds the write lock fails at once as unavailable,
    with the lock as its cause (the writer retries); it succeeds once the lock is gone."""
    db = tmp_path / "s.db"
    store = await open_store(_url(db))
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailableError) as caught:
        await store.commit([_run("r", "alice")], [], [])
    assert caught.value.cause == "the database is locked by another process"
    with pytest.raises(StoreUnavailableError):
        await store.probe()
    holder.execute("COMMIT")
    holder.close()
    await store.commit([_run("r", "alice")], [], [])
    await store.probe()
    assert await store.get_run(Scope("alice"), "r") is not None
    await store.close()
