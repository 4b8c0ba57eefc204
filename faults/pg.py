"""The fault matrix's private PostgreSQL: tests/pgserver.py's server, plus the faults done
to it (a restart, an immediate stop, its sessions ended) and a database per row.

Every call runs the server's own tools (pg_ctl, psql) as the user that owns its data and
blocks until they are done; rows call them in a thread so that their load keeps going.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.pgserver import START_TIMEOUT_S, PgServer, PgUnavailableError

ROW_DB_PREFIX = "faults"


class FaultPg(PgServer):
    """A private PostgreSQL server that can be restarted, stopped and have sessions ended.

    Unlike the tests' server it commits synchronously: an immediate stop is a crash of the
    database, and tests/pgserver.py's synchronous_commit = off would lose the commits of
    its last fraction of a second, which a production database does not.
    """

    def start(self) -> None:
        """Starts the server as tests/pgserver.py does, then turns synchronous_commit on
        (fsync stays off: the machine itself does not crash here)."""
        super().start()
        self.psql("ALTER SYSTEM SET synchronous_commit = on")
        self.psql("SELECT pg_reload_conf()")
        for _ in range(50):  # the postmaster rereads its configuration on its own time
            if self.psql("SHOW synchronous_commit").strip() == "on":
                return
            time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not turn synchronous_commit on")

    def restart(self) -> None:
        """pg_ctl restart -m fast: sessions ended, transactions in flight rolled back."""
        self._pg_ctl(
            "restart", "-m", "fast", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.logfile)
        )

    def stop_now(self) -> None:
        """pg_ctl stop -m immediate: the server's processes end at once, as in a crash;
        the next start recovers from its write-ahead log."""
        self._pg_ctl("stop", "-m", "immediate", "-w")

    def running(self) -> bool:
        """Whether the server answers (pg_ctl status)."""
        try:
            self._pg_ctl("status")
        except subprocess.CalledProcessError:  # pg_ctl status exits 3 when stopped
            return False
        return True

    def ensure_running(self) -> None:
        """Starts the server if a row left it stopped."""
        if not self.running():
            self.resume()

    def end_sessions(self, database: str) -> int:
        """pg_terminate_backend of every session on `database`; how many were ended."""
        out = self.psql(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            f" WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        )
        return int(out.strip() or 0)


def start_pg() -> FaultPg:
    """A started server; skips the row when PostgreSQL is not installed, fails under CI."""
    try:
        server = FaultPg()
    except PgUnavailableError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL rows: {exc}", pytrace=False)
        pytest.skip(str(exc))
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server
