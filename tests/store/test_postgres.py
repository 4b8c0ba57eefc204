"""What only a database server does: outages and restarts, its connection pool, servers
migrating one database together, a locale's collation, and URLs that are not accepted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from runservice.api.convert import decode_event as decode
from runservice.api.convert import encode_event as encode
from runservice.domain.errors import StoreUnavailableError
from runservice.domain.model import RunEvent, RunFilter, RunState, Scope
from runservice.domain.replicas import PAYLOAD_LIMIT, Notice, commit_notice
from runservice.runtime.clock import SystemClock
from runservice.runtime.lifecycle import LEASE_FAILURE, LEASE_LOST, NO_RESUMES, orphan_fate
from runservice.store import SqlRunStore, open_store
from runservice.store.driver import SaSql
from runservice.store.engine import check_url
from runservice.store.lock import lock_for
from runservice.store.migrations import MIGRATIONS
from runservice.store.preflight import DatabaseRefusedError, check_sqlite_file
from tests.pgserver import PgServer, free_port
from tests.store.conftest import T0, make_run, query


def event(run_id: str, seq: int) -> RunEvent:
    """An encoded event of the run."""
    ev = RunEvent(run_id, seq, T0, "tick", text=f"{seq}")
    ev.wire = encode(ev)
    return ev


ALICE = Scope("alice")
UNREACHABLE = "the database cannot be reached"


@pytest.fixture
async def pg_store(postgres: PgServer) -> AsyncIterator[tuple[SqlRunStore, str]]:
    """A store on a new PostgreSQL database of its own, with the database's name."""
    name = postgres.create_database()
    store = await open_store(postgres.url(name))
    try:
        yield store, name
    finally:
        await store.close()
        postgres.drop_database(name)


async def test_a_server_nobody_listens_on_is_unreachable(postgres: PgServer) -> None:
    """Opening a store on a port with no server fails at once as unavailable, naming the
    cause in an operator's words."""
    url = postgres.url("postgres").replace(f":{postgres.port}/", f":{free_port()}/")
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        await open_store(url)
    assert caught.value.cause == UNREACHABLE
    assert time.monotonic() - started < 5


async def test_a_missing_database_is_named(postgres: PgServer) -> None:
    """A URL naming a database that does not exist is unavailable, and the cause says so."""
    with pytest.raises(StoreUnavailableError) as caught:
        await open_store(postgres.url("no_such_database"))
    assert caught.value.cause == "the database named in --db does not exist"


async def test_an_unknown_user_is_refused_login(postgres: PgServer) -> None:
    """A role the server does not know is reported as a refused login."""
    url = postgres.url("postgres").replace("postgres@", "nobody:secret@")
    with pytest.raises(StoreUnavailableError) as caught:
        await open_store(url)
    assert "refuses the login" in caught.value.cause
    assert "secret" not in str(caught.value)


async def test_terminated_connections_cost_no_failed_call(
    postgres: PgServer, pg_store: tuple[SqlRunStore, str]
) -> None:
    """After the server ends every session (an operator, a failover), the next commit and
    read succeed: pooled connections are checked before use."""
    store, name = pg_store
    await store.commit([make_run("r1")], [], [])
    assert await store.get_run(ALICE, "r1") is not None
    postgres.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )
    await store.commit([make_run("r2")], [], [])
    assert await store.get_run(ALICE, "r1") is not None


async def test_a_stopped_server_is_unavailable_until_it_is_back(
    postgres: PgServer, pg_store: tuple[SqlRunStore, str]
) -> None:
    """While the server is down, commits, probes and reads fail as unavailable (cause: it
    cannot be reached; nothing half-done); once it is back, the same store works again."""
    store, _name = pg_store
    await store.commit([make_run("r1")], [], [])
    postgres.halt()
    try:
        for call in (
            lambda: store.commit([make_run("r2")], [], []),
            store.probe,
            lambda: store.get_run(ALICE, "r1"),
            lambda: store.list_runs(ALICE, RunFilter(), None, 10),
            lambda: store.read_encoded("r1", 1, 10),
        ):
            with pytest.raises(StoreUnavailableError) as caught:
                await call()
            assert caught.value.cause == UNREACHABLE
    finally:
        postgres.resume()
    await store.probe()
    await store.commit([make_run("r2")], [], [])
    assert [r.run_id for r in await store.list_runs(ALICE, RunFilter(), None, 10)] == ["r2", "r1"]


