"""The CLI's rough edges a new user meets, against real server processes: --version,
--token, `tokens list` / `tokens revoke`, `ls` in 80 columns, a server that is down,
`tail --from-seq -1`, and --json on every command (errors too).

Helpers and the environment (piped stdout, no development token) are those of
test_process_cli.py.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from runservice import cli
from runservice.tokens import add_token, hash_token, list_tokens
from tests.serverproc import free_port, running_server, start_server, wait_for
from tests.test_process_cli import (
    CLI_LIMIT_S,
    Result,
    Setup,
    cli_env,
    event_lines,
    ok,
    run_cli,
    runservice_command,
)

BOX_CHARS = set("┏┓┗┛┃━┡┩╇│─└┘┌┐┼╭╮╰╯")
LONG_RUN = '{"count": 100000, "interval": 0.02}'


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    """A running server with a token for alice."""
    data_dir = tmp_path / "data"
    token = add_token(data_dir / "tokens.toml", "alice", [])
    home = tmp_path / "home"
    async with running_server(data_dir) as server:
        env = cli_env(home, RUNSERVICE_ADDR=server.addr, RUNSERVICE_TOKEN=token)
        yield Setup(server, token, env, home)


def err_lines(result: Result) -> list[str]:
    """The lines a command wrote to stderr that are not blank."""
    return [line for line in result.err.splitlines() if line.strip()]


async def test_version_prints_the_installed_package_version(tmp_path: Path) -> None:
    """`runservice --version` prints the version importlib.metadata knows, and exits 0."""
    result = ok(await run_cli("--version", env=cli_env(tmp_path)))
    assert result.out.strip() == f"runservice {importlib.metadata.version('runservice')}"


async def test_token_flag_beats_the_environment_and_help_never_shows_a_token(
    setup: Setup,
) -> None:
    """--token authenticates without RUNSERVICE_TOKEN and wins over a wrong one; `--help`
    shows neither the flag's nor the environment's token."""
    no_env = {k: v for k, v in setup.env.items() if k != "RUNSERVICE_TOKEN"}
    ok(await run_cli("ls", "--token", setup.token, env=no_env))
    wrong_env = {**setup.env, "RUNSERVICE_TOKEN": "rs_wrong"}
    ok(await run_cli("agents", "--token", setup.token, env=wrong_env))
    refused = await run_cli("agents", env=wrong_env)
    assert refused.code == 1 and "UNAUTHENTICATED" in refused.err
    helped = ok(await run_cli("ls", "--help", env=setup.env))
    assert "--token" in helped.out and setup.token not in helped.out + helped.err


async def test_tokens_list_and_revoke_edit_the_file_the_running_server_rereads(
    setup: Setup,
) -> None:
    """`tokens list` shows users, roles and fingerprints but no token; `tokens revoke` by
    fingerprint or by user prints one line and the server refuses the revoked tokens at
    once; revoking what is not there is one line and exit 1."""
    path = setup.server.data_dir / "tokens.toml"
    env = setup.env
    root = ok(
        await run_cli(
            "tokens", "add", "--file", str(path), "--user", "root", "--role", "admin", env=env
        )
    ).out.splitlines()[-1]
    second = add_token(path, "alice", [])
    with path.open("a") as f:  # an entry written with a creation time
        f.write(f'\n[[tokens]]\nuser = "carol"\nsha256 = "{hash_token("c" * 20)}"\n')
        f.write("created = 2026-01-02T03:04:05Z\n")

    listed = ok(await run_cli("tokens", "list", "--file", str(path), env=env)).out
    lines = listed.splitlines()
    assert lines[0].split("\t") == ["user", "roles", "fingerprint", "created"]
    rows = [line.split("\t") for line in lines[1:]]
    expected = [("alice", ""), ("root", "admin"), ("alice", ""), ("carol", "")]
    assert [(r[0], r[1]) for r in rows] == expected
    # Entries added by `tokens add` (and add_token) record when; carol's was hand-written.
    assert rows[3][3] == "2026-01-02T03:04:05Z"
    added = datetime.fromisoformat(rows[1][3])
    assert added.tzinfo is not None and abs(datetime.now(UTC) - added) < timedelta(minutes=5)
    for token in (setup.token, root, second):
        assert token not in listed and hash_token(token) not in listed
    as_json = json.loads(
        ok(await run_cli("tokens", "list", "--file", str(path), "--json", env=env)).out
    )
    assert as_json[1] == {
        "user": "root",
        "roles": ["admin"],
        "fingerprint": hash_token(root)[:12],
        "created": rows[1][3],
    }

    fingerprint = hash_token(setup.token)[:8]
    revoked = ok(
        await run_cli(
            "tokens", "revoke", "--file", str(path), "--fingerprint", fingerprint, env=env
        )
    )
    assert len(revoked.out.splitlines()) == 1 and "revoked 1 token" in revoked.out
    refused = await run_cli("agents", env=env)
    assert refused.code == 1 and "UNAUTHENTICATED" in refused.err
    ok(await run_cli("agents", "--token", second, env=env))

    revoked = ok(await run_cli("tokens", "revoke", "--file", str(path), "--user", "alice", env=env))
    assert "revoked 1 token" in revoked.out and "alice" in revoked.out
    assert [e.user for e in list_tokens(path)] == ["root", "carol"]
    assert (await run_cli("agents", "--token", second, env=env)).code == 1
    ok(await run_cli("ls", "--all-users", "--token", root, env=env))

    for how in (["--user", "nobody"], ["--fingerprint", "0000ffff"]):
        missing = await run_cli("tokens", "revoke", "--file", str(path), *how, env=env)
        assert missing.code == 1 and missing.out == "", missing
        assert len(err_lines(missing)) == 1 and "no token" in missing.err, missing.err
    assert [e.user for e in list_tokens(path)] == ["root", "carol"]


def test_ls_table_fits_80_columns_and_keeps_run_ids_whole() -> None:
    """At width 80, the `ls` table keeps every run id, state and last_seq whole, drops
    `created`, and cuts long agent and owner names with an ellipsis."""
    rows = [
        {
            "run_id": f"01a1ffce-0d56-7e91-9da3-adb17a21345{i}",
            "state": state,
            "agent": agent,
            "owner": owner,
            "created": "2026-11-21T20:58:21Z",
            "last_seq": seq,
        }
        for i, (state, agent, owner, seq) in enumerate(
            [
                ("INTERRUPTED", "a-very-long-agent-name-indeed", "someone-with-a-long-name", "7"),
                ("SUCCEEDED", "ticker", "dev", "123456"),
            ]
        )
    ]
    console = Console(width=80, record=True, force_terminal=True, color_system=None)
    console.print(cli._runs_table(rows, console.width))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].split() == ["run_id", "state", "agent", "owner", "last_seq"]
    for row, line in zip(rows, lines[2:], strict=True):
        assert row["run_id"] in line and row["state"] in line and line.endswith(row["last_seq"])
    assert "…" in lines[2] and "ticker" in lines[3] and "dev" in lines[3]

    wide = Console(width=140, record=True, force_terminal=True, color_system=None)
    wide.print(cli._runs_table(rows, wide.width))
    text = wide.export_text()
    assert "created" in text and "a-very-long-agent-name-indeed" in text and "…" not in text


async def test_ls_in_an_80_column_terminal_shows_every_column_but_created(setup: Setup) -> None:
    """`ls` on a terminal of COLUMNS=80 prints lines of at most 80 characters with the run
    id, state, agent, owner and last_seq of each run."""
    run_id = ok(await run_cli("start", "echo", "--input", '{"text":"x"}', env=setup.env)).out
    terminal = {**setup.env, "COLUMNS": "80", "TTY_COMPATIBLE": "1"}
    lines = re.sub(r"\x1b\[[0-9;]*m", "", ok(await run_cli("ls", env=terminal)).out).splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[0].split() == ["run_id", "state", "agent", "owner", "last_seq"]
    row = next(line for line in lines if run_id.strip() in line).split()
    assert row[1:3] == ["SUCCEEDED", "echo"] and row[3] == "alice" and row[4].isdigit()


async def test_a_server_that_is_down_fails_fast_naming_its_address(tmp_path: Path) -> None:
    """`tail` and `agents` against a port nobody listens on say they are connecting, then
    exit 1 within a few seconds with one line naming the address."""
    addr = f"127.0.0.1:{free_port()}"
    env = cli_env(tmp_path, RUNSERVICE_ADDR=addr, RUNSERVICE_TOKEN="rs_x")
    started = time.monotonic()
    tail, agents, as_json = await asyncio.gather(
        run_cli("tail", "01a1ffce-0d56-7e91-9da3-adb17a213454", env=env),
        run_cli("agents", env=env),
        run_cli("ls", "--json", env=env),
    )
    assert time.monotonic() - started < cli.CONNECT_LIMIT_S + 5
    for result in (tail, agents):
        assert result.code == 1 and result.out == ""
        lines = err_lines(result)
        assert lines[0] == f"connecting to {addr}...", lines
        assert len(lines) == 2 and "UNAVAILABLE" in lines[1] and addr in lines[1], lines
    assert as_json.code == 1 and as_json.out == ""
    error = json.loads(as_json.err)
    assert error["code"] == "UNAVAILABLE" and addr in error["message"]


async def read_until(stream: asyncio.StreamReader, seen: list[str], seq: int) -> None:
    """Appends `tail`'s lines to `seen` until an event with seq >= `seq` arrives."""
    while not seen or int(seen[-1].split()[0]) < seq:
        line = await stream.readline()
        assert line, f"tail ended early: {seen}"
        seen.append(line.decode())


