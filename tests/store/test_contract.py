"""The RunStore contract: every store implementation passes these, on every backend."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from runservice.api.convert import decode_event, encode_event
from runservice.domain.errors import StoreError, StoreUnavailableError
from runservice.domain.model import (
    STATE_EVENT,
    MultitaskStrategy,
    RunEvent,
    RunFailure,
    RunFilter,
    RunState,
    Scope,
)
from runservice.store import SqlRunStore, open_store
from runservice.store.migrations import MIGRATIONS
from runservice.store.sql import INSERT_CHUNK
from tests.store.conftest import at, make_run, query

ALICE, BOB, ADMIN = Scope("alice"), Scope("bob"), Scope("root", everyone=True)


def wired(*events: RunEvent) -> list[RunEvent]:
    """`events` with their wire forms set, as the writer commits them."""
    for event in events:
        event.wire = encode_event(event)
    return list(events)


def state_event(run_id: str, seq: int, state: RunState, **fields: object) -> RunEvent:
    """A lifecycle event of `run_id`."""
    return RunEvent(run_id, seq, at(seq), STATE_EVENT, state=state, **fields)  # type: ignore[arg-type]


async def ids(store: SqlRunStore, scope: Scope, run_filter: RunFilter | None = None) -> list[str]:
    """The ids `list_runs` returns for `scope` and `run_filter`, in one page."""
    runs = await store.list_runs(scope, run_filter or RunFilter(), None, 100)
    return [run.run_id for run in runs]


# --- migrate and probe ----------------------------------------------------------------


async def test_migrate_is_idempotent(store: SqlRunStore, store_url: str) -> None:
    """Migrating a migrated store again changes nothing, and each migration is recorded once."""
    await store.commit([make_run("r1")], [], [])
    await store.migrate()
    await store.migrate()
    versions = await query(store_url, "SELECT version FROM runservice_schema ORDER BY version")
    assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]
    assert await store.get_run(ALICE, "r1") is not None


async def test_reopening_keeps_every_row(store: SqlRunStore, store_url: str) -> None:
    """A second store opened on the same database sees what the first committed."""
    await store.commit(
        [make_run("r1", labels={"k": "v"})], wired(state_event("r1", 1, RunState.RUNNING)), []
    )
    again = await open_store(store_url, encode_event, decode_event)
    try:
        run = await again.get_run(ALICE, "r1")
        assert run is not None and run.labels == {"k": "v"}
        assert [e.seq for e in await again.read_events("r1", 1, 10)] == [1]
    finally:
        await again.close()


async def test_probe_writes_on_a_healthy_store(store: SqlRunStore) -> None:
    """probe() returns quietly when the store takes writes, and leaves the data as it was."""
    await store.commit([make_run("r1")], [], [])
    await store.probe()
    await store.probe()
    assert await ids(store, ALICE) == ["r1"]


async def test_a_shared_secret_is_the_first_one_proposed(
    store: SqlRunStore, store_url: str
) -> None:
    """shared_secret stores the first proposal and returns it to every later caller, on
    this store and on another one opened on the same database."""
    first = await store.shared_secret("page-tokens", b"a" * 32)
    assert first == b"a" * 32
    assert await store.shared_secret("page-tokens", b"b" * 32) == first
    assert await store.shared_secret("other", b"c" * 32) == b"c" * 32
    again = await open_store(store_url)
    try:
        assert await again.shared_secret("page-tokens", b"d" * 32) == first
    finally:
        await again.close()


# --- commit ---------------------------------------------------------------------------


async def test_a_new_run_round_trips_every_field(store: SqlRunStore) -> None:
    """Every field of a committed run reads back as it was written."""
    run = make_run(
        "r1",
        input={"prompt": "héllo", "n": [1, 2.5, None, True], "nested": {"k": "v"}},
        thread_id="t1",
        labels={"team": "core", "env": "prod"},
        request_id="req-1",
        request_hash="a" * 64,
        multitask_strategy=MultitaskStrategy.ENQUEUE,
        timeout=12.5,
        retention=86400.5,
    )
    await store.commit([run], [], [])
    assert await store.get_run(ALICE, "r1") == run


async def test_events_and_run_updates_commit_together(store: SqlRunStore) -> None:
    """One commit stores new runs, their events and updated rows of other runs."""
    await store.commit([make_run("old")], [], [])
    old = make_run("old", state=RunState.RUNNING, started_at=at(1), last_seq=1)
    events = wired(state_event("new", 1, RunState.RUNNING), state_event("old", 1, RunState.RUNNING))
    await store.commit([make_run("new")], events, [old])
    assert await store.get_run(ALICE, "old") == old
    assert await store.get_run(ALICE, "new") is not None
    assert [e.seq for e in await store.read_events("new", 1, 10)] == [1]
    assert [e.seq for e in await store.read_events("old", 1, 10)] == [1]


async def test_a_finished_run_stores_its_outcome(store: SqlRunStore) -> None:
    """An update to a terminal state stores result, error, end time, last seq and reason."""
    await store.commit([make_run("ok"), make_run("bad")], [], [])
    ok = make_run(
        "ok",
        state=RunState.SUCCEEDED,
        result={"answer": 42},
        started_at=at(1),
        ended_at=at(2),
        last_seq=3,
    )
    failure = RunFailure("INTERNAL", "the agent failed", "err-1")
    bad = make_run(
        "bad",
        state=RunState.STOPPED,
        error=failure,
        ended_at=at(3),
        stop_reason="user asked",
        last_seq=2,
    )
    await store.commit([], [], [ok, bad])
    assert await store.get_run(ALICE, "ok") == ok
    assert await store.get_run(ALICE, "bad") == bad


async def test_an_update_changes_only_what_a_run_may_change(store: SqlRunStore) -> None:
    """Upserting an existing run changes its state fields; owner, agent, input and the
    rest stay as first committed."""
    first = make_run("r1", input={"a": 1}, thread_id="t1", request_id="q")
    await store.commit([first], [], [])
    changed = first.replace(
        state=RunState.RUNNING,
        owner="bob",
        agent="other",
        input={"b": 2},
        thread_id="t2",
        request_id="other",
        started_at=at(1),
    )
    await store.commit([], [], [changed])
    got = await store.get_run(ALICE, "r1")
    assert got == first.replace(state=RunState.RUNNING, started_at=at(1))


async def test_a_run_new_and_updated_in_one_commit_ends_as_the_update(
    store: SqlRunStore,
) -> None:
    """A run both created and updated in one commit is stored as its latest version."""
    run = make_run("r1")
    running = run.replace(state=RunState.RUNNING, started_at=at(1))
    await store.commit([run], wired(state_event("r1", 1, RunState.RUNNING)), [running])
    assert await store.get_run(ALICE, "r1") == running


async def test_an_empty_commit_is_accepted(store: SqlRunStore) -> None:
    """A commit with nothing in it succeeds and stores nothing."""
    await store.commit([], [], [])
    assert await ids(store, ADMIN) == []


async def test_a_duplicate_seq_refuses_the_whole_commit(store: SqlRunStore) -> None:
    """A commit holding an event whose (run_id, seq) is taken fails as StoreError (not
    unavailable: retrying cannot help), and nothing of that commit is stored."""
    await store.commit([make_run("r1")], wired(state_event("r1", 1, RunState.RUNNING)), [])
    batch = wired(
        state_event("r2", 1, RunState.RUNNING),
        RunEvent("r1", 2, at(2), "token", text="fresh"),
        RunEvent("r1", 1, at(3), "token", text="duplicate"),
    )
    with pytest.raises(StoreError) as caught:
        await store.commit(
            [make_run("r2")], batch, [make_run("r1", state=RunState.RUNNING, last_seq=2)]
        )
    assert not isinstance(caught.value, StoreUnavailableError)
    assert await store.get_run(ALICE, "r2") is None
    assert await store.read_events("r2", 1, 10) == []
    assert [e.type for e in await store.read_events("r1", 1, 10)] == [STATE_EVENT]
    r1 = await store.get_run(ALICE, "r1")
    assert r1 is not None and r1.state is RunState.PENDING
    await store.commit([], wired(RunEvent("r1", 2, at(2), "token", text="fresh")), [])


async def test_a_batch_larger_than_one_insert_is_stored_whole(store: SqlRunStore) -> None:
    """Thousands of events of many runs in one commit are all stored, each log in order."""
    runs = [make_run(f"r{i}") for i in range(7)]
    count = 2 * INSERT_CHUNK + 37
    events = wired(
        *(RunEvent(f"r{n % 7}", n // 7 + 1, at(n), "t", text=str(n)) for n in range(count))
    )
    await store.commit(runs, events, [])
    stored = [e for run in runs for e in await store.read_events(run.run_id, 1, count)]
    assert len(stored) == count
    for run in runs:
        seqs = [e.seq for e in await store.read_events(run.run_id, 1, count)]
        assert seqs == list(range(1, len(seqs) + 1))


# --- get_run, list_runs ---------------------------------------------------------------


async def test_get_run_sees_only_the_owners_runs(store: SqlRunStore) -> None:
    """Another user's run is None, exactly like a run that does not exist; admins see it."""
    await store.commit([make_run("a1", "alice")], [], [])
    assert await store.get_run(BOB, "a1") is None
    assert await store.get_run(BOB, "nope") is None
    assert await store.get_run(ALICE, "a1") is not None
    assert await store.get_run(ADMIN, "a1") is not None


