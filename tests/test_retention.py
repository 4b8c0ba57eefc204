"""Per-run retention (AIP-214): StartRunRequest.retention, Run.expire_time, and the purge
that honours each run's own retention, through the real server over a real SQLite file
(and, for the store, PostgreSQL too)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from sqlalchemy import event, text

from runservice import cli, config
from runservice.api.convert import decode_event, encode_event, run_to_proto
from runservice.app import ConfigError, build
from runservice.client import AsyncRunClient
from runservice.config import Settings
from runservice.domain.model import RunState, Scope
from runservice.store import SqlRunStore, migrations, open_store
from runservice.store.engine import make_engine, sqlite_url
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness, wait_for
from tests.fakes import gate
from tests.helpers import TERMINAL, error_info, struct
from tests.pgserver import PgServer
from tests.store.conftest import at

MakeServer = Callable[..., Awaitable[Harness]]
DEFAULT = 3600.0
"""The --retention of this module's servers, in seconds."""
SECOND_NS = 1_000_000_000


def _request(agent: str = "echo", retention: float | None = None, **fields: Any) -> Any:
    """A StartRunRequest of `agent`, asking for `retention` seconds when given."""
    request = pb.StartRunRequest(agent=agent, **fields)
    if retention is not None:
        request.retention.FromNanoseconds(round(retention * SECOND_NS))
    return request


async def _get(caller: Any, run_id: str) -> run_pb2.Run:
    run: run_pb2.Run = (await caller.GetRun(pb.GetRunRequest(run_id=run_id))).run
    return run


async def _finished(caller: Any, run_id: str) -> run_pb2.Run:
    """The run, once GetRun shows it terminal."""

    async def terminal() -> run_pb2.Run | None:
        run = await _get(caller, run_id)
        return run if run.state in TERMINAL else None

    done: run_pb2.Run = await wait_for(terminal)
    return done


async def _gone(caller: Any, run_id: str) -> bool:
    """True once GetRun answers NOT_FOUND for the run."""
    try:
        await _get(caller, run_id)
    except grpc.aio.AioRpcError as exc:
        return exc.code() == grpc.StatusCode.NOT_FOUND
    return False


def _kept_for(run: run_pb2.Run) -> float:
    """expire_time - end_time, in seconds."""
    return (run.expire_time.ToNanoseconds() - run.end_time.ToNanoseconds()) / SECOND_NS


# -- purge --------------------------------------------------------------------------------


async def test_a_run_with_a_short_retention_is_purged_while_a_default_one_is_kept(
    make_server: MakeServer,
) -> None:
    """A run that asked for 60s goes, run and log, 60s after it ended; a run that asked for
    nothing stays until the server's --retention has passed too."""
    server = await make_server(retention=DEFAULT, purge_interval=0.05)
    alice = server.caller("alice")
    short = (await alice.StartRun(_request(retention=60, input=struct(text="short")))).run
    kept = (await alice.StartRun(_request(input=struct(text="kept")))).run
    await _finished(alice, short.run_id)
    await _finished(alice, kept.run_id)
    server.clock.advance(59)
    assert await server.app.manager.purge() == 0
    server.clock.advance(1)
    await wait_for(lambda: _gone(alice, short.run_id))
    assert await server.app.store.read_events(short.run_id, 1, 10) == []
    assert (await _get(alice, kept.run_id)).run_id == kept.run_id
    assert await server.app.store.read_events(kept.run_id, 1, 10) != []
    server.clock.advance(DEFAULT - 60)
    await wait_for(lambda: _gone(alice, kept.run_id))


# -- expire_time --------------------------------------------------------------------------