async def test_tail_resumes_across_a_server_restart_once_it_had_connected(
    tmp_path: Path,
) -> None:
    """A `tail` that reached the server keeps following through a restart of the server and
    prints each seq exactly once until the run's last event."""
    data_dir = tmp_path / "data"
    token = add_token(data_dir / "tokens.toml", "alice", [])
    async with running_server(data_dir) as server:
        env = cli_env(tmp_path / "home", RUNSERVICE_ADDR=server.addr, RUNSERVICE_TOKEN=token)
        run_id = ok(await run_cli("start", "ticker", "--input", LONG_RUN, env=env)).out.strip()
        proc = await asyncio.create_subprocess_exec(
            *runservice_command(),
            "tail",
            run_id,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            seen: list[str] = []
            await asyncio.wait_for(read_until(proc.stdout, seen, 3), CLI_LIMIT_S)
            await server.kill()  # its runs are INTERRUPTED when it starts again
            restarted = await start_server(data_dir, port=server.port)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), CLI_LIMIT_S)
            finally:
                await restarted.terminate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    events = event_lines("".join(seen) + out.decode())
    assert [seq for seq, _, _ in events] == list(range(1, len(events) + 1))
    assert events[-1][1] == "run.state" and "cannot reach" not in err.decode()


async def test_tail_refuses_a_negative_from_seq_in_one_line(tmp_path: Path) -> None:
    """`tail --from-seq -1` is a usage error: exit 2, one line naming --from-seq."""
    result = await run_cli("tail", "some-run", "--from-seq", "-1", env=cli_env(tmp_path))
    assert result.code == 2 and result.out == ""
    lines = err_lines(result)
    assert len(lines) == 1 and "--from-seq" in lines[0] and "negative" in lines[0], lines