async def test_list_runs_is_newest_first_and_scoped(store: SqlRunStore) -> None:
    """A user lists their own runs, newest (highest id) first; admins list everyone's."""
    await store.commit(
        [make_run("01", "alice"), make_run("03", "alice"), make_run("02", "bob")], [], []
    )
    assert await ids(store, ALICE) == ["03", "01"]
    assert await ids(store, BOB) == ["02"]
    assert await ids(store, ADMIN) == ["03", "02", "01"]


async def test_run_ids_sort_byte_by_byte(store: SqlRunStore) -> None:
    """Ids compare as bytes, whatever the database's locale: punctuation and case count."""
    names = ["r-2", "r1", "rA", "ra", "r_0", "R9"]
    await store.commit([make_run(name) for name in names], [], [])
    assert await ids(store, ALICE) == sorted(names, key=str.encode, reverse=True)


async def test_list_runs_filters_by_state(store: SqlRunStore) -> None:
    """A states filter keeps runs in any of the given states."""
    await store.commit(
        [
            make_run("1", state=RunState.PENDING),
            make_run("2", state=RunState.RUNNING),
            make_run("3", state=RunState.SUCCEEDED),
        ],
        [],
        [],
    )
    wanted = RunFilter(states=frozenset({RunState.PENDING, RunState.SUCCEEDED}))
    assert await ids(store, ALICE, wanted) == ["3", "1"]


