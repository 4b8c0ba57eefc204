"""Where PostgreSQL's server binaries are, and whom they run as: one answer for every
private PostgreSQL the project starts (tests/pgserver.py, bench/pg.py, faults/pg.py through
the tests', and tools/cluster.py).

Debian installs the binaries under /usr/lib/postgresql/VERSION/bin, not on PATH; the
newest version there wins, else PATH. PostgreSQL refuses to run as root: started by root,
its tools run as the `postgres` user the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
from pathlib import Path

SUPERUSER = "postgres"
INSTALL_HINT = "apt-get install -y --no-install-recommends postgresql"


class PgUnavailableError(RuntimeError):
    """PostgreSQL's server binaries (or the user to run them as) are not here."""


def find_bindir(server: str = "pg_ctl") -> Path:
    """The directory of initdb and `server` (pg_ctl, or postgres to run it directly)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
        reverse=True,
    )
    if found:
        return Path(found[0]).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which(server):
        return Path(on_path).resolve().parent
    raise PgUnavailableError(
        "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb, no initdb on "
        f"PATH); install it with: {INSTALL_HINT}"
    )


def postgres_owner() -> pwd.struct_passwd | None:
    """The user PostgreSQL's tools must run as: `postgres` when we are root, else None
    (they run as we do). PgUnavailableError if we are root and there is no such user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PgUnavailableError(
            f"running as root and there is no {SUPERUSER!r} user to run PostgreSQL as; "
            f"installing PostgreSQL ({INSTALL_HINT}) creates it"
        ) from None