async def test_json_makes_every_output_json_and_piped_tables_are_plain(setup: Setup) -> None:
    """With --json, rm prints JSON, a server error is a JSON object on stderr (exit 1) and a
    usage error one too (exit 2); without it, a piped `agents` has no box characters."""
    env = setup.env
    run_id = ok(await run_cli("start", "echo", "--input", '{"text":"x"}', env=env)).out.strip()
    ok(await run_cli("tail", run_id, env=env))
    assert json.loads(ok(await run_cli("rm", run_id, "--json", env=env)).out) == {
        "run_id": run_id,
        "deleted": True,
    }
    gone = await run_cli("get", run_id, "--json", env=env)
    assert gone.code == 1 and gone.out == ""
    error = json.loads(gone.err)
    assert error["code"] == "NOT_FOUND" and error["reason"] == "RUN_NOT_FOUND"
    assert error["message"]
    usage = await run_cli("tail", run_id, "--from-seq", "-1", "--json", env=env)
    assert usage.code == 2 and json.loads(usage.err)["code"] == "INVALID_ARGUMENT"
    followed = ok(
        await run_cli("start", "echo", "--input", '{"text":"y"}', "-f", "--json", env=env)
    )
    assert [json.loads(line)["seq"] for line in followed.out.splitlines()] == ["1", "2", "3"]
    assert followed.err == ""

    agents = ok(await run_cli("agents", env=env)).out
    assert not BOX_CHARS & set(agents)
    assert agents.splitlines()[0] == "agent\tdescription"
    assert any(line.startswith("echo\t") for line in agents.splitlines())
    assert [a["name"] for a in json.loads(ok(await run_cli("agents", "--json", env=env)).out)]


async def test_send_answers_a_run_that_asks_and_get_shows_it_waiting(setup: Setup) -> None:
    """`start approval`, `get` shows it waiting for input, `send` appends the answer (a
    retry with the same --request-id delivers it once), and the run ends with it; `send`
    to the ended run fails in one line saying so."""
    env = setup.env
    question = '{"question": "Deploy?"}'
    run_id = ok(await run_cli("start", "approval", "--input", question, env=env)).out.strip()

    async def waiting() -> bool:
        shown = json.loads(ok(await run_cli("get", run_id, "--json", env=env)).out)
        return bool(shown.get("waiting_for_input"))

    await wait_for(waiting, limit=CLI_LIMIT_S)
    assert "waiting" in ok(await run_cli("get", run_id, env=env)).out
    answer = ["send", run_id, "--input", '{"approve": false, "note": "not today"}']
    sent = json.loads(ok(await run_cli(*answer, "--request-id", "a1", "--json", env=env)).out)
    again = json.loads(ok(await run_cli(*answer, "--request-id", "a1", "--json", env=env)).out)
    assert sent["type"] == "input" and again["seq"] == sent["seq"]
    lines = event_lines(ok(await run_cli("tail", run_id, env=env)).out)
    assert [kind for _, kind, _ in lines] == ["run.state", "input.requested", "input", "run.state"]
    assert '"approved": false' in lines[-1][2] and "SUCCEEDED" in lines[-1][2]
    late = await run_cli("send", run_id, "--input", '{"approve": true}', env=env)
    assert late.code == 1 and len(err_lines(late)) == 1
    assert "FAILED_PRECONDITION" in late.err and "has ended (SUCCEEDED)" in late.err
