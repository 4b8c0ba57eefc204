"""`runservice ls --watch` and `runservice top`, driven in a real terminal (tmux) against a
real server process, as a person sees them; their piped and --json forms; and the admin-only
GetServerStats RPC behind `top`, with exact figures, on the in-process server.

Each terminal is a tmux server of its own (`tmux -L <unique socket>`), killed at the end of
the test. Every wait polls the pane (`capture-pane`) against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from runservice.client import AsyncRunClient, PermissionDeniedError, RunClient
from runservice.tokens import add_token
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness
from tests.fakes import gate
from tests.helpers import error_info, read_all, start
from tests.serverproc import ServerProcess, running_server, start_server, wait_for
from tests.test_process_cli import CLI_LIMIT_S, cli_env, ok, run_cli, runservice_command

SCREEN_LIMIT_S = 30.0  # how long a screen may take to show what a test waits for
EXITED = "exited with status"  # what the shell around a command prints when it ends
TICKER = '{"count": 60, "interval": 0.1}'  # six seconds of ticks: several refreshes


# -- a terminal: tmux ----------------------------------------------------------------------


def tmux_binary() -> str:
    """tmux's path; the test fails without it under CI, and is skipped elsewhere."""
    found = shutil.which("tmux")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is not installed: .ci/run installs it (apt-get install tmux)")
        pytest.skip("tmux is not installed (apt-get install tmux)")
    return found


class Terminal:
    """A tmux server of the test's own, running one command in a pane of a fixed size."""

    def __init__(self, binary: str, config: Path, env: dict[str, str]) -> None:
        self._base = [binary, "-L", f"rs-test-{uuid.uuid4().hex[:12]}", "-f", str(config)]
        self._env = {k: v for k, v in env.items() if k != "TMUX"}
        self.last = ""

    async def tmux(self, *args: str) -> str:
        """Runs a tmux command against this terminal's server; returns its output."""
        proc = await asyncio.create_subprocess_exec(
            *self._base,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
        )
        out, err = await asyncio.wait_for(proc.communicate(), CLI_LIMIT_S)
        assert proc.returncode == 0, f"tmux {' '.join(args)}: {err.decode()}"
        return out.decode()

    async def run(self, args: list[str], env: dict[str, str], width: int, height: int) -> None:
        """Starts `runservice ARGS...` with `env` in a new pane of `width` x `height`; the
        shell around it prints its exit status when it ends. The shell catches SIGINT, so
        that Ctrl-C does not end it too; the command gets SIGINT's default disposition."""
        values = [f"{k}={v}" for k, v in env.items() if k.startswith("RUNSERVICE_")]
        command = shlex.join(["env", *values, *runservice_command(), *args])
        shell = f'trap : INT; {command}; echo "{EXITED} $?"'
        await self.tmux(
            "new-session", "-d", "-s", "cli", "-x", str(width), "-y", str(height), shell
        )

    async def screen(self, *, history: bool = False) -> str:
        """What the pane shows now; with `history`, what scrolled off its top too."""
        scrolled = ["-S", "-"] if history else []
        self.last = await self.tmux("capture-pane", "-p", *scrolled, "-t", "cli")
        return self.last

    async def wait(self, condition: Callable[[str], Any], what: str, history: bool = False) -> Any:
        """Polls the screen until `condition(screen)` is truthy; returns its value."""

        async def check() -> Any:
            return condition(await self.screen(history=history))

        try:
            return await wait_for(check, limit=SCREEN_LIMIT_S, interval=0.05)
        except TimeoutError:
            raise AssertionError(f"the screen never showed {what}:\n{self.last}") from None

    async def interrupt(self) -> int:
        """Ctrl-C; returns the command's exit status once it has exited."""
        await self.tmux("send-keys", "-t", "cli", "C-c")
        # Read from the screen (a full-screen program's exit may scroll it into the history):
        # tmux may leave a pane's first process unreaped, without a status, so a shell says it.
        exited = re.compile(rf"^{EXITED} (\d+)$", re.M)
        status = await self.wait(lambda s: (m := exited.search(s)) and m.group(1), "an exit", True)
        return int(status)

    async def close(self) -> None:
        """Kills the tmux server (and the command, if it still runs)."""
        proc = await asyncio.create_subprocess_exec(
            *self._base,
            "kill-server",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=self._env,
        )
        await proc.wait()