async def test_expire_time_is_unset_while_active_then_end_time_plus_the_retention(
    server: Harness,
) -> None:
    """StartRun, GetRun, ListRuns and WatchRuns show no expire_time while the run is active;
    once it ended, each shows end_time + its retention (the server's default for a run
    that asked for none)."""
    alice = server.caller("alice")
    watch = alice.WatchRuns(pb.WatchRunsRequest())
    changes: list[pb.WatchRunsResponse] = []

    async def follow() -> None:
        async for change in watch:
            changes.append(change)

    follower = asyncio.create_task(follow())
    try:
        await wait_for(lambda: any(c.change == pb.RUN_CHANGE_SNAPSHOT_END for c in changes))
        started = (await alice.StartRun(_request("gated", 120, input=struct(gate="r1")))).run
        assert not started.HasField("expire_time")
        running = await _get(alice, started.run_id)
        assert running.state in (run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING)
        assert not running.HasField("expire_time")
        listed = (await alice.ListRuns(pb.ListRunsRequest())).runs
        assert [r.HasField("expire_time") for r in listed] == [False]
        gate("r1").set()
        ended = await _finished(alice, started.run_id)
        assert _kept_for(ended) == 120
        listed = (await alice.ListRuns(pb.ListRunsRequest())).runs
        assert listed[0].expire_time == ended.expire_time

        def watched_end() -> pb.WatchRunsResponse | None:
            ends = [c for c in changes if c.run.run_id == ended.run_id and c.run.state in TERMINAL]
            return ends[0] if ends else None

        change = await wait_for(watched_end)
        assert change.run.expire_time == ended.expire_time
        updates = [
            c for c in changes if c.run.run_id == ended.run_id and c.run.state not in TERMINAL
        ]
        assert updates and not any(c.run.HasField("expire_time") for c in updates)
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
    default = (await alice.StartRun(_request())).run
    assert _kept_for(await _finished(alice, default.run_id)) == Settings.retention


