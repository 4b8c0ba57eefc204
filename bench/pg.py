"""A private PostgreSQL server for the stores and replicas scenarios, started and stopped
by the bench.

`initdb` into a temporary directory (as the `postgres` user when running as root, since
initdb refuses root), trust authentication on 127.0.0.1 only, a free port, and the
durability settings an operator would run: fsync, synchronous_commit and
full_page_writes stay on (PostgreSQL's defaults), so every commit waits for its WAL
flush. Debian installs the binaries under /usr/lib/postgresql/VERSION/bin, off PATH, so
they are looked for there first.

The CPU the database uses is that of the postmaster and all its processes (backends,
WAL writer, checkpointer, autovacuum), the exited ones included: the postmaster reaps
them, so their time is in its children's times. pg_ctl leaves the postmaster a child of
init, so it is adopted into the bench's own processes (bench.noise.adopt): its CPU is
not reported as other processes' load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psutil

from bench import noise
from bench.servers import free_port
from tools.pg import SUPERUSER, PgUnavailableError, find_bindir, postgres_owner

DATABASE = "runservice_bench"
START_TIMEOUT_S = 60


def unavailable(optional: bool) -> str:
    """'' when PostgreSQL can be started here. Otherwise the reason, when the run may go
    on without it (`optional` and CI unset); else raises PgUnavailableError."""
    try:
        find_bindir()
    except PgUnavailableError as exc:
        if optional and not os.environ.get("CI"):
            return str(exc)
        raise
    return ""


class PgServer:
    """One private PostgreSQL server with one database; `url` is runservice's --db URL."""

    def __init__(self, keep_log: Path) -> None:
        self.bindir = find_bindir()
        self.keep_log = keep_log  # where the server's log is copied when it stops
        self.port = 0
        self.root = Path()
        self._as_user: list[str] = []
        self._started = False

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        """The server's log."""
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the bench's database, as the superuser."""
        return self.url_of(DATABASE)

    def url_of(self, database: str) -> str:
        """runservice's --db URL of `database`, as the superuser."""
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str) -> str:
        """The libpq-style DSN of `database` (asyncpg.connect), as the superuser."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Creates one more database, `name`; its --db URL. Notifications stay within a
        database, so deployments in separate databases do not hear each other."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        return self.url_of(name)

    def version(self) -> str:
        """The server's version, as `postgres --version` prints it."""
        done = subprocess.run(
            [str(self.bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip()

    def start(self) -> None:
        """initdb, configure, start the server and create the database; raises with the
        log's tail if it fails (and leaves nothing behind)."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        # Its own temp dir: the bench's work dir is root's and mode 700, which the
        # postgres user cannot enter.
        self.root = Path(tempfile.mkdtemp(prefix="runservice-bench-pg-"))
        owner = postgres_owner()
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", SUPERUSER, "--"]
        # --no-sync only skips initdb's own flush of the new cluster; the server syncs.
        self._run(
            "initdb",
            *("-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust"),
            *("--encoding=UTF8", "--locale=C", "--no-sync"),
        )
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                # Up to 7 servers at once (replicas scenario), each with a pool of up
                # to 20 connections and one LISTEN connection.
                "max_connections = 300\n"
            )
        for _attempt in range(3):  # a port taken between free_port() and the bind: again
            self.port = free_port()
            with (self.datadir / "postgresql.auto.conf").open("a") as conf:
                conf.write(f"port = {self.port}\n")
            try:
                self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.logfile))
            except RuntimeError:
                if "could not bind" not in self.log_tail():
                    raise
                continue
            self._started = True
            noise.adopt(self.postmaster_pid())
            self._run(
                "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, DATABASE
            )
            return
        raise RuntimeError(f"PostgreSQL found no free port:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stops the server (fast shutdown), keeps its log and removes its directory."""
        if self._started:
            with contextlib.suppress(RuntimeError):
                self._pg_ctl("stop", "-m", "fast", "-w")
            self._started = False
        if self.root != Path():
            with contextlib.suppress(OSError):
                shutil.copyfile(self.logfile, self.keep_log)
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = Path()

    def postmaster_pid(self) -> int:
        """The process id of the running server's postmaster."""
        return int((self.datadir / "postmaster.pid").read_text().split()[0])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the postmaster and every process it started so far
        (live ones, and the exited ones it reaped)."""
        master = psutil.Process(self.postmaster_pid())
        t = master.cpu_times()
        total = float(t.user + t.system + t.children_user + t.children_system)
        for child in master.children():
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += float(c.user + c.system)
        return total

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
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
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{self.log_tail()}"
            )