@pytest.fixture
async def terminal(tmp_path: Path) -> AsyncIterator[Terminal]:
    """A terminal whose panes stay after their command exits (its last words stay shown)."""
    config = tmp_path / "tmux.conf"
    config.write_text("set -g remain-on-exit on\nset -g status off\nset -g default-shell /bin/sh\n")
    term = Terminal(tmux_binary(), config, cli_env(tmp_path))
    try:
        yield term
    finally:
        await term.close()


# -- a server and its users ----------------------------------------------------------------


@dataclass
class Users:
    """A server process with a token for alice and one for root (admin)."""

    server: ServerProcess
    data_dir: Path
    home: Path
    tokens: dict[str, str]

    def env(self, user: str) -> dict[str, str]:
        """The environment of a CLI command run by `user`."""
        return cli_env(
            self.home, RUNSERVICE_ADDR=self.server.addr, RUNSERVICE_TOKEN=self.tokens[user]
        )

    def client(self, user: str) -> AsyncRunClient:
        """A client authenticated as `user`."""
        return AsyncRunClient(self.server.addr, token=self.tokens[user])


@pytest.fixture
async def users(tmp_path: Path) -> AsyncIterator[Users]:
    """A running server process with tokens for alice and root."""
    data_dir = tmp_path / "data"
    tokens = {
        "alice": add_token(data_dir / "tokens.toml", "alice", []),
        "root": add_token(data_dir / "tokens.toml", "root", ["admin"]),
    }
    async with running_server(data_dir) as server:
        yield Users(server, data_dir, tmp_path / "home", tokens)


def row_of(screen: str, run_id: str) -> list[str]:
    """The cells of the table row of `run_id` on `screen` ([] when it is not there)."""
    for line in screen.splitlines():
        if line.startswith(run_id):
            return line.split()
    return []


async def start_tickers(users: Users, count: int, ticker: str = TICKER) -> list[str]:
    """Starts `count` ticker runs as alice; returns their ids."""
    async with users.client("alice") as client:
        return [(await client.start_run("ticker", json.loads(ticker))).run_id for _ in range(count)]


# -- ls --watch in a terminal --------------------------------------------------------------


async def test_ls_watch_in_a_terminal_shows_a_run_appear_progress_and_finish(
    users: Users, terminal: Terminal
) -> None:
    """In an 80-column terminal, `ls --watch` shows a new run's whole id, its last_seq
    rising while it runs, then SUCCEEDED with its final last_seq; every line fits, and
    Ctrl-C exits with status 0."""
    await terminal.run(["ls", "--watch"], users.env("alice"), width=80, height=24)
    await terminal.wait(lambda s: "watching since" in s, "the status line")

    (run_id,) = await start_tickers(users, 1)
    await terminal.wait(lambda s: row_of(s, run_id), "the new run")
    running: set[int] = set()

    def advanced(screen: str) -> bool:
        row = row_of(screen, run_id)
        if row and row[1] == "RUNNING":
            running.add(int(row[-1]))
        return len(running) >= 2

    await terminal.wait(advanced, "last_seq rising while the run runs")
    final = await terminal.wait(
        lambda s: row_of(s, run_id)[1:2] == ["SUCCEEDED"] and s, "the run succeeded"
    )
    assert row_of(final, run_id) == [run_id, "SUCCEEDED", "ticker", "alice", "62"]
    assert max(running) < 62
    lines = final.splitlines()
    assert all(len(line) <= 80 for line in lines), final
    assert lines[0].split() == ["run_id", "state", "agent", "owner", "last_seq"]
    assert "1 runs (0 active)" in final
    assert await terminal.interrupt() == 0


async def test_ls_watch_reopens_the_watch_when_the_server_restarts(
    users: Users, terminal: Terminal
) -> None:
    """When the server dies, `ls --watch` says it lost the connection and is reopening;
    once the server is back it says it reopened, shows the run it had as INTERRUPTED (the
    fresh snapshot no longer has it), and shows new runs again."""
    await terminal.run(["ls", "--watch"], users.env("alice"), width=100, height=30)
    await terminal.wait(lambda s: "watching since" in s, "the status line")
    (lost,) = await start_tickers(users, 1, '{"count": 100000, "interval": 0.05}')
    await terminal.wait(lambda s: row_of(s, lost)[1:2] == ["RUNNING"], "the run running")

    await users.server.kill()
    await terminal.wait(lambda s: "lost the connection" in s and "reopening" in s, "the loss")
    restarted = await start_server(users.data_dir, port=users.server.port)
    try:
        await terminal.wait(lambda s: "reopened the watch" in s, "the watch reopened")
        await terminal.wait(lambda s: row_of(s, lost)[1:2] == ["INTERRUPTED"], "INTERRUPTED")
        async with users.client("alice") as client:
            fresh = (await client.start_run("echo", {"text": "back"})).run_id
        await terminal.wait(lambda s: row_of(s, fresh)[1:2] == ["SUCCEEDED"], "a new run")
        assert await terminal.interrupt() == 0
    finally:
        await restarted.terminate()


