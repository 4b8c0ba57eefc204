"""One server per SQLite file: an exclusive lock held for the life of the process."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sqlalchemy.engine import make_url


class DatabaseInUseError(RuntimeError):
    """Another server process already uses this database file."""


class FileLock:
    """An exclusive, non-blocking flock on a file beside the database; released on close."""

    def __init__(self, path: Path, refusal: str = "") -> None:
        self.path = path
        self._refusal = refusal or (
            "another runservice server (pid {pid}) is using this database; stop it, or give "
            "this one its own --data-dir or --db (lock: {path}). Several servers on one "
            "database need PostgreSQL (see docs/scaling.md)"
        )
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock; DatabaseInUseError (naming the holder's pid) if it is taken."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseInUseError(self._refusal.format(pid=holder, path=self.path)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drops the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_for(url: str) -> FileLock | None:
    """The lock guarding a SQLite file URL; None for in-memory SQLite and server databases."""
    parsed = make_url(url)
    if (
        parsed.get_backend_name() != "sqlite"
        or not parsed.database
        or parsed.database == ":memory:"
    ):
        return None
    return FileLock(Path(parsed.database + ".lock"))
