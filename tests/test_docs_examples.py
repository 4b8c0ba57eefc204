"""The documentation's examples run: every grpcurl recipe in the README and in
docs/api.md, the Python example.

The README is the source: the commands are extracted from its code blocks and run as
written (with the address, token and run id substituted), so a recipe that stops working
fails here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from runservice.client import AsyncRunClient
from runservice.tokens import add_token
from tests.helpers import sh
from tests.serverproc import running_server

ROOT = Path(__file__).parent.parent
GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"


def _sh_blocks(markdown: str, heading: str) -> list[str]:
    section = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def grpcurl_commands(page: str = "README.md", heading: str = "## grpcurl") -> list[str]:
    """Every grpcurl invocation in a section of a page, continuation lines joined."""
    text = "\n".join(_sh_blocks((ROOT / page).read_text(), heading))
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("grpcurl ")]


async def _wait_for_seq(addr: str, token: str, run_id: str, seq: int) -> None:
    async with AsyncRunClient(addr, token=token) as client:
        async for event in client.subscribe(run_id):
            if event.seq >= seq:
                return


def _grpcurl_binary() -> str:
    found = str(GRPCURL) if GRPCURL.exists() else shutil.which("grpcurl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("grpcurl is not installed: `make test` installs it into .tools/bin")
        pytest.skip("grpcurl is not installed (make grpcurl)")
    return found


async def test_every_grpcurl_recipe_in_the_readme_runs(tmp_path: Path) -> None:
    """Each README grpcurl command succeeds against a live server and prints what it says."""
    binary = _grpcurl_binary()
    commands = grpcurl_commands()
    assert len(commands) >= 14, commands
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = add_token(data_dir / "tokens.toml", "dev", ["admin"])
    async with running_server(data_dir) as server:
        env = {
            **os.environ,
            "PATH": f"{Path(binary).parent}:{os.environ['PATH']}",
            "ADDR": server.addr,
            "TOKEN": token,
            "H": f"authorization: Bearer {token}",
        }
        outputs: dict[str, str] = {}
        for recipe in commands:
            method = recipe.split()[-1]
            command = recipe.replace("-max-time 30", "-max-time 2")
            if method.endswith("/Subscribe"):  # a reader gets here when seq 4 exists
                await _wait_for_seq(server.addr, token, env["RUN_ID"], 4)
            code, out = await sh(command, env)
            if method.endswith("/StartRun"):
                env["RUN_ID"] = json.loads(out)["run"]["run_id"]
            # WatchRuns never ends by itself: -max-time ends it with DeadlineExceeded.
            expected_code = 68 if method.endswith("/WatchRuns") else 0
            assert code == expected_code, f"{command}\n{out}"
            outputs.setdefault(method, "")
            outputs[method] += out
    run_id = env["RUN_ID"]
    assert "runservice.v1.RunService" in outputs["list"]
    assert '"status": "SERVING"' in outputs["grpc.health.v1.Health/Check"]
    assert '"name": "ticker"' in outputs["runservice.v1.RunService/ListAgents"]
    assert run_id in outputs["runservice.v1.RunService/GetRun"]
    subscribe = outputs["runservice.v1.RunService/Subscribe"]
    assert '"seq": "5"' in subscribe and '"seq": "4"' not in subscribe
    assert "RUN_STATE_SUCCEEDED" in subscribe
    assert run_id in outputs["runservice.v1.RunService/ListRuns"]
    assert "RUN_STATE_SUCCEEDED" in outputs["runservice.v1.RunService/StopRun"]
    assert outputs["runservice.v1.RunService/DeleteRun"].strip() == "{}"
    assert "RUN_CHANGE_SNAPSHOT_END" in outputs["runservice.v1.RunService/WatchRuns"]


async def test_the_grpcurl_recipe_of_get_server_stats_runs(tmp_path: Path) -> None:
    """The GetServerStats recipe in docs/api.md answers an admin with this server's figures,
    and refuses a user without the admin role with PermissionDenied."""
    binary = _grpcurl_binary()
    (recipe,) = grpcurl_commands("docs/api.md", "## Server stats")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tokens = {
        "admin": add_token(data_dir / "tokens.toml", "dev", ["admin"]),
        "user": add_token(data_dir / "tokens.toml", "alice", []),
    }
    async with running_server(data_dir) as server:
        env = {
            **os.environ,
            "PATH": f"{Path(binary).parent}:{os.environ['PATH']}",
            "ADDR": server.addr,
        }
        code, out = await sh(recipe, {**env, "TOKEN": tokens["admin"]})
        assert code == 0, f"{recipe}\n{out}"
        stats = json.loads(out)
        assert stats["pid"] == server.pid and stats["version"]
        assert stats["uptime"].endswith("s") and "active_runs" not in stats  # 0: left out
        code, out = await sh(recipe, {**env, "TOKEN": tokens["user"]})
        assert code != 0 and "Code: PermissionDenied" in out and "admin role" in out, out


async def test_the_python_client_example_runs(tmp_path: Path) -> None:
    """The Python example in docs/clients.md runs against a live server and prints its output."""
    section = (ROOT / "docs" / "clients.md").read_text().split("## The Python client", 1)[1]
    example = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = add_token(data_dir / "tokens.toml", "alice", [])
    async with running_server(data_dir) as server:
        env = {**os.environ, "RUNSERVICE_ADDR": server.addr, "RUNSERVICE_TOKEN": token}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            example,
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "4 token three\n5 run.state RUN_STATE_SUCCEEDED" in text
    assert "RUN_STATE_SUCCEEDED {'text': 'one two three'}" in text
    assert "NOT_FOUND RUN_NOT_FOUND" in text
    assert "[1, 2, 3, 4, 5]" in text


def _snippet(heading: str, language: str) -> list[str]:
    section = (ROOT / "docs" / "clients.md").read_text().split(heading, 1)[1].split("\n## ")[0]
    block = re.findall(rf"```{language}\n(.*?)```", section, re.S)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("heading", "language", "source"),
    [
        ("## The Go client", "go", "clients/go/cmd/quickstart/main.go"),
        ("## The TypeScript client", "ts", "clients/typescript/examples/quickstart.ts"),
    ],
)
def test_each_docs_snippet_is_part_of_a_program_the_tests_run(
    heading: str, language: str, source: str
) -> None:
    """The Go and TypeScript snippets in docs/clients.md are excerpts of runnable programs."""
    program = {line.strip() for line in (ROOT / source).read_text().splitlines()}
    missing = [line for line in _snippet(heading, language) if line not in program]
    assert not missing, f"{source} lacks snippet lines: {missing}"


async def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def test_the_go_and_typescript_quickstarts_run(tmp_path: Path) -> None:
    """Both quickstart programs run against a live server and print the run's log."""
    go = shutil.which("go")
    ts_example = ROOT / "clients" / "typescript" / "dist" / "examples" / "quickstart.js"
    if go is None or not ts_example.exists():
        if os.environ.get("CI"):
            pytest.fail("go or the built TypeScript examples are missing; `make test` builds them")
        pytest.skip("go or the built TypeScript examples are missing")
    binary = tmp_path / "quickstart"
    await _run(
        [go, "build", "-o", str(binary), "./cmd/quickstart"],
        ROOT / "clients" / "go",
        dict(os.environ),
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = add_token(data_dir / "tokens.toml", "alice", [])
    async with running_server(data_dir) as server:
        env = {**os.environ, "RUNSERVICE_ADDR": server.addr, "RUNSERVICE_TOKEN": token}
        go_out = await _run([str(binary)], ROOT, env)
        ts_out = await _run(["node", str(ts_example)], ROOT / "clients" / "typescript", env)
    assert "1 run.state RUNNING" in go_out and "7 run.state SUCCEEDED" in go_out
    assert "not found:" in go_out
    assert "4 token three" in ts_out and "5 run.state SUCCEEDED" in ts_out
    assert "NOT_FOUND RUN_NOT_FOUND" in ts_out
