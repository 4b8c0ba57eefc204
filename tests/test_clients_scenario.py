"""One scenario, three languages: Python, Go and TypeScript clients resume across crashes.

Each client's example program runs against the same real server. When it prints the
phase line its scenario names, the harness kills the server with SIGKILL and restarts
it on the same port and data directory; the program must read on through the resume
and print a summary. The summaries are compared across languages.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from runservice.tokens import add_token
from tests.serverproc import ServerProcess, free_port, start_server

ROOT = Path(__file__).parent.parent
GO_DIR = ROOT / "clients" / "go"
TS_DIR = ROOT / "clients" / "typescript"
TS_EXAMPLE = TS_DIR / "dist" / "examples" / "scenario.js"
CRASH_PHASE = {"replay": "resumed", "live": "live"}


def _require(condition: bool, what: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing; `make test` builds it")
        pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The command line of each language's scenario program (the Go one built once)."""
    found = {"python": [sys.executable, str(ROOT / "clients" / "python" / "scenario.py")]}
    go = shutil.which("go")
    _require(go is not None and (GO_DIR / "cmd" / "scenario").is_dir(), "the Go scenario")
    binary = tmp_path_factory.mktemp("go") / "scenario"
    subprocess.run([str(go), "build", "-o", str(binary), "./cmd/scenario"], cwd=GO_DIR, check=True)
    found["go"] = [str(binary)]
    _require(TS_EXAMPLE.exists(), f"{TS_EXAMPLE.relative_to(ROOT)}")
    found["typescript"] = ["node", str(TS_EXAMPLE)]
    return found


class Crashable:
    """A server that the harness can SIGKILL and restart on the same port and data."""

    def __init__(self, data_dir: Path, token: str) -> None:
        self.data_dir = data_dir
        self.token = token
        self.port = free_port()
        self.server: ServerProcess | None = None
        self.crashes = 0

    async def start(self) -> None:
        """Starts (or restarts) the server."""
        self.server = await start_server(self.data_dir, port=self.port)

    async def crash_and_restart(self) -> None:
        """SIGKILL, then a new process on the same port and data directory."""
        assert self.server is not None
        await self.server.kill()
        self.crashes += 1
        await self.start()

    async def stop(self) -> None:
        """Stops the current process."""
        if self.server is not None:
            await self.server.terminate()
            await self.server.kill()


@pytest.fixture
async def crashable(tmp_path: Path) -> AsyncIterator[Crashable]:
    """A running server the test may crash, with a token for alice."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    server = Crashable(data_dir, add_token(data_dir / "tokens.toml", "alice", []))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _dev_token_env(home: Path, token: str) -> dict[str, str]:
    """An environment whose only token is a dev-token file in RUNSERVICE_HOME, as `make run`'s."""
    home.mkdir(exist_ok=True)
    (home / "dev-token").write_text(token + "\n")
    env = {k: v for k, v in os.environ.items() if k != "RUNSERVICE_TOKEN"}
    return {**env, "RUNSERVICE_HOME": str(home)}


async def _run_program(
    command: list[str], server: Crashable, scenario: str, *, dev_token_home: Path | None = None
) -> dict[str, Any]:
    """Runs one example; crashes the server at its crash phase; returns its summary.

    The token goes on the command line, or, with `dev_token_home`, only in a dev-token file.
    """
    if dev_token_home is None:
        token_args, env = ["--token", server.token], dict(os.environ)
    else:
        token_args, env = [], _dev_token_env(dev_token_home, server.token)
    proc = await asyncio.create_subprocess_exec(
        *command,
        "--addr",
        f"127.0.0.1:{server.port}",
        *token_args,
        "--scenario",
        scenario,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    summary: dict[str, Any] | None = None
    crashes_before = server.crashes
    async with asyncio.timeout(120):
        while line := await proc.stdout.readline():
            message = json.loads(line)
            if message.get("phase") == CRASH_PHASE[scenario]:
                await server.crash_and_restart()
            if "summary" in message:
                summary = message["summary"]
        assert await proc.wait() == 0, f"{command[0]} exited {proc.returncode}"
    assert server.crashes == crashes_before + 1, "the program never reached its crash phase"
    assert summary is not None
    return summary


@pytest.mark.parametrize("lang", ["python", "go", "typescript"])
def test_help_names_the_token_source_and_never_shows_the_token(
    programs: dict[str, list[str]], lang: str, tmp_path: Path
) -> None:
    """--help names where the token comes from and prints neither RUNSERVICE_TOKEN nor dev token."""
    env = {**_dev_token_env(tmp_path, "dev-secret-1"), "RUNSERVICE_TOKEN": "env-secret-2"}
    done = subprocess.run(
        [*programs[lang], "--help"],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    assert "(from RUNSERVICE_TOKEN or the dev token)" in shown
    assert "secret" not in shown


async def test_replay_across_a_restart_is_identical_in_three_languages(
    programs: dict[str, list[str]], crashable: Crashable, tmp_path: Path
) -> None:
    """Replay 1..50, drop, resume from 51 through a SIGKILL restart: the same summary in all.

    No --token here: each program finds the dev token on its own, as the CLI does.
    """
    home = tmp_path / "home"
    summaries = {
        lang: await _run_program(cmd, crashable, "replay", dev_token_home=home)
        for lang, cmd in programs.items()
    }
    expected = {
        "scenario": "replay",
        "first_seq": 1,
        "last_seq": 202,
        "count": 202,
        "gap_free": True,
        "duplicates": 0,
        "ticks": 200,
        "final_state": "SUCCEEDED",
        "get_run_last_seq": 202,
        "get_run_state": "SUCCEEDED",
    }
    for lang, summary in summaries.items():
        assert summary == expected, lang


async def test_live_reads_across_a_crash_agree_in_three_languages(
    programs: dict[str, list[str]], crashable: Crashable
) -> None:
    """Live reads through a SIGKILL: gap-free, no duplicates, INTERRUPTED, last seq = GetRun's."""
    summaries = {lang: await _run_program(cmd, crashable, "live") for lang, cmd in programs.items()}
    keys = {tuple(sorted(s)) for s in summaries.values()}
    assert len(keys) == 1, summaries  # the same fields in every language
    for lang, summary in summaries.items():
        assert summary["gap_free"] and summary["duplicates"] == 0, lang
        assert summary["first_seq"] == 1, lang
        assert summary["count"] == summary["last_seq"], lang
        assert summary["last_seq"] == summary["get_run_last_seq"], lang
        assert summary["final_state"] == summary["get_run_state"] == "INTERRUPTED", lang
        assert summary["ticks"] >= 99, lang