async def test_list_runs_filters_by_agent_and_thread(store: SqlRunStore) -> None:
    """Agent and thread filters keep only exact matches, together when both are given."""
    await store.commit(
        [
            make_run("1", agent="echo", thread_id="t1"),
            make_run("2", agent="ticker", thread_id="t1"),
            make_run("3", agent="echo", thread_id="t2"),
        ],
        [],
        [],
    )
    assert await ids(store, ALICE, RunFilter(agent="echo")) == ["3", "1"]
    assert await ids(store, ALICE, RunFilter(thread_id="t1")) == ["2", "1"]
    assert await ids(store, ALICE, RunFilter(agent="echo", thread_id="t1")) == ["1"]


async def test_list_runs_filters_by_every_label_given(store: SqlRunStore) -> None:
    """A labels filter keeps runs carrying every given key with its value."""
    await store.commit(
        [
            make_run("1", labels={"team": "core", "env": "prod"}),
            make_run("2", labels={"team": "core", "env": "dev"}),
            make_run("3", labels={"team": "web"}),
        ],
        [],
        [],
    )
    assert await ids(store, ALICE, RunFilter(labels={"team": "core"})) == ["2", "1"]
    assert await ids(store, ALICE, RunFilter(labels={"team": "core", "env": "prod"})) == ["1"]
    assert await ids(store, ALICE, RunFilter(labels={"env": "staging"})) == []


async def test_list_runs_pages_by_run_id(store: SqlRunStore) -> None:
    """Pages of `limit` runs below `before_run_id` cover every run once, newest first."""
    names = [f"{i:02d}" for i in range(7)]
    await store.commit([make_run(name) for name in names], [], [])
    await store.commit([make_run("b", "bob")], [], [])
    seen: list[str] = []
    before: str | None = None
    while True:
        page = await store.list_runs(ALICE, RunFilter(), before, 3)
        seen += [run.run_id for run in page]
        if len(page) < 3:
            break
        before = page[-1].run_id
    assert seen == sorted(names, reverse=True)


