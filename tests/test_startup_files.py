"""Files the server is given at start, and the tokens file edited while it serves.

A file the server cannot use (a corrupt, foreign or newer database, a data directory that
is not one, a tokens file that is not valid) stops `runservice serve` with exit status 1
and one line on stderr naming the file and the problem, and the file is left byte for
byte as it was. Each case runs a real server process; one that starts is stopped as soon
as it logs that it is listening, and the test fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runservice.domain.model import Run, RunState
from runservice.store import open_store
from runservice.store.engine import sqlite_url
from runservice.store.migrations import LATEST_VERSION
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness
from tests.serverproc import Exit, serve_until_exit

MakeServer = Callable[..., Awaitable[Harness]]
GARBAGE = bytes(range(256)) * 20
CORRUPT = "is not a runservice database: the file is corrupt or not SQLite"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, or of a directory's listing."""
    if path.is_dir():
        return hashlib.sha256("\n".join(sorted(os.listdir(path))).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def side_files(db: Path) -> list[str]:
    """The files SQLite keeps beside `db` (-wal, -shm, -journal) that exist."""
    return [f"{db}{suffix}" for suffix in SQLITE_SIDE_FILES if Path(f"{db}{suffix}").exists()]


def assert_refused(result: Exit, *phrases: str) -> None:
    """Exit status 1, no traceback, and the last line is the error saying `phrases`."""
    log = "\n".join(result.lines)
    assert result.code == 1, f"exit status {result.code}:\n{log}"
    assert "Traceback" not in log, log
    assert " ERROR " in result.last, log
    for phrase in phrases:
        assert phrase in result.last, log


@pytest.fixture(scope="module")
def runservice_db(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a closed runservice database at the current schema version."""
    path = tmp_path_factory.mktemp("template") / "runservice.db"

    async def create() -> None:
        store = await open_store(sqlite_url(str(path)))
        await store.close()

    asyncio.run(create())
    return path.read_bytes()


def _foreign_db(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO notes (body) VALUES ('not runservice data')")
    conn.close()


def _newer_db(template: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(template)
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO runservice_schema (version, description, applied_us) "
                "VALUES (?, 'from a later release', 0)",
                (LATEST_VERSION + 1,),
            )
        conn.close()

    return write


DATABASES: dict[str, tuple[str, ...]] = {
    "garbage": (CORRUPT,),
    "truncated": (CORRUPT,),
    "a directory": ("runservice.db is a directory, not a database file",),
    "foreign": ("is not a runservice database", "notes", "runservice_schema"),
    "newer": (
        f"schema version {LATEST_VERSION + 1} is newer than this release supports "
        f"({LATEST_VERSION}); "
        "upgrade runservice",
    ),
}


@pytest.mark.parametrize("kind", sorted(DATABASES))
async def test_an_unusable_database_stops_the_server_and_is_left_untouched(
    kind: str, tmp_path: Path, runservice_db: bytes
) -> None:
    """A corrupt, foreign or newer database, or a directory in its place, is refused as is."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "runservice.db"
    make: dict[str, Callable[[Path], object]] = {
        "garbage": lambda p: p.write_bytes(GARBAGE),
        "truncated": lambda p: p.write_bytes(runservice_db[: len(runservice_db) // 2]),
        "a directory": lambda p: p.mkdir(),
        "foreign": _foreign_db,
        "newer": _newer_db(runservice_db),
    }
    make[kind](db)
    before = digest(db)

    result = await serve_until_exit(data_dir)

    assert_refused(result, str(db), *DATABASES[kind])
    assert digest(db) == before
    assert side_files(db) == []


async def test_a_data_directory_that_is_a_file_stops_the_server(tmp_path: Path) -> None:
    """A --data-dir that is a file is refused, naming it, and the file is left untouched."""
    data_dir = tmp_path / "data"
    data_dir.write_bytes(b"not a directory\n")
    before = digest(data_dir)

    result = await serve_until_exit(data_dir)

    assert_refused(result, str(data_dir), "not a directory")
    assert digest(data_dir) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
async def test_a_read_only_data_directory_stops_the_server(tmp_path: Path) -> None:
    """A --data-dir the server cannot write to is refused, naming it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o500)
    try:
        result = await serve_until_exit(data_dir)
    finally:
        data_dir.chmod(0o700)

    assert_refused(result, str(data_dir), "not writable")
    assert os.listdir(data_dir) == []


TOKENS_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "not an array": ('tokens = "x"\n', ("tokens must be an array of [[tokens]] tables",)),
    "no sha256": ('[[tokens]]\nuser = "alice"\n', ("tokens[0] needs sha256",)),
    "not a table": ("tokens = [1]\n", ("tokens[0] must be a table",)),
    "invalid TOML": ('[[tokens]\nuser = "alice"\n', ("not valid TOML", "line 1, column")),
}


@pytest.mark.parametrize("kind", sorted(TOKENS_FILES))
async def test_an_invalid_tokens_file_stops_the_server_and_is_left_untouched(
    kind: str, tmp_path: Path
) -> None:
    """A tokens file that is not valid TOML or not [[tokens]] entries is refused, saying where."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tokens = data_dir / "tokens.toml"
    content, phrases = TOKENS_FILES[kind]
    tokens.write_text(content)
    before = digest(tokens)

    result = await serve_until_exit(data_dir)

    assert_refused(result, str(tokens), *phrases)
    assert digest(tokens) == before


async def test_a_sqlite_file_without_tables_becomes_a_runservice_database(tmp_path: Path) -> None:
    """An empty SQLite file (no tables) is taken and migrated like a new one."""
    path = tmp_path / "empty.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 1")  # a real header, still no tables
    conn.close()

    store = await open_store(sqlite_url(str(path)))
    await store.close()

    with sqlite3.connect(path) as conn:
        (version,) = conn.execute("SELECT max(version) FROM runservice_schema").fetchone()
    conn.close()
    assert version == LATEST_VERSION


# -- the tokens file edited while the server runs --------------------------------------------


@pytest.fixture
def errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The log records of level ERROR and above."""
    with caplog.at_level(logging.ERROR, logger="runservice"):
        yield caplog


@pytest.mark.parametrize(
    "content",
    [
        pytest.param('tokens = "x"\n', id="not an array"),
        pytest.param("tokens = [1]\n", id="not a table"),
        pytest.param('[[tokens]\nuser = "alice"\n', id="invalid TOML"),
    ],
)
async def test_an_invalid_tokens_file_while_serving_keeps_the_previous_tokens(
    content: str,
    make_server: MakeServer,
    tmp_path: Path,
    errors_logged: pytest.LogCaptureFixture,
) -> None:
    """A tokens file edited into an invalid one is logged as an error; calls keep working."""
    server = await make_server()
    tokens = tmp_path / "server0" / "tokens.toml"
    assert (await server.caller("alice").ListAgents(pb.ListAgentsRequest())).agents

    tokens.write_text(content)
    reply = await server.caller("alice").ListAgents(pb.ListAgentsRequest())

    assert reply.agents
    assert any(str(tokens) in r.getMessage() for r in errors_logged.records)
    assert (await server.caller("bob").ListAgents(pb.ListAgentsRequest())).agents


async def test_a_database_damaged_inside_stops_the_server_naming_the_corruption(
    tmp_path: Path,
) -> None:
    """A runservice database whose header and schema read fine but whose run pages are
    overwritten: one line saying the file is corrupt and naming it, status 1, file unchanged."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "runservice.db"

    async def create() -> None:
        store = await open_store(sqlite_url(str(db)))
        runs = [
            Run(
                run_id=f"run-{i:05d}",
                owner="alice",
                agent="echo",
                state=RunState.RUNNING,
                created_at=datetime.now(UTC),
                input={"text": "x" * 500},
            )
            for i in range(2000)
        ]
        await store.commit(runs, [], [])
        await store.close()

    await create()
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(size // 2)
        f.write(GARBAGE * 8)
    before = digest(db)

    result = await serve_until_exit(data_dir)

    assert_refused(result, "the database file is corrupt", str(db))
    assert digest(db) == before
