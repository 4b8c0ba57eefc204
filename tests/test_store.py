"""The SQLite store: migrations, scoping, label filters, wire-form events, and waiting out a
locked database."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runservice.api.convert import decode_event, encode_event
from runservice.domain.errors import StoreUnavailableError
from runservice.domain.model import (
    STATE_EVENT,
    Run,
    RunEvent,
    RunFailure,
    RunFilter,
    RunState,
    Scope,
)
from runservice.store import open_store
from runservice.store.migrations import MIGRATIONS

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _run(run_id: str, owner: str, **kw: object) -> Run:
    return Run(
        run_id=run_id, owner=owner, agent="echo", state=RunState.PENDING, created_at=T0, **kw
    )  # type: ignore[arg-type]


def _url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def test_migrations_apply_once_and_data_survives_reopening(tmp_path: Path) -> None:
    """Opening a store twice applies each migration once and keeps the rows."""
    db = tmp_path / "s.db"
    store = await open_store(_url(db))
    await store.commit([_run("r1", "alice", labels={"k": "v"})], [], [])
    await store.close()
    store = await open_store(_url(db))
    got = await store.get_run(Scope("alice"), "r1")
    assert got is not None and got.labels == {"k": "v"}
    await store.close()
    with sqlite3.connect(db) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM runservice_schema")]
    assert versions == [m.version for m in MIGRATIONS]


async def test_every_query_is_scoped_to_its_owner(tmp_path: Path) -> None:
    """A user's scope finds only their runs; the everyone scope finds all."""
    store = await open_store(_url(tmp_path / "s.db"))
    await store.commit([_run("a1", "alice"), _run("b1", "bob")], [], [])
    assert await store.get_run(Scope("bob"), "a1") is None
    assert not await store.delete_run(Scope("bob"), "a1")
    assert [r.run_id for r in await store.list_runs(Scope("bob"), RunFilter(), None, 10)] == ["b1"]
    everyone = await store.list_runs(Scope("root", everyone=True), RunFilter(), None, 10)
    assert [r.run_id for r in everyone] == ["b1", "a1"]
    await store.close()


async def test_events_round_trip_every_payload_kind(tmp_path: Path) -> None:
    """Data, text, binary and empty payloads come back as written; the log's end is known."""
    store = await open_store(_url(tmp_path / "s.db"))
    await store.commit([_run("r", "alice")], [], [])
    events = [
        RunEvent("r", 1, T0, "d", data={"x": [1, "y", None]}),
        RunEvent("r", 2, T0, "t", text="héllo"),
        RunEvent("r", 3, T0, "b", binary=b"\x00\xff"),
        RunEvent("r", 4, T0, "n"),
    ]
    await store.commit([], events, [])
    assert await store.read_events("r", 1, 10) == events
    assert await store.read_events("r", 3, 1) == events[2:3]
    unfinished = await store.unfinished_runs()
    assert [r.last_seq for r in unfinished] == [4]  # the end of the log, read from the log
    await store.commit([], [], [unfinished[0].replace(state=RunState.SUCCEEDED, last_seq=4)])
    run = await store.get_run(Scope("alice"), "r")
    assert run is not None and run.last_seq == 4 and run.state is RunState.SUCCEEDED
    await store.close()


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


async def test_events_stored_in_wire_form_round_trip(tmp_path: Path) -> None:
    """With a codec, an event is stored once, in wire form, and reads back the same both ways."""
    store = await open_store(_url(tmp_path / "s.db"), encode_event, decode_event)
    await store.commit([_run("r", "alice")], [], [])
    failure = RunFailure("INTERNAL", "the agent failed", "err-1")
    events = [
        RunEvent("r", 1, T0, "d", data={"x": [1.5, "y", None], "n": {"k": True}}),
        RunEvent("r", 2, T0, "t", text="héllo"),
        RunEvent("r", 3, T0, "b", binary=b"\x00\xff"),
        RunEvent("r", 4, T0, STATE_EVENT, state=RunState.FAILED, error=failure),
    ]
    for event in events:
        event.wire = encode_event(event)
    await store.commit([], events, [])
    assert await store.read_events("r", 1, 10) == events
    encoded = await store.read_encoded("r", 1, 10)
    assert [(e.seq, e.wire, e.terminal) for e in encoded] == [
        (1, events[0].wire, False),
        (2, events[1].wire, False),
        (3, events[2].wire, False),
        (4, events[3].wire, True),
    ]
    with sqlite3.connect(tmp_path / "s.db") as conn:
        payloads = [p for (p,) in conn.execute("SELECT payload FROM run_events ORDER BY seq")]
    assert payloads == [None] * 4  # not encoded a second time
    await store.close()
