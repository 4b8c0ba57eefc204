"""Fixtures: a real grpc.aio server on a loopback port over a real SQLite file, and a
private PostgreSQL server for the tests that ask for one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from runservice.app import App, build
from runservice.config import Settings
from runservice.tokens import add_token
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.fakes import GATES, TIMELINE, FakeClock
from tests.pgserver import PgServer, start_or_skip
from tests.serverproc import wait_for

__all__ = ["Harness", "start_harness", "wait_for"]

USERS = {"alice": [], "bob": [], "root": ["admin"]}


class Caller:
    """A RunService stub that sends one user's bearer token on every call."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None) -> None:
        self._stub = pb_grpc.RunServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __getattr__(self, name: str) -> Any:
        return partial(getattr(self._stub, name), metadata=self.metadata)


@dataclass
class Harness:
    """A running server and callers for each test user."""

    app: App
    address: str
    clock: FakeClock
    channel: grpc.aio.Channel
    tokens: dict[str, str] = field(default_factory=dict)

    def caller(self, user: str | None) -> Caller:
        """A stub authenticated as `user` (None: no credentials)."""
        return Caller(self.channel, self.tokens[user] if user else None)

    def raw(self, token: str | None) -> Caller:
        """A stub that sends `token` as is."""
        return Caller(self.channel, token)


async def start_harness(data_dir: Path, clock: FakeClock, **overrides: Any) -> Harness:
    """Starts a server on 127.0.0.1:0 with tokens for alice, bob and root (admin)."""
    tokens = {u: add_token(data_dir / "tokens.toml", u, roles) for u, roles in USERS.items()}
    settings = Settings(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        agents=(
            "gated=tests.fakes:gated",
            "refusing=tests.fakes:refusing",
            "recorder=tests.fakes:recorder",
            "stubborn=tests.fakes:stubborn",
            "poisoned=tests.fakes:poisoned",
            "traced=tests.fakes:traced",
            "collector=tests.fakes:collector",
            "worker=tests.fakes:worker",
            "fragile=tests.fakes:fragile",
            "talker=tests.fakes:talker",
            "noting=tests.fakes:noting",
        ),
        **overrides,
    )
    app = await build(settings, clock=clock)
    address = f"127.0.0.1:{app.port}"
    channel = grpc.aio.insecure_channel(address)
    return Harness(app, address, clock, channel, tokens)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """A PostgreSQL server of the session's own, started on first use (skipped when
    PostgreSQL is not installed, failed when CI is set)."""
    server = start_or_skip()
    yield server
    server.stop()


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test moves."""
    return FakeClock()


def pytest_addoption(parser: pytest.Parser) -> None:
    """--store: the database of the in-process servers (`make_server`), so the acceptance
    suite runs on PostgreSQL too (one replica)."""
    parser.addoption(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="database of the in-process test servers (default: a SQLite file)",
    )


@pytest.fixture
async def make_server(
    tmp_path: Path, clock: FakeClock, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Starts servers with settings overrides; stops them (runs drained briefly) afterwards.

    A server given the `name` of one started before is that server restarted: the same
    data directory (and database). With `--store postgresql`, each named server gets a
    database of its own on the session's private PostgreSQL server, unless the test chose
    its own `db`.
    """
    GATES.clear()
    TIMELINE.clear()
    started: list[Harness] = []
    db_of: dict[str, str] = {}  # each named server's database
    pg: PgServer | None = None
    if request.config.getoption("--store") == "postgresql":
        pg = request.getfixturevalue("postgres")

    async def make(name: str | None = None, **overrides: Any) -> Harness:
        settings = {"stop_grace": 2.0, "drain_timeout": 0.5, **overrides}
        name = name or f"server{len(started)}"
        if pg is not None and "db" not in overrides:
            if name not in db_of:
                db_of[name] = pg.create_database()
            settings["db"] = pg.url(db_of[name])
        data_dir = tmp_path / name
        data_dir.mkdir(exist_ok=True)
        harness = await start_harness(data_dir, clock, **settings)
        started.append(harness)
        return harness

    try:
        yield make
    finally:
        for event in GATES.values():
            event.set()
        for harness in started:
            await harness.channel.close()
            await harness.app.stop()
        for database in db_of.values():
            assert pg is not None
            pg.drop_database(database)


@pytest.fixture
async def server(make_server: Callable[..., Awaitable[Harness]]) -> Harness:
    """A live server with the default settings."""
    return await make_server()