# -- top in a terminal ---------------------------------------------------------------------


def figure(screen: str, pattern: str) -> float | None:
    """The number `pattern` captures on `screen`, or None."""
    match = re.search(pattern, screen)
    return float(match.group(1).replace(",", "")) if match else None


ACTIVE = r"runs\s+active (\d+)"
EVENTS_PER_S = r"events\s+([\d,.]+)/s"


async def test_top_in_a_terminal_shows_runs_come_and_go(users: Users, terminal: Terminal) -> None:
    """`top` shows 0 active runs, then 2 with a non-zero events/s and both runs in its
    table, each with its own events/s, while two tickers run, then 0 again once they
    finished; Ctrl-C exits 0."""
    await terminal.run(["top", "--interval", "0.5"], users.env("root"), width=100, height=30)
    await terminal.wait(lambda s: figure(s, ACTIVE) == 0, "0 active runs")
    assert "version " + importlib.metadata.version("runservice") in terminal.last

    run_ids = await start_tickers(users, 2)
    busy = await terminal.wait(
        lambda s: figure(s, ACTIVE) == 2 and (figure(s, EVENTS_PER_S) or 0) > 0 and s,
        "2 active runs and their events/s",
    )
    print(f"--- top while two tickers run ---\n{busy}")

    def both_ticking(screen: str) -> bool:
        rows = [row_of(screen, run_id) for run_id in run_ids]
        return all(row[1:4] == ["RUNNING", "ticker", "alice"] for row in rows) and all(
            row[-1] != "-" and float(row[-1]) > 0 for row in rows
        )

    shown = await terminal.wait(lambda s: both_ticking(s) and s, "both runs ticking")
    assert all(len(line) <= 100 for line in shown.splitlines()), shown
    await terminal.wait(lambda s: figure(s, ACTIVE) == 0, "0 active runs after they finished")
    await terminal.wait(lambda s: not any(row_of(s, r) for r in run_ids), "an empty table")
    assert await terminal.interrupt() == 0


# -- the scriptable forms ------------------------------------------------------------------


async def test_top_and_a_watch_of_all_users_refuse_a_non_admin_in_one_line(users: Users) -> None:
    """`top` as a user without the admin role exits 1 with one line saying PERMISSION_DENIED
    and what to do, and with --json a JSON error with reason ADMIN_ONLY; `ls --watch
    --all-users` exits 1 with one line too."""
    watch = await run_cli("ls", "--watch", "--all-users", env=users.env("alice"))
    assert watch.code == 1 and watch.out == "", watch
    assert watch.err.strip().count("\n") == 0 and "PERMISSION_DENIED" in watch.err, watch
    refused = await run_cli("top", env=users.env("alice"))
    lines = [line for line in refused.err.splitlines() if line.strip()]
    assert refused.code == 1 and refused.out == "", refused
    assert len(lines) == 1 and "PERMISSION_DENIED" in lines[0], lines
    assert "admin" in lines[0] and "--token" in lines[0], lines
    as_json = await run_cli("top", "--json", env=users.env("alice"))
    assert as_json.code == 1
    error = json.loads(as_json.err)
    assert error["code"] == "PERMISSION_DENIED" and error["reason"] == "ADMIN_ONLY"