# --- read_events, read_encoded --------------------------------------------------------


async def test_every_payload_kind_round_trips(store: SqlRunStore) -> None:
    """Data, text, binary and empty payloads read back as written, with or without a wire
    form, and read_encoded encodes those stored without one."""
    await store.commit([make_run("plain"), make_run("wired")], [], [])
    payloads: list[dict[str, object]] = [
        {"data": {"x": [1, "y", None, 2.5], "n": {"k": True}}},
        {"text": "héllo ✓"},
        {"binary": bytes(range(256))},
        {},
    ]
    plain = [RunEvent("plain", i + 1, at(i), "t", **p) for i, p in enumerate(payloads)]  # type: ignore[arg-type]
    wire = wired(*(RunEvent("wired", i + 1, at(i), "t", **p) for i, p in enumerate(payloads)))  # type: ignore[arg-type]
    await store.commit([], [*plain, *wire], [])
    assert await store.read_events("plain", 1, 10) == plain
    assert await store.read_events("wired", 1, 10) == wire
    for run_id, events in (("plain", plain), ("wired", wire)):
        encoded = await store.read_encoded(run_id, 1, 10)
        decoded = [dataclasses.replace(decode_event(e.wire), wire=None) for e in encoded]
        assert decoded == [dataclasses.replace(e, wire=None) for e in events]


async def test_an_event_with_a_wire_form_is_stored_once(store: SqlRunStore, store_url: str) -> None:
    """An event committed with its wire form keeps no second encoding of its payload."""
    await store.commit([make_run("r")], [], [])
    await store.commit([], wired(RunEvent("r", 1, at(1), "t", text="x" * 1000)), [])
    assert [tuple(row) for row in await query(store_url, "SELECT payload FROM run_events")] == [
        (None,)
    ]
    assert [e.text for e in await store.read_events("r", 1, 10)] == ["x" * 1000]


async def test_reads_start_at_from_seq_and_stop_at_limit(store: SqlRunStore) -> None:
    """A page holds up to `limit` events with seq >= from_seq, in order; past the end, none."""
    await store.commit([make_run("r")], [], [])
    events = wired(*(RunEvent("r", seq, at(seq), "t", text=str(seq)) for seq in range(1, 11)))
    await store.commit([], list(reversed(events)), [])
    assert [e.seq for e in await store.read_events("r", 4, 3)] == [4, 5, 6]
    assert [e.seq for e in await store.read_encoded("r", 4, 3)] == [4, 5, 6]
    assert [e.seq for e in await store.read_events("r", 0, 100)] == list(range(1, 11))
    assert await store.read_events("r", 11, 10) == []
    assert await store.read_encoded("r", 11, 10) == []
    assert await store.read_encoded("unknown", 1, 10) == []


async def test_input_events_are_the_run_s_inputs_in_log_order(store: SqlRunStore) -> None:
    """input_events reads the run's `input` events alone, oldest first, with their data."""
    await store.commit([make_run("r"), make_run("other")], [], [])
    kinds = ["input", "token", "input", "input.requested", "input"]
    events = wired(
        *(RunEvent("r", seq, at(seq), kind, data={"n": seq}) for seq, kind in enumerate(kinds, 1)),
        RunEvent("other", 1, at(1), "input", data={"n": 99}),
    )
    await store.commit([], list(reversed(events)), [])
    inputs = await store.input_events("r")
    assert [(e.seq, e.type, e.data) for e in inputs] == [
        (1, "input", {"n": 1}),
        (3, "input", {"n": 3}),
        (5, "input", {"n": 5}),
    ]
    assert await store.input_events("unknown") == []


