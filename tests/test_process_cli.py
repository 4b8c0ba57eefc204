"""The `runservice` command against a real server process, as a user types it.

Each command runs as its own subprocess with RUNSERVICE_ADDR / RUNSERVICE_TOKEN set (and
RUNSERVICE_HOME pointing at an empty directory, so no development token is picked up),
its stdout piped: what a script or `| grep` sees.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runservice.tokens import add_token, has_token
from tests.serverproc import ServerProcess, running_server, server_env

CLI_LIMIT_S = 30.0


def runservice_command() -> list[str]:
    """The installed `runservice` console script (else `python -m runservice`)."""
    script = Path(sys.executable).with_name("runservice")
    if script.exists():
        return [str(script)]
    found = shutil.which("runservice")
    return [found] if found else [sys.executable, "-m", "runservice"]


@dataclass(frozen=True)
class Result:
    """What a command did."""

    code: int
    out: str
    err: str


async def run_cli(*args: str, env: dict[str, str]) -> Result:
    """Runs `runservice ARGS...` with exactly `env`; bounded by CLI_LIMIT_S."""
    proc = await asyncio.create_subprocess_exec(
        *runservice_command(),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_LIMIT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def cli_env(home: Path, **values: str) -> dict[str, str]:
    """The environment of a client command: piped output at the default width, no dev token."""
    env = server_env({"RUNSERVICE_HOME": str(home), **values})
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


@dataclass
class Setup:
    """A server, alice's token and the environment that uses them."""

    server: ServerProcess
    token: str
    env: dict[str, str]
    home: Path


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    """A running server with a token for alice."""
    data_dir = tmp_path / "data"
    token = add_token(data_dir / "tokens.toml", "alice", [])
    home = tmp_path / "home"
    async with running_server(data_dir) as server:
        env = cli_env(home, RUNSERVICE_ADDR=server.addr, RUNSERVICE_TOKEN=token)
        yield Setup(server, token, env, home)


def ok(result: Result) -> Result:
    """`result`, after checking the command succeeded."""
    assert result.code == 0, f"exit {result.code}\nstdout:\n{result.out}\nstderr:\n{result.err}"
    return result


def event_lines(out: str) -> list[tuple[int, str, str]]:
    """(seq, type, rest) of each event line a follow/tail printed."""
    lines = []
    for line in out.splitlines():
        seq, kind, *rest = line.split(maxsplit=2)
        lines.append((int(seq), kind, rest[0] if rest else ""))
    return lines


async def test_tokens_add_prints_a_working_token_as_its_last_line(setup: Setup) -> None:
    """`tokens add` appends a hashed token and prints it last on stdout; the server accepts it."""
    tokens_file = setup.server.data_dir / "tokens.toml"
    result = ok(
        await run_cli(
            "tokens",
            "add",
            "--file",
            str(tokens_file),
            "--user",
            "root",
            "--role",
            "admin",
            env=setup.env,
        )
    )
    token = result.out.splitlines()[-1]
    assert token.startswith("rs_") and len(token) > 20
    assert has_token(tokens_file, token)
    assert token not in tokens_file.read_text(), "the file stores digests, not tokens"
    as_root = {**setup.env, "RUNSERVICE_TOKEN": token}
    ok(await run_cli("ls", "--all-users", "--json", env=as_root))


async def test_start_follow_prints_every_event_and_exits_zero(setup: Setup) -> None:
    """`start echo --follow` prints RUNNING, each token and SUCCEEDED, then exits 0."""
    result = ok(
        await run_cli("start", "echo", "--input", '{"text":"a b c"}', "--follow", env=setup.env)
    )
    assert event_lines(result.out) == [
        (1, "run.state", "RUNNING"),
        (2, "token", "a"),
        (3, "token", "b"),
        (4, "token", "c"),
        (5, "run.state", 'SUCCEEDED {"text": "a b c"}'),
    ]
    assert "started" in result.err


