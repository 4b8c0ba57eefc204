"""A private PostgreSQL server for tests: its own data directory, port and sockets.

`initdb` into a temporary directory (as the `postgres` user when running as root, since
initdb refuses root), trust authentication on 127.0.0.1 only, fsync off, started with
`pg_ctl -w` and stopped with it. Where the binaries are, and whom they run as, is
tools/pg.py's answer.

Without the binaries, `PgServer.start` raises PgUnavailableError; the pytest fixture
skips on it, or fails when CI is set (CI must run the PostgreSQL tests).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tools.pg import SUPERUSER, PgUnavailableError, find_bindir, postgres_owner

START_TIMEOUT_S = 60

__all__ = ["PgServer", "PgUnavailableError", "find_bindir", "free_port", "start_or_skip"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgServer:
    """One private PostgreSQL server; `url(db)` is a runservice --db URL for its database."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.port = 0
        self.root = Path()
        self._as_user: list[str] = []
        self._started = False
        self._databases = 0

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        """The server's log."""
        return self.root / "postgres.log"

    def start(self) -> None:
        """initdb, configure and start the server; raises with the log's tail if it fails."""
        # Not under pytest's tmp_path: its parent is mode 700 and root's, which the
        # postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="runservice-pg-"))
        owner = postgres_owner()
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", SUPERUSER, "--"]
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 200\n"
            )
        for _attempt in range(3):  # a port taken between free_port() and the bind: again
            self.port = free_port()
            with (self.datadir / "postgresql.auto.conf").open("a") as conf:
                conf.write(f"port = {self.port}\n")
            try:
                self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.logfile))
            except subprocess.CalledProcessError:
                if "could not bind" not in self.log_tail():
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log_tail()}") from None
                continue
            self._started = True
            return
        raise RuntimeError(f"PostgreSQL found no free port:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stops the server at once and removes its directory."""
        if self._started:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._pg_ctl("stop", "-m", "immediate", "-w")
            self._started = False
        if self.root != Path():
            shutil.rmtree(self.root, ignore_errors=True)

    def halt(self) -> None:
        """Stops the server (fast shutdown: sessions are ended), keeping its data."""
        self._pg_ctl("stop", "-m", "fast", "-w")

    def resume(self) -> None:
        """Starts a halted server again on the same port and data."""
        self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.logfile))

    def url(self, database: str, driver: str = "postgresql+asyncpg") -> str:
        """The SQLAlchemy URL of `database` on this server, as the superuser."""
        return f"{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Runs `sql` with psql over the server's unix socket; returns its output."""
        psql = self.bindir / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        out = subprocess.run(
            [
                str(psql),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.root),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def create_database(self, prefix: str = "test", template: str = "") -> str:
        """A new database, empty or a copy of `template` (which nobody may be connected
        to); returns its name."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        copy = f' TEMPLATE "{template}"' if template else ""
        self.psql(f'CREATE DATABASE "{name}"{copy}')
        return name

    def drop_database(self, name: str) -> None:
        """Drops `name`, ending any session still connected to it."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log (what it said when it would not start)."""
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.datadir), *args)

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            cwd=self.root,
            check=False,
        )
        if done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, done.args, done.stdout, done.stderr
            )


def start_or_skip() -> PgServer:
    """A started server; skips the test when PostgreSQL is not installed, fails under CI."""
    try:
        server = PgServer()
    except PgUnavailableError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {exc}", pytrace=False)
        pytest.skip(str(exc))
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
