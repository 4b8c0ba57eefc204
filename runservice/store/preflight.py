"""Checks a database, reading only, before migrations write to it.

A database is refused when it is corrupt, when it has tables but is not runservice's,
or when a newer release wrote its schema. For a SQLite file the check runs on a read-only
connection of its own: the store's connections would already write to a file it refuses
(journal_mode=WAL rewrites the header of a file in rollback-journal mode), and a refused
file is left exactly as it was.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, create_engine, func, inspect, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from runservice.store import tables

SQLITE_HEADER = b"SQLite format 3\x00"
_CORRUPTION = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class DatabaseRefusedError(RuntimeError):
    """The database is not one this release may use: corrupt, another program's, or written
    by a newer release. The message is one line naming the database and the problem."""


def check_schema(conn: Connection, where: str, latest: int) -> None:
    """Refuses (DatabaseRefusedError naming `where`) a database that has tables but no
    runservice schema table, or whose schema version is above `latest`."""
    names = set(inspect(conn).get_table_names())
    schema = tables.schema_version
    if not names:
        return  # a new database
    if schema.name not in names:
        raise DatabaseRefusedError(
            f"{where} is not a runservice database: it has tables ({', '.join(sorted(names))}) "
            f"and no {schema.name} table; point --db at a new "
            + ("file" if conn.dialect.name == "sqlite" else "database")
        )
    newest = conn.execute(select(func.max(schema.c.version))).scalar()
    if newest is not None and newest > latest:
        raise DatabaseRefusedError(
            f"{where}: schema version {newest} is newer than this release supports "
            f"({latest}); upgrade runservice"
        )


def check_sqlite_file(url: str | URL, latest: int) -> None:
    """Refuses (DatabaseRefusedError) the SQLite file of `url` unless it is absent, empty,
    or passes check_schema; reads only. Nothing for other databases."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    header = _header(path)
    if not header:
        return  # no file yet, or an empty one: SQLite makes a new database of it
    if header != SQLITE_HEADER:
        raise DatabaseRefusedError(_corrupt(path))
    engine = create_engine("sqlite://", creator=lambda: _read_only(path), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            check_schema(conn, str(path), latest)
    except DBAPIError as exc:
        code = getattr(exc.orig, "sqlite_errorcode", 0) & 0xFF  # extended code → primary
        if code in _CORRUPTION:
            raise DatabaseRefusedError(_corrupt(path)) from exc
        raise DatabaseRefusedError(f"cannot read {path}: {exc.orig}") from exc
    finally:
        engine.dispose()


def _header(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return b""
    except IsADirectoryError as exc:
        raise DatabaseRefusedError(f"{path} is a directory, not a database file") from exc
    except OSError as exc:
        raise DatabaseRefusedError(f"cannot read {path}: {exc.strerror}") from exc


def _read_only(path: Path) -> sqlite3.Connection:
    # Without a -wal file beside it the file is the whole database, and immutable=1 reads it
    # with no locks and creates no -shm or -wal file. A -wal left by a crash must be read.
    mode = "mode=ro" if Path(f"{path}-wal").exists() else "mode=ro&immutable=1"
    return sqlite3.connect(f"file:{quote(str(path))}?{mode}", uri=True)


def _corrupt(path: Path) -> str:
    return f"{path} is not a runservice database: the file is corrupt or not SQLite"