async def test_the_pool_holds_at_most_its_size(
    postgres: PgServer, pg_store: tuple[SqlRunStore, str]
) -> None:
    """A store opened with pool_size 2 and no overflow uses at most 2 connections however
    many calls run at once, and every call completes."""
    _store, name = pg_store
    url = postgres.url(name)
    store = await open_store(url, pool_size=2, max_overflow=0)
    try:
        await store.commit([make_run(f"r{i}") for i in range(20)], [], [])
        seen: list[int] = []

        async def read(i: int) -> None:
            assert await store.get_run(ALICE, f"r{i}") is not None
            rows = await query(
                url,
                "SELECT count(*) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND application_name = 'runservice'",
            )
            seen.append(rows[0][0])

        await asyncio.gather(*(read(i) for i in range(20)))
        assert max(seen) <= 3  # the pool's two, and the first store's one idle connection
    finally:
        await store.close()


async def test_servers_starting_together_migrate_once(postgres: PgServer) -> None:
    """Several stores opened at once on a new database all start, and each migration is
    applied exactly once."""
    name = postgres.create_database()
    url = postgres.url(name)
    try:
        stores = await asyncio.gather(*(open_store(url) for _ in range(4)))
        for store in stores:
            await store.close()
        versions = await query(url, "SELECT version FROM runservice_schema ORDER BY version")
        assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]
    finally:
        postgres.drop_database(name)


async def test_run_ids_sort_byte_by_byte_under_a_locale_collation(postgres: PgServer) -> None:
    """On a database whose default collation is a language's (ICU en-US, which skips
    punctuation and folds case first), ListRuns still orders ids byte by byte."""
    name = f"icu_{free_port()}"
    postgres.psql(
        f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' "
        "LOCALE 'C.UTF-8'"
    )
    store = await open_store(postgres.url(name))
    try:
        names = ["r-2", "r1", "rA", "ra", "r_0", "R9"]
        await store.commit([make_run(n, state=RunState.RUNNING) for n in names], [], [])
        listed = await store.list_runs(ALICE, RunFilter(), None, 10)
        assert [r.run_id for r in listed] == sorted(names, key=str.encode, reverse=True)
        page = await store.list_runs(ALICE, RunFilter(), "r1", 10)
        assert [r.run_id for r in page] == [n for n in sorted(names, reverse=True) if n < "r1"]
    finally:
        await store.close()
        postgres.drop_database(name)


def test_the_sqlite_file_lock_and_preflight_leave_postgresql_alone() -> None:
    """A PostgreSQL URL gets no lock file and no SQLite file check (both are for files)."""
    url = "postgresql+asyncpg://u:pw@127.0.0.1:1/db"
    assert lock_for(url) is None
    check_sqlite_file(url, MIGRATIONS[-1].version)  # reads nothing, refuses nothing


def test_only_supported_urls_are_accepted() -> None:
    """A URL of another database or driver is refused with the forms that work, and the
    refusal never shows the URL's password."""
    for url in ("mysql+aiomysql://u:hunter2@h/db", "postgresql://u:hunter2@h/db", "nonsense"):
        with pytest.raises(DatabaseRefusedError) as caught:
            check_url(url)
        assert "postgresql+asyncpg://" in str(caught.value)
        assert "hunter2" not in str(caught.value)
    assert check_url("postgresql+asyncpg://u:pw@h:5432/db").get_backend_name() == "postgresql"


