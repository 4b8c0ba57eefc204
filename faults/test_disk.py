"""A full disk: the data directory on a small tmpfs, filled while runs emit, and at start."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from faults.checker import SeenLog, records_from_db, verify
from faults.harness import SCALE, Node, load_on, make_node, wait_all_terminal
from faults.report import Row
from faults.test_lock import start_during
from faults.test_start import error_lines, start_and_wait_exit

TMPFS_SIZE = "16m"
FULL_S = 4.0
CHUNK = 64 * 1024


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[Path]:
    """A TMPFS_SIZE tmpfs mounted at `path` (root only), unmounted on exit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> int:
    """Writes a filler file until the file system is full; its size in bytes (0 when the
    server's own writes had filled it already: then not even the file can be created)."""
    written = 0
    try:
        with (directory / "filler").open("wb") as f:
            while True:
                f.write(b"\0" * CHUNK)
                f.flush()
                written += CHUNK
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    # Squeeze out the last partial chunk too.
    with contextlib.suppress(OSError), (directory / "filler2").open("wb") as f:
        while True:
            f.write(b"\0" * 512)
            f.flush()
    return written


def free(directory: Path) -> None:
    """Deletes the filler files."""
    for name in ("filler", "filler2"):
        (directory / name).unlink(missing_ok=True)


async def test_disk_fills_while_runs_emit(tmp_path: Path, row: Row) -> None:
    """The data directory sits on a 16 MiB tmpfs; it is filled while runs emit and StartRun is
    called, kept full for 4 s, then freed. No client ever gets INTERNAL (a full disk is a
    refusal the caller can act on), every run ends with one terminal event, no log has a hole,
    nothing a subscriber saw is lost; the server exits 0 afterwards."""
    with small_disk(tmp_path / "disk") as disk:
        node = make_node(disk)
        node.log_path = tmp_path / "server.log"
        node.args = ["--drain-timeout", "2s", "--stop-grace", "1s"]
        await node.start()
        seen = SeenLog()
        starts: Counter[str] = Counter()
        try:
            async with load_on(node, seen) as load:
                ids = []
                for i in range(3 * SCALE):
                    user = ("alice", "bob")[i % 2]
                    run = await load.start("ticker", user, count=4000, interval=0.005, size=300)
                    load.follow(run.run_id, user, give_up=120)
                    ids.append(run.run_id)
                await asyncio.sleep(0.5)
                filled = await asyncio.to_thread(fill, disk)
                calls = await start_during(load, FULL_S, starts)
                free(disk)
                await asyncio.gather(*calls)
                for run_id in ids:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await load.stop(run_id, load.owners[run_id])
                await wait_all_terminal(load, list(load.owners), limit=60)
                await asyncio.wait_for(load.followed(), 60)
                internal = load.server_internal_errors() + sum(
                    n for key, n in starts.items() if key.startswith("INTERNAL")
                )
                errors = dict(load.errors)
            exit_code = await node.terminate()
        finally:
            await node.kill()
        figures = verify(records_from_db(node.db), seen, owners=load.owners)
    row.set(
        **figures.as_dict(),
        filler_bytes=filled,
        start_outcomes_while_full=dict(starts),
        subscriber_errors=errors,
        internal_errors=internal,
        exit_code=exit_code,
    )
    figures.assert_clean()
    assert internal == 0, f"INTERNAL reached clients: {errors} {dict(starts)}"
    assert exit_code == 0


async def test_disk_full_at_start(tmp_path: Path, row: Row) -> None:
    """A server is SIGKILLed with runs in flight, the disk is filled, a server starts on it:
    it either serves or exits non-zero with one line and no traceback, never corrupting the
    file; once the disk is freed a server starts, reconciles, and the checker passes."""
    with small_disk(tmp_path / "disk") as disk:
        node: Node = make_node(disk)
        node.log_path = tmp_path / "server.log"
        node.args = ["--drain-timeout", "2s", "--stop-grace", "1s"]
        await node.start()
        seen = SeenLog()
        async with load_on(node, seen) as load:
            for i in range(3):
                user = ("alice", "bob")[i % 2]
                run = await load.start("ticker", user, count=100_000, interval=0.005)
                load.follow(run.run_id, user, give_up=120)
            await asyncio.sleep(1.0)
            await node.kill()
            await asyncio.to_thread(fill, disk)
            code, output, seconds = await start_and_wait_exit(node, limit=30, out_dir=tmp_path)
            free(disk)
            await node.start()
            await wait_all_terminal(load, list(load.owners), limit=30)
            await asyncio.wait_for(load.followed(), 60)
        exit_code = await node.terminate()
        figures = verify(records_from_db(node.db), seen, owners=load.owners)
    lines = error_lines(output)
    row.set(
        **figures.as_dict(),
        start_on_full_disk="served" if code is None else f"exit {code}",
        start_output_lines=len(lines),
        start_output=lines[:3],
        start_s=round(seconds, 1),
        exit_code=exit_code,
    )
    figures.assert_clean()
    if code is not None:
        assert code != 0
        assert "Traceback" not in output, f"a traceback, ending: {lines[-1][:300]}"
        assert len(lines) == 1, lines
    assert exit_code == 0
