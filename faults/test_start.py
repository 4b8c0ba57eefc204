"""Corrupt and foreign files at start: refused in one line, the file left as it was."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from faults.harness import Node, load_on, make_node
from faults.report import Row
from tests.serverproc import free_port, server_env, wait_healthy

LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ (DEBUG|INFO|WARNING) ")
NEWER_SCHEMA = 999


def error_lines(output: str) -> list[str]:
    """The lines of a server's output that are not DEBUG/INFO/WARNING log records."""
    return [line for line in output.splitlines() if line.strip() and not LOG_RECORD.match(line)]


async def start_and_wait_exit(
    node: Node, *, limit: float, out_dir: Path | None = None
) -> tuple[int | None, str, float]:
    """Starts a server on the node; (exit code, or None if it came up and was stopped; its
    output; seconds until it exited or served)."""
    port = node.port or free_port()
    cmd = [sys.executable, "-m", "runservice", "serve", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--data-dir", str(node.data_dir), *node.args]
    out = (out_dir or node.data_dir.parent) / f"start-{time.monotonic_ns()}.out"
    began = time.monotonic()
    with out.open("wb") as sink:
        proc = subprocess.Popen(  # noqa: ASYNC220 - polled without blocking below
            cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=server_env()
        )
    code: int | None
    try:
        await wait_healthy(f"127.0.0.1:{port}", limit=limit, proc=proc)
        seconds = time.monotonic() - began
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
        code = None
    except Exception:
        seconds = time.monotonic() - began
        if proc.poll() is None:
            proc.kill()
        code = await asyncio.to_thread(proc.wait, 10)
    return code, out.read_text(errors="replace"), seconds


def sha256(path: Path) -> str:
    """The file's digest."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def real_database(node: Node) -> None:
    """Gives the node a real database holding a few finished runs."""
    await node.start()
    async with load_on(node) as load:
        for _ in range(3):
            run = await load.start("ticker", "alice", count=2000, size=100)
            load.follow(run.run_id)
        await load.followed()
    assert await node.terminate() == 0


def garbage(db: Path) -> None:
    """Random bytes where the database should be."""
    db.write_bytes(hashlib.sha512(b"not a database").digest() * 300)


def truncated(db: Path) -> None:
    """The real database cut in half."""
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def foreign(db: Path) -> None:
    """A SQLite database of some other program."""
    db.unlink()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes (body) VALUES ('someone else''s data')")
    conn.commit()
    conn.close()


def newer_schema(db: Path) -> None:
    """A runservice database migrated by a newer release."""
    conn = sqlite3.connect(db)
    conn.execute(
        "INSERT INTO runservice_schema (version, description, applied_us) VALUES (?, ?, 0)",
        (NEWER_SCHEMA, "from the future"),
    )
    conn.commit()
    conn.close()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "garbage": garbage,
    "truncated": truncated,
    "foreign": foreign,
    "newer_schema": newer_schema,
}


@pytest.mark.parametrize("kind", list(DAMAGE))
async def test_bad_database_file_at_start(kind: str, tmp_path: Path, row: Row) -> None:
    """A server started on a database file that is garbage, truncated, another program's
    SQLite, or of a newer schema exits non-zero within 30 s with one line saying what is
    wrong (no traceback), and leaves the file byte for byte as it was."""
    node = make_node(tmp_path)
    await real_database(node)
    DAMAGE[kind](node.db)
    for side in ("-wal", "-shm"):
        node.db.with_name(node.db.name + side).unlink(missing_ok=True)
    before = sha256(node.db)
    keep = tmp_path / "before.db"
    shutil.copyfile(node.db, keep)
    code, output, seconds = await start_and_wait_exit(node, limit=30)
    lines = error_lines(output)
    untouched = sha256(node.db) == before
    row.set(
        exit_code="served" if code is None else code,
        seconds=round(seconds, 1),
        output_lines=len(lines),
        traceback="Traceback" in output,
        first_line=lines[0][:200] if lines else "",
        file_untouched=untouched,
    )
    assert code is not None and code != 0, "the server came up on a bad database"
    assert "Traceback" not in output, f"a traceback, ending: {lines[-1][:300]}"
    assert len(lines) == 1, lines[:5]
    assert untouched
