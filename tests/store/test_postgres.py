"""What only a database server does: outages and restarts, its connection pool, servers
migrating one database together, a locale's collation, and URLs that are not accepted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from runservice.domain.errors import StoreUnavailableError
from runservice.domain.model import RunFilter, RunState, Scope
from runservice.store import SqlRunStore, open_store
from runservice.store.engine import check_url
from runservice.store.lock import DatabaseInUseError, lock_for
from runservice.store.migrations import MIGRATIONS
from runservice.store.preflight import DatabaseRefusedError, check_sqlite_file
from tests.pgserver import PgServer, free_port
from tests.store.conftest import make_run, query

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


async def test_one_server_per_database_until_replicas_exist(postgres: PgServer) -> None:
    """A second store claiming a PostgreSQL database another one holds is refused (its start
    would interrupt the first one's runs); once the first closes, the claim succeeds."""
    name = postgres.create_database()
    first = await open_store(postgres.url(name))
    second = await open_store(postgres.url(name))
    try:
        await first.claim()
        with pytest.raises(DatabaseInUseError, match="another runservice server"):
            await second.claim()
        await first.close()
        await second.claim()
    finally:
        await first.close()
        await second.close()
        postgres.drop_database(name)


async def test_a_claim_lost_with_its_session_is_taken_again_or_reported(
    postgres: PgServer,
) -> None:
    """When the session holding a server's claim ends (a database restart, an operator),
    keep_claim takes it again, so a second server is still refused; if another server took
    the database in between, keep_claim says so (the first must stop)."""
    name = postgres.create_database()
    first = await open_store(postgres.url(name))
    second = await open_store(postgres.url(name))
    end_sessions = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )
    try:
        await first.claim()
        postgres.psql(end_sessions)
        await first.keep_claim()
        with pytest.raises(DatabaseInUseError):
            await second.claim()

        postgres.psql(end_sessions)
        await second.close()
        second = await open_store(postgres.url(name))
        await second.claim()  # the claim was free: another server takes the database
        with pytest.raises(DatabaseInUseError):
            await first.keep_claim()
    finally:
        await first.close()
        await second.close()
        postgres.drop_database(name)