async def test_a_run_whose_lease_is_gone_is_fenced_alone(postgres: PgServer) -> None:
    """Replica A's lease expires and B ends its runs: A's later commit of those runs'
    events writes nothing of them (the database refuses them), while a run of A's new lease
    in the same commit is written; lease renewal tells on time, late and gone apart."""
    name = postgres.create_database()
    a = await open_store(postgres.url(name), encode, decode)
    b = await open_store(postgres.url(name), encode, decode)
    try:
        assert a.cluster is not None and b.cluster is not None
        await a.cluster.begin_lease("replica-a", "a1", 30)
        await b.cluster.begin_lease("replica-b", "b1", 30)
        a.fence_by("a1")
        b.fence_by("b1")
        old = make_run("r1", executor="a1", state=RunState.RUNNING)
        assert await a.commit([old], [event("r1", 1)], []) == frozenset()
        assert await a.cluster.renew("a1", 30) is True
        postgres.psql("UPDATE runservice_leases SET expires_us = 0 WHERE holder = 'a1'", name)
        assert await b.cluster.expire_leases() == ["a1"]
        fate = partial(
            orphan_fate,
            clock=SystemClock(),
            resumes=NO_RESUMES,
            reason=LEASE_LOST,
            failure=LEASE_FAILURE,
        )
        ended = await b.cluster.end_orphans("b1", fate)
        assert [(r.run_id, r.state, r.last_seq) for r in ended] == [("r1", RunState.INTERRUPTED, 2)]
        assert await a.cluster.renew("a1", 30) is None  # gone: a peer ended it
        await a.cluster.begin_lease("replica-a", "a2", 30)
        a.fence_by("a2")
        new = make_run("r2", executor="a2")
        fenced = await a.commit([new], [event("r1", 2), event("r2", 1)], [old])
        assert fenced == frozenset({"r1"})
        log = await a.read_events("r1", 1, 10)
        assert [(e.seq, e.state) for e in log] == [(1, None), (2, RunState.INTERRUPTED)]
        assert [e.seq for e in await a.read_events("r2", 1, 10)] == [1]
        assert (await a.get_run(ALICE, "r1")).state is RunState.INTERRUPTED  # type: ignore[union-attr]
        postgres.psql("UPDATE runservice_leases SET expires_us = 0 WHERE holder = 'a2'", name)
        assert await a.cluster.renew("a2", 30) is False  # late, but nobody ended it
    finally:
        await a.close()
        await b.close()
        postgres.drop_database(name)


def test_notices_stay_under_the_payload_limit() -> None:
    """A commit of thousands of runs is told in a few notifications, each under the
    limit, and they say it all."""
    events = [RunEvent(f"run-{i:05d}-{'x' * 28}", 7, T0, "tick") for i in range(3000)]
    notice = commit_notice([], events, [])
    payloads = notice.payloads("holder")
    assert all(len(p.encode()) < PAYLOAD_LIMIT + 200 for p in payloads)
    assert len(payloads) <= 3000 * 50 // PAYLOAD_LIMIT + 1
    heard: dict[str, int] = {}
    for payload in payloads:
        holder, part = Notice.parse(payload)
        assert holder == "holder"
        heard.update(part.seqs)
    assert heard == {e.run_id: 7 for e in events}


async def test_a_replica_stalled_mid_commit_does_not_hold_up_the_sweep(postgres: PgServer) -> None:
    """Replica A stalls inside a commit (a long pause, SIGSTOP) holding the lock on its
    expired lease: the database ends A's session after the idle-in-transaction limit, so
    B's sweep deletes the lease then, instead of waiting for A forever; A's commit fails
    as unavailable."""
    name = postgres.create_database()
    a = await open_store(postgres.url(name), encode, decode, idle_in_transaction=1.0)
    b = await open_store(postgres.url(name), encode, decode)
    try:
        assert a.cluster is not None and b.cluster is not None
        await a.cluster.begin_lease("replica-a", "a1", 30)
        a.fence_by("a1")
        await a.commit([make_run("r1", executor="a1", state=RunState.RUNNING)], [], [])
        stalled = asyncio.Event()

        async def stall(conn: AsyncConnection) -> None:  # the KEY SHARE lock, then a stall
            assert a.cluster is not None
            await a.cluster.fenced(SaSql(conn), [], ["r1"])
            stalled.set()
            await asyncio.sleep(30)

        commit = asyncio.create_task(a.transaction(stall, retry=False))
        await asyncio.wait_for(stalled.wait(), 5)
        postgres.psql("UPDATE runservice_leases SET expires_us = 0 WHERE holder = 'a1'", name)
        started = time.monotonic()
        assert await asyncio.wait_for(b.cluster.expire_leases(), 10) == ["a1"]
        assert time.monotonic() - started < 5
        commit.cancel()
        await asyncio.gather(commit, return_exceptions=True)
    finally:
        await a.close()
        await b.close()
        postgres.drop_database(name)