async def test_top_json_and_once_print_one_sample(users: Users) -> None:
    """`top --json` prints one JSON sample (the stats, the rates over --interval, the
    active runs) and exits 0; `top --once` piped prints the figures and a plain table."""
    (run_id,) = await start_tickers(users, 1, '{"count": 100000, "interval": 0.02}')
    sample = json.loads(
        ok(await run_cli("top", "--json", "--interval", "0.3", env=users.env("root"))).out
    )
    stats = sample["stats"]
    assert stats["active_runs"] == 1 and stats["pid"] == users.server.pid
    assert int(stats["events_committed"]) >= 1 and stats["draining"] is False
    assert sample["rates"]["interval_seconds"] == 0.3
    assert sample["rates"]["events_per_second"] > 0
    assert [run["run_id"] for run in sample["runs"]] == [run_id]
    assert sample["rates"]["runs_events_per_second"][run_id] > 0

    once = ok(await run_cli("top", "--once", "--interval", "0.2", env=users.env("root"))).out
    assert re.search(ACTIVE, once) and figure(once, ACTIVE) == 1, once
    header, row = once.splitlines()[-2:]
    assert header.split("\t") == ["run_id", "state", "agent", "owner", "age", "last_seq", "ev/s"]
    assert row.split("\t")[:4] == [run_id, "RUNNING", "ticker", "alice"]
    async with users.client("alice") as client:
        await client.stop_run(run_id)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def spawn_cli(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """Starts `runservice ARGS...` with its output piped, SIGINT at its default: a test run
    in the background of a shell ignores SIGINT, and its children would inherit that."""
    return await asyncio.create_subprocess_exec(
        *runservice_command(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        preexec_fn=_default_sigint,
    )


async def read_lines_until(
    proc: asyncio.subprocess.Process, done: Callable[[str], bool]
) -> list[str]:
    """The lines `proc` prints up to and including the first one that is `done`."""
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(SCREEN_LIMIT_S):
        while not lines or not done(lines[-1]):
            line = await proc.stdout.readline()
            assert line, f"the command ended early: {lines}"
            lines.append(line.decode().rstrip("\n"))
    return lines


async def watches_open(users: Users, count: int) -> None:
    """Returns once the server has `count` WatchRuns streams open (from its stats)."""
    async with users.client("root") as client:

        async def opened() -> bool:
            return (await client.server_stats()).watches == count

        await wait_for(opened, limit=SCREEN_LIMIT_S, interval=0.05)


async def interrupted(proc: asyncio.subprocess.Process) -> int:
    """SIGINT (what Ctrl-C sends); returns the exit status."""
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(SCREEN_LIMIT_S):
        return await proc.wait()


async def test_ls_watch_piped_prints_one_line_or_json_object_per_change(users: Users) -> None:
    """Piped, `ls --watch` prints a header and one tab-separated line per change, and with
    --json one JSON object per change (SNAPSHOT_END included); both exit 0 on SIGINT."""
    env = users.env("alice")
    plain = await spawn_cli("ls", "--watch", env=env)
    as_json = await spawn_cli("ls", "--watch", "--json", env=env)
    try:
        header = await read_lines_until(plain, lambda line: True)
        assert header == ["change\trun_id\tstate\tagent\towner\tlast_seq"]
        await read_lines_until(as_json, lambda line: "SNAPSHOT_END" in line)
        await watches_open(users, 2)  # the piped one prints no SNAPSHOT_END to wait for
        async with users.client("alice") as client:
            run_id = (await client.start_run("echo", {"text": "one two"})).run_id
        ended = await read_lines_until(plain, lambda line: "SUCCEEDED" in line)
        assert [line.split("\t")[:3] for line in ended] == [
            ["CREATED", run_id, "PENDING"],
            ["STATE_CHANGED", run_id, "RUNNING"],
            ["STATE_CHANGED", run_id, "SUCCEEDED"],
        ]
        assert ended[-1].split("\t")[3:] == ["echo", "alice", "4"]
        changes = [
            json.loads(line)
            for line in await read_lines_until(as_json, lambda line: "SUCCEEDED" in line)
        ]
        assert [c["change"] for c in changes] == [
            "RUN_CHANGE_CREATED",
            "RUN_CHANGE_STATE_CHANGED",
            "RUN_CHANGE_STATE_CHANGED",
        ]
        assert changes[-1]["run"]["run_id"] == run_id and changes[-1]["run"]["last_seq"] == "4"
        assert await interrupted(plain) == 0 and await interrupted(as_json) == 0
    finally:
        for proc in (plain, as_json):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# -- GetServerStats ------------------------------------------------------------------------


async def test_get_server_stats_counts_exactly_what_a_workload_committed(server: Harness) -> None:
    """After runs of two users on a fresh server, an admin reads events_committed equal to
    the sum of the runs' last_seq, nothing active, and this process's identity."""
    alice, bob, root = server.caller("alice"), server.caller("bob"), server.caller("root")
    before = datetime.now(UTC)
    runs = [
        await start(alice, "echo", text="one two three"),
        await start(bob, "echo", text="four"),
        await start(alice, "gated", gate="open", before=3, after=2),
    ]
    gate("open").set()
    for caller, run in zip((alice, bob, alice), runs, strict=True):
        await read_all(caller, run.run_id)
    last_seqs = [
        (await root.GetRun(pb.GetRunRequest(run_id=run.run_id))).run.last_seq for run in runs
    ]
    assert last_seqs == [5, 3, 7]

    async def settled() -> Any:
        stats = await root.GetServerStats(pb.GetServerStatsRequest())
        return stats if stats.subscriptions == 0 and stats.pending_events == 0 else None

    stats = await wait_for(settled)
    assert stats.events_committed == sum(last_seqs)
    assert 1 <= stats.commits <= stats.events_committed
    assert (stats.active_runs, stats.queued_runs, stats.watches) == (0, 0, 0)
    assert stats.runs_in_memory == 3  # finished, within their memory grace period
    assert stats.subscriber_lag_events == stats.max_subscriber_lag_events == 0
    assert not stats.draining and stats.store_problem == ""
    assert stats.version == importlib.metadata.version("runservice")
    assert (stats.pid, stats.hostname, stats.replica) == (os.getpid(), socket.gethostname(), "")
    started = stats.start_time.ToDatetime(UTC)
    assert started <= before
    since = (datetime.now(UTC) - started).total_seconds()
    assert 0 < stats.uptime.ToTimedelta().total_seconds() <= since + 1


async def test_get_server_stats_counts_active_runs_and_open_streams(server: Harness) -> None:
    """While a run waits at its gate with a subscriber and a watcher, the stats count one
    active run, one subscription and one watch; once it ends, no active run."""
    alice, bob, root = server.caller("alice"), server.caller("bob"), server.caller("root")
    run = await start(alice, "gated", gate="held", before=2)
    subscription = alice.Subscribe(pb.SubscribeRequest(run_id=run.run_id))
    watch = bob.WatchRuns(pb.WatchRunsRequest())
    try:
        async for response in subscription:
            if response.events[-1].seq >= 3:
                break
        async for update in watch:
            if update.change == pb.RUN_CHANGE_SNAPSHOT_END:
                break

        async def streams_open() -> Any:
            stats = await root.GetServerStats(pb.GetServerStatsRequest())
            return stats if stats.subscriptions == 1 and stats.watches == 1 else None

        stats = await wait_for(streams_open)
        assert (stats.active_runs, stats.queued_runs) == (1, 0)
        assert stats.runs_in_memory == 1 and stats.events_committed == 3
    finally:
        subscription.cancel()
        watch.cancel()
    gate("held").set()
    await read_all(alice, run.run_id)

    async def ended() -> bool:
        stats = await root.GetServerStats(pb.GetServerStatsRequest())
        return stats.active_runs == 0 and stats.subscriptions == 0 and stats.watches == 0

    await wait_for(ended)


async def test_get_server_stats_is_refused_to_non_admins(server: Harness) -> None:
    """A user without the admin role gets PERMISSION_DENIED (ADMIN_ONLY) with a message
    naming the admin role; a call without credentials, UNAUTHENTICATED."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.caller("alice").GetServerStats(pb.GetServerStatsRequest())
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(refused.value)
    assert info is not None and info.reason == "ADMIN_ONLY" and info.domain == "runservice"
    assert "admin role" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await server.caller(None).GetServerStats(pb.GetServerStatsRequest())
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_python_clients_read_server_stats(server: Harness) -> None:
    """AsyncRunClient.server_stats() and RunClient.server_stats() return the stats to an
    admin and raise PermissionDeniedError for anyone else."""
    run = await start(server.caller("alice"), "echo", text="x")
    await read_all(server.caller("alice"), run.run_id)
    async with AsyncRunClient(server.address, token=server.tokens["root"]) as client:
        stats = await client.server_stats()
        assert stats.events_committed == 3 and stats.pid == os.getpid()
    async with AsyncRunClient(server.address, token=server.tokens["alice"]) as client:
        with pytest.raises(PermissionDeniedError):
            await client.server_stats()

    def blocking() -> int:  # in a thread: this loop serves the in-process server
        with RunClient(server.address, token=server.tokens["root"]) as client:
            return client.server_stats().events_committed

    assert await asyncio.to_thread(blocking) == 3