async def test_read_encoded_flags_the_terminal_event(store: SqlRunStore) -> None:
    """read_encoded gives each event's wire form as committed, and marks only the terminal
    event, whatever its state (a failure carrying its error included)."""
    failure = RunFailure("INTERNAL", "the agent failed", "err-1")
    for n, final in enumerate(
        (
            RunState.SUCCEEDED,
            RunState.FAILED,
            RunState.STOPPED,
            RunState.INTERRUPTED,
            RunState.TIMED_OUT,
        )
    ):
        run_id = f"r{n}"
        error = None if final is RunState.SUCCEEDED else failure
        events = wired(
            state_event(run_id, 1, RunState.PENDING),
            state_event(run_id, 2, RunState.RUNNING),
            RunEvent(run_id, 3, at(3), "token", text="x"),
            state_event(run_id, 4, final, error=error),
        )
        await store.commit([make_run(run_id)], events, [])
        encoded = await store.read_encoded(run_id, 1, 10)
        assert [(e.seq, e.wire, bool(e.terminal)) for e in encoded] == [
            (e.seq, e.wire, e.seq == 4) for e in events
        ]
        assert await store.read_events(run_id, 4, 1) == events[3:]


# --- delete_run, find_by_request_id ---------------------------------------------------


async def test_delete_run_removes_the_run_its_labels_and_its_log(store: SqlRunStore) -> None:
    """delete_run removes everything of the run and says so; a second delete finds nothing."""
    await store.commit(
        [make_run("r1", labels={"k": "v"}), make_run("r2", labels={"k": "v"})],
        wired(state_event("r1", 1, RunState.RUNNING), state_event("r2", 1, RunState.RUNNING)),
        [],
    )
    assert await store.delete_run(ALICE, "r1")
    assert await store.get_run(ALICE, "r1") is None
    assert await store.read_events("r1", 1, 10) == []
    assert await ids(store, ALICE, RunFilter(labels={"k": "v"})) == ["r2"]
    assert not await store.delete_run(ALICE, "r1")
    assert len(await store.read_events("r2", 1, 10)) == 1


async def test_delete_run_is_scoped_to_the_owner(store: SqlRunStore) -> None:
    """Another user cannot delete a run (False, run intact); an admin can."""
    await store.commit([make_run("a1", "alice")], wired(state_event("a1", 1, RunState.RUNNING)), [])
    assert not await store.delete_run(BOB, "a1")
    assert await store.get_run(ALICE, "a1") is not None
    assert len(await store.read_events("a1", 1, 10)) == 1
    assert await store.delete_run(ADMIN, "a1")
    assert await store.get_run(ALICE, "a1") is None


async def test_find_by_request_id_is_per_owner(store: SqlRunStore) -> None:
    """A request id finds the caller's own run started with it, never another user's."""
    await store.commit(
        [make_run("a1", "alice", request_id="q1"), make_run("b1", "bob", request_id="q1")], [], []
    )
    found = await store.find_by_request_id(ALICE, "q1")
    assert found is not None and found.run_id == "a1"
    found = await store.find_by_request_id(BOB, "q1")
    assert found is not None and found.run_id == "b1"
    assert await store.find_by_request_id(Scope("carol"), "q1") is None
    assert await store.find_by_request_id(ALICE, "q2") is None


async def test_a_request_id_is_unique_per_owner(store: SqlRunStore) -> None:
    """A second run of one owner with a used request id is refused (StoreError) and the
    first stays; other owners, and runs without a request id, are not limited."""
    await store.commit([make_run("a1", request_id="q1")], [], [])
    with pytest.raises(StoreError) as caught:
        await store.commit([make_run("a2", request_id="q1")], [], [])
    assert not isinstance(caught.value, StoreUnavailableError)
    assert await store.get_run(ALICE, "a2") is None
    found = await store.find_by_request_id(ALICE, "q1")
    assert found is not None and found.run_id == "a1"
    await store.commit([make_run("b1", "bob", request_id="q1")], [], [])
    await store.commit([make_run("a3"), make_run("a4")], [], [])
    assert await ids(store, ALICE) == ["a4", "a3", "a1"]


# --- purge_expired, unfinished_runs ---------------------------------------------------