async def test_get_ls_tail_stop_rm_and_agents_work_and_exit_zero(setup: Setup) -> None:
    """The everyday commands succeed against a live server and print what they did."""
    env = setup.env
    run_id = ok(await run_cli("start", "ticker", "--input", '{"count":5}', env=env)).out.strip()
    assert len(run_id) == 36

    tail = event_lines(ok(await run_cli("tail", run_id, "--from-seq", "2", env=env)).out)
    assert [seq for seq, _, _ in tail] == [2, 3, 4, 5, 6, 7]
    assert [kind for _, kind, _ in tail] == ["tick"] * 5 + ["run.state"]
    assert tail[-1][2].startswith("SUCCEEDED")

    got = ok(await run_cli("get", run_id, env=env)).out
    assert run_id in got and "SUCCEEDED" in got and "ticker" in got

    listed = json.loads(ok(await run_cli("ls", "--json", env=env)).out)
    assert [r["run_id"] for r in listed] == [run_id]
    assert listed[0]["state"] == "RUN_STATE_SUCCEEDED" and listed[0]["last_seq"] == "7"
    assert "SUCCEEDED" in ok(await run_cli("ls", env=env)).out

    slow = ok(
        await run_cli("start", "ticker", "--input", '{"count":1000,"interval":0.05}', env=env)
    ).out.strip()
    stopped = ok(await run_cli("stop", slow, "--reason", "enough", env=env)).out
    assert "STOPPED" in stopped and "enough" in stopped

    removed = ok(await run_cli("rm", slow, env=env))
    assert f"deleted {slow}" in removed.err
    gone = await run_cli("get", slow, env=env)
    assert gone.code != 0 and "NOT_FOUND" in gone.err

    agents = ok(await run_cli("agents", env=env)).out
    assert "echo" in agents and "ticker" in agents


async def test_get_with_a_malformed_run_id_exits_nonzero_with_invalid_argument(
    setup: Setup,
) -> None:
    """`get <garbage>` fails with a message naming INVALID_ARGUMENT and the field."""
    result = await run_cli("get", "not-a-run-id", env=setup.env)
    assert result.code != 0
    assert "INVALID_ARGUMENT" in result.err and "run_id" in result.err
    assert "Traceback" not in result.err


async def test_a_command_without_a_token_is_refused_with_unauthenticated(setup: Setup) -> None:
    """With no RUNSERVICE_TOKEN (and no dev token) the server answers UNAUTHENTICATED."""
    env = {k: v for k, v in setup.env.items() if k != "RUNSERVICE_TOKEN"}
    result = await run_cli("ls", env=env)
    assert result.code != 0
    assert "UNAUTHENTICATED" in result.err
    assert "Traceback" not in result.err


async def test_serve_takes_its_listen_address_and_data_dir_from_the_environment(
    tmp_path: Path,
) -> None:
    """`runservice serve` with only RUNSERVICE_LISTEN and RUNSERVICE_DATA_DIR listens there."""
    data_dir = tmp_path / "env-data"
    token = add_token(data_dir / "tokens.toml", "alice", [])
    async with running_server(data_dir, via_env=True) as server:
        assert "--listen" not in server.proc.args and "--data-dir" not in server.proc.args
        assert f"listening on {server.addr}" in server.log_text()
        assert (data_dir / "runservice.db").exists()
        env = cli_env(tmp_path / "home", RUNSERVICE_ADDR=server.addr, RUNSERVICE_TOKEN=token)
        ok(await run_cli("agents", env=env))
        assert await server.terminate() == 0


async def test_ls_prints_whole_run_ids_when_its_output_is_piped(setup: Setup) -> None:
    """A plain `ls` whose stdout is a pipe shows each run id in full."""
    run_id = ok(await run_cli("start", "echo", "--input", '{"text":"x"}', env=setup.env)).out
    assert run_id.strip() in ok(await run_cli("ls", env=setup.env)).out


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('tokens = [\n  { user = "a"\n', "is not valid TOML: Unclosed inline table (at line 2"),
        ('tokens = "x"\n', "tokens must be an array of [[tokens]] tables"),
    ],
)
async def test_tokens_add_refuses_an_invalid_tokens_file_in_one_line(
    tmp_path: Path, content: str, problem: str
) -> None:
    """`runservice tokens add` on a tokens file that is not valid exits 1 with one line
    naming the file and the problem, and leaves the file byte for byte as it was."""
    path = tmp_path / "tokens.toml"
    path.write_text(content)
    result = await run_cli(
        "tokens", "add", "--file", str(path), "--user", "bob", env=cli_env(tmp_path)
    )
    assert result.code == 1, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and problem in lines[0], result.err
    assert "Traceback" not in result.err and result.out == ""
    assert path.read_text() == content