async def test_the_http_edge_shows_expire_time_and_takes_a_retention(
    make_server: MakeServer,
) -> None:
    """POST /v1/runs takes `retention` as a proto JSON duration; GET /v1/runs/{id} shows the
    finished run's expire_time, end_time + that retention."""
    server = await make_server(http_listen="127.0.0.1:0")
    base = f"http://127.0.0.1:{server.app.http_port}"
    auth = {"Authorization": f"Bearer {server.tokens['alice']}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        body = {"agent": "echo", "input": {"text": "hi"}, "retention": "90s"}
        async with session.post(f"{base}/v1/runs", json=body) as response:
            assert response.status == 200, await response.text()
            started = (await response.json())["run"]
        ended = await _finished(server.caller("alice"), started["run_id"])
        async with session.get(f"{base}/v1/runs/{started['run_id']}") as response:
            shown = (await response.json())["run"]
    assert _kept_for(ended) == 90
    assert shown["expire_time"] == ended.expire_time.ToJsonString()


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos", "says"),
    [
        (-5, 0, "at least 1s"),
        (0, 0, "at least 1s"),
        (0, 999_999_999, "at least 1s"),
        (1, 1_000_000_000, "at least 1s"),  # not a valid Duration
        (3601, 0, "at most 1h on this server (--max-retention)"),
        (10**12, 0, "at most 1h on this server (--max-retention)"),
    ],
)
async def test_a_retention_out_of_bounds_is_refused_and_nothing_is_written(
    make_server: MakeServer, seconds: int, nanos: int, says: str
) -> None:
    """A retention below one second, negative, malformed or above --max-retention is
    INVALID_ARGUMENT (reason INVALID_ARGUMENT, field `retention`); no run is written, and
    its request_id stays free."""
    server = await make_server(retention=60.0, max_retention=DEFAULT)
    alice = server.caller("alice")
    request = pb.StartRunRequest(agent="echo", request_id="key")
    request.retention.seconds = seconds
    request.retention.nanos = nanos
    request.retention.SetInParent()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.StartRun(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info is not None and info.reason == "INVALID_ARGUMENT"
    assert info.metadata["field"] == "retention"
    details = caught.value.details() or ""
    assert details.startswith("retention: ") and says in details
    assert list((await alice.ListRuns(pb.ListRunsRequest())).runs) == []
    assert await server.app.store.find_by_request_id(Scope("alice"), "key") is None
    fine = (await alice.StartRun(_request(retention=DEFAULT, request_id="key"))).run
    assert fine.run_id


async def test_the_same_request_id_with_another_retention_is_refused(server: Harness) -> None:
    """A retry with the same request_id and retention returns the run; the same key with a
    different retention, or with none, is ALREADY_EXISTS (REQUEST_ID_REUSED)."""
    alice = server.caller("alice")
    first = (await alice.StartRun(_request(retention=60, request_id="k"))).run
    again = (await alice.StartRun(_request(retention=60, request_id="k"))).run
    assert again.run_id == first.run_id
    for other in (_request(retention=61, request_id="k"), _request(request_id="k")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await alice.StartRun(other)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        info = error_info(caught.value)
        assert info is not None and info.reason == "REQUEST_ID_REUSED"
    # A run that asked for none is not the same request as one asking for the default.
    plain = (await alice.StartRun(_request(request_id="p"))).run
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.StartRun(_request(retention=Settings.retention, request_id="p"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (await alice.StartRun(_request(request_id="p"))).run.run_id == plain.run_id


# -- restarts and rows from before the migration ---------------------------------------------


@pytest.fixture
def server_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The database URL for servers that must share one (the backend of --store)."""
    if request.config.getoption("--store") != "postgresql":
        yield sqlite_url(str(tmp_path / "shared.db"))
        return
    server: PgServer = request.getfixturevalue("postgres")
    name = server.create_database("restart")
    yield server.url(name)
    server.drop_database(name)


async def test_a_runs_retention_survives_a_restart(make_server: MakeServer, server_db: str) -> None:
    """After a restart the run shows the same expire_time, a retry of its request is still
    a retry, and the new server's purge uses the retention stored with the run."""
    first = await make_server(db=server_db, retention=DEFAULT, purge_interval=DEFAULT)
    alice = first.caller("alice")
    short = (await alice.StartRun(_request(retention=60, request_id="s"))).run
    kept = (await alice.StartRun(_request())).run
    short_end = await _finished(alice, short.run_id)
    await _finished(alice, kept.run_id)
    await first.channel.close()
    await first.app.stop()
    again = await make_server(db=server_db, retention=DEFAULT, purge_interval=0.05)
    alice = again.caller("alice")
    assert (await _get(alice, short.run_id)).expire_time == short_end.expire_time
    retry = (await alice.StartRun(_request(retention=60, request_id="s"))).run
    assert retry.run_id == short.run_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await alice.StartRun(_request(retention=120, request_id="s"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    again.clock.advance(60)
    await wait_for(lambda: _gone(alice, short.run_id))
    assert (await _get(alice, kept.run_id)).run_id == kept.run_id


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database of each backend."""
    if request.param == "sqlite":
        yield sqlite_url(str(tmp_path / "old.db"))
        return
    server: PgServer = request.getfixturevalue("postgres")
    name = server.create_database("retention")
    yield server.url(name)
    server.drop_database(name)


_V5_COLUMNS = (
    "run_id, owner, agent, state, input, result, error, thread_id, labels, created_us, "
    "started_us, ended_us, last_seq, stop_reason, request_id, multitask_strategy, timeout_s, "
    "request_hash, executor"
)


def _v5_row(run_id: str, state: str, ended: int | None) -> str:
    ended_us = "NULL" if ended is None else str(int(at(ended).timestamp() * 1_000_000))
    created = int(at(0).timestamp() * 1_000_000)
    return (
        f"('{run_id}', 'alice', 'echo', '{state}', '{{}}', NULL, NULL, '', '{{}}', {created}, "
        f"{created}, {ended_us}, 1, '', '', 'REJECT', NULL, '', '')"
    )


async def _database_at_version_5(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Migrates the database at `url` as a release without per-run retention did, and
    writes a finished run and an active one as that release wrote them."""
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:5])
        patch.setattr(migrations, "LATEST_VERSION", 5)
        engine = make_engine(url)
        try:
            await migrations.migrate(engine)
            async with engine.begin() as conn:
                rows = f"{_v5_row('old', 'SUCCEEDED', 10)}, {_v5_row('live', 'RUNNING', None)}"
                await conn.execute(text(f"INSERT INTO runs ({_V5_COLUMNS}) VALUES {rows}"))
        finally:
            await engine.dispose()


async def test_rows_written_before_the_migration_use_the_servers_default(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs stored by a release before migration 6 have no retention of their own: they
    show end_time + the server's default and are purged once it has passed; an active
    one is never purged."""
    assert [m.version for m in migrations.MIGRATIONS][:6] == [1, 2, 3, 4, 5, 6]
    await _database_at_version_5(database_url, monkeypatch)
    store = await open_store(database_url, encode_event, decode_event)
    try:
        old = await store.get_run(Scope("alice"), "old")
        assert old is not None and old.retention is None
        assert run_to_proto(old, 500.0).expire_time.ToDatetime().timestamp() == at(510).timestamp()
        assert await store.purge_expired(at(509), 500.0, 10) == []
        assert await store.purge_expired(at(510), 500.0, 10) == ["old"]
        assert await store.purge_expired(at(10**6), 1.0, 10) == []
        live = await store.get_run(Scope("alice"), "live")
        assert live is not None and live.state is RunState.RUNNING
    finally:
        await store.close()


async def test_the_purge_is_one_query_over_two_indexes(database_url: str) -> None:
    """Each purge batch is one SELECT that both databases answer from the expiry index and
    the (retention, end) index, never by scanning the table."""
    store = await open_store(database_url, encode_event, decode_event)
    selects: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "expire_us" in statement:
            selects.append((statement, params))

    sync_engine = store._engine.sync_engine  # where the statement the store sends is seen
    event.listen(sync_engine, "before_cursor_execute", seen)
    try:
        await store.purge_expired(at(100), 10.0, 500)
        assert len(selects) == 1
        plan = await _plan(store, *selects[0])
    finally:
        event.remove(sync_engine, "before_cursor_execute", seen)
        await store.close()
    assert "ix_runs_expire" in plan and "ix_runs_retention_ended" in plan, plan


async def _plan(store: SqlRunStore, statement: str, params: Any) -> str:
    """The database's plan of `statement`, as text (sequential scans disabled on
    PostgreSQL, which prefers one on a table this small)."""
    async with store.connection() as conn:
        if conn.dialect.name == "postgresql":
            await conn.exec_driver_sql("SET enable_seqscan = off")
            rows = await conn.exec_driver_sql(f"EXPLAIN {statement}", params)
        else:
            rows = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
        return "\n".join(str(row) for row in rows)


# -- configuration, client, CLI -------------------------------------------------------------


async def test_a_default_retention_above_the_maximum_is_refused_at_startup(
    tmp_path: Path,
) -> None:
    """--retention above --max-retention stops the server before it opens the store,
    naming both options and what to do."""
    with pytest.raises(ConfigError) as caught:
        await build(Settings(listen="127.0.0.1:0", data_dir=tmp_path, retention=91 * 86400.0))
    message = str(caught.value)
    assert "--retention (91d) must not exceed --max-retention (90d)" in message
    assert not (tmp_path / "runservice.db").exists()


def test_max_retention_is_a_flag_a_variable_and_a_file_key(tmp_path: Path) -> None:
    """--max-retention, RUNSERVICE_MAX_RETENTION and `max-retention` in a configuration file
    set it (90d by default); below 1s or above 36600d is refused."""
    parser = argparse.ArgumentParser()
    config.add_serve_arguments(parser)
    assert config.settings_from_args(parser.parse_args([]), {}).max_retention == 90 * 86400.0
    flagged = parser.parse_args(["--max-retention", "30d"])
    assert config.settings_from_args(flagged, {}).max_retention == 30 * 86400.0
    env = {"RUNSERVICE_MAX_RETENTION": "2h"}
    assert config.settings_from_args(parser.parse_args([]), env).max_retention == 7200.0
    file = tmp_path / "server.toml"
    file.write_text('max-retention = "1d"\n')
    assert config.read_config_file(file) == {"max_retention": 86400.0}
    for bad in ("0.5s", "36601d"):
        with pytest.raises(SystemExit):
            config.settings_from_args(parser.parse_args([]), {"RUNSERVICE_MAX_RETENTION": bad})


async def test_the_python_client_and_the_cli_pass_a_retention(
    server: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    """AsyncRunClient.start_run(retention=) takes seconds or a timedelta, and `runservice
    start --retention DURATION` passes it on: each run expires that long after its end."""
    alice = server.caller("alice")
    async with AsyncRunClient(server.address, token=server.tokens["alice"]) as client:
        by_seconds = await client.start_run("echo", {"text": "s"}, retention=75.5)
        by_delta = await client.start_run("echo", {"text": "d"}, retention=timedelta(minutes=2))
    argv = ["start", "echo", "--retention", "30d", "--json", "--addr", server.address]
    argv += ["--token", server.tokens["alice"]]
    assert await asyncio.to_thread(cli.main, argv) == 0
    by_cli = json.loads(capsys.readouterr().out)
    assert _kept_for(await _finished(alice, by_seconds.run_id)) == 75.5
    assert _kept_for(await _finished(alice, by_delta.run_id)) == 120
    assert _kept_for(await _finished(alice, by_cli["run_id"])) == 30 * 86400