async def test_purge_deletes_finished_runs_past_the_default_retention(store: SqlRunStore) -> None:
    """Runs without a retention of their own go once the default retention has passed
    since they ended, at most `limit` a call, with their labels and logs; the ids deleted
    are returned."""
    runs = [
        make_run("old1", state=RunState.SUCCEEDED, ended_at=at(10), labels={"k": "v"}),
        make_run("old2", state=RunState.FAILED, ended_at=at(20)),
        make_run("old3", "bob", state=RunState.STOPPED, ended_at=at(30)),
        make_run("recent", state=RunState.SUCCEEDED, ended_at=at(100)),
        make_run("active", state=RunState.RUNNING, started_at=at(5)),
        make_run("waiting", state=RunState.PENDING),
    ]
    events = wired(*(state_event(run.run_id, 1, RunState.RUNNING) for run in runs))
    await store.commit(runs, events, [])
    first = await store.purge_expired(at(150), 100.0, 2)  # ended before at(50)
    rest = await store.purge_expired(at(150), 100.0, 10)
    assert len(first) == 2 and sorted(first + rest) == ["old1", "old2", "old3"]
    assert await store.purge_expired(at(150), 100.0, 10) == []
    assert await ids(store, ADMIN) == ["waiting", "recent", "active"]
    assert await store.read_events("old1", 1, 10) == []
    assert await ids(store, ALICE, RunFilter(labels={"k": "v"})) == []
    assert len(await store.read_events("recent", 1, 10)) == 1


async def test_purge_honours_each_runs_own_retention(store: SqlRunStore) -> None:
    """A run with a retention of its own goes when that has passed since it ended,
    whatever the default; one that ends after it was first committed too; an active run
    never goes, whatever its retention."""
    await store.commit(
        [
            make_run("short", state=RunState.SUCCEEDED, ended_at=at(100), retention=10.0),
            make_run("long", state=RunState.FAILED, ended_at=at(0), retention=1000.0),
            make_run("default", state=RunState.STOPPED, ended_at=at(0)),
            make_run("active", state=RunState.RUNNING, retention=1.0),
            make_run("later", retention=5.0),
        ],
        [],
        [],
    )
    later = make_run("later", state=RunState.SUCCEEDED, ended_at=at(200), retention=5.0)
    await store.commit([], [], [later])
    assert await store.purge_expired(at(109), 500.0, 10) == []
    assert await store.purge_expired(at(110), 500.0, 10) == ["short"]
    assert await store.purge_expired(at(205), 500.0, 10) == ["later"]
    assert await store.purge_expired(at(999), 500.0, 10) == ["default"]
    assert await store.purge_expired(at(1000), 500.0, 10) == ["long"]
    assert await ids(store, ADMIN) == ["active"]


async def test_unfinished_runs_are_every_owners_with_the_real_end_of_their_logs(
    store: SqlRunStore,
) -> None:
    """unfinished_runs lists PENDING and RUNNING runs of all owners with last_seq read from
    the log (the row's may be older), and no finished run."""
    await store.commit(
        [
            make_run("a", "alice", state=RunState.RUNNING, last_seq=1, labels={"k": "v"}),
            make_run("b", "bob", state=RunState.PENDING),
            make_run("c", "carol", state=RunState.SUCCEEDED, last_seq=2),
        ],
        wired(
            *(RunEvent("a", seq, at(seq), "t", text="x") for seq in range(1, 6)),
            state_event("c", 1, RunState.RUNNING),
            state_event("c", 2, RunState.SUCCEEDED),
        ),
        [],
    )
    unfinished = await store.unfinished_runs()
    assert [(r.run_id, r.owner, r.state, r.last_seq) for r in unfinished] == [
        ("a", "alice", RunState.RUNNING, 5),
        ("b", "bob", RunState.PENDING, 0),
    ]
    assert unfinished[0].labels == {"k": "v"}


async def test_unfinished_runs_is_empty_on_a_new_store(store: SqlRunStore) -> None:
    """A new store has nothing to reconcile."""
    assert await store.unfinished_runs() == []


# --- concurrency ----------------------------------------------------------------------


async def test_reads_run_alongside_commits(store: SqlRunStore) -> None:
    """Reads made while commits are in flight see whole commits: each page of a log is a
    prefix of it, without holes."""
    await store.commit([make_run("r")], [], [])

    async def writer() -> None:
        for start in range(1, 200, 20):
            batch = (RunEvent("r", s, at(s), "t", text="x") for s in range(start, start + 20))
            await store.commit([], wired(*batch), [])

    async def reader() -> None:
        for _ in range(30):
            seqs = [e.seq for e in await store.read_encoded("r", 1, 1000)]
            assert seqs == list(range(1, len(seqs) + 1))
            assert len(seqs) % 20 == 0
            await asyncio.sleep(0)

    await asyncio.gather(writer(), reader(), reader())
    assert len(await store.read_events("r", 1, 1000)) == 200
