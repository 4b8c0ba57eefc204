"""`make cluster` (tools/cluster.py): a real private PostgreSQL and three real replicas.

The script runs as a subprocess on free ports, is used as its own summary and the
README's "Several replicas" section say (their commands run as written, ports and paths
substituted), and is stopped with SIGINT like a Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runservice.client import AsyncRunClient
from runservice.v1 import run_pb2
from tests.pgserver import PgUnavailableError, find_bindir
from tests.serverproc import free_port, server_env, wait_for, wait_healthy

ROOT = Path(__file__).parent.parent
GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"
README_PORTS = ("50061", "50062", "50063")
ROUND_ROBIN_TARGET = "ipv4:127.0.0.1:50061,127.0.0.1:50062,127.0.0.1:50063"


def readme_section() -> str:
    """The README's "Several replicas" section."""
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Several replicas\n", 1)[1].split("\n## ", 1)[0]


def with_ports(text: str, ports: list[int]) -> str:
    """`text` with the README's ports replaced by the test cluster's."""
    for documented, port in zip(README_PORTS, ports, strict=True):
        text = text.replace(documented, str(port))
    return text


def distinct_free_ports(count: int) -> list[int]:
    """`count` different ports that were free a moment ago."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def grpcurl_dir() -> str | None:
    """The directory of the grpcurl binary (make grpcurl), or None when there is none."""
    found = str(GRPCURL) if GRPCURL.exists() else shutil.which("grpcurl")
    return str(Path(found).parent) if found else None


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory the postgres user can enter (pytest's tmp_path is closed to it under
    root); skipped without PostgreSQL, failed without it under CI."""
    try:
        find_bindir()
    except PgUnavailableError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests: {exc}", pytrace=False)
        pytest.skip(str(exc))
    path = Path(tempfile.mkdtemp(prefix="runservice-cluster-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def run_shell(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Runs `command`; returns its output, failing the test on a non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{command}\n{text}"
    return text


def printed(output: Path) -> str:
    """What the script printed so far, once its summary is complete ("" before)."""
    text = output.read_text(errors="replace")
    return text if "Ctrl-C here stops" in text else ""


def dev_token(summary: str) -> str:
    """The development token, read from the file the summary names."""
    token_file = re.search(r"token file\s+(\S+)", summary)
    assert token_file is not None, summary
    return Path(token_file[1]).read_text().strip()


def executors(cluster_dir: Path, run_ids: list[str], replicas: int) -> dict[str, int]:
    """Which replica (1-based) logged the end of each run; runs not ended yet are left out."""
    logs = [(cluster_dir / f"replica-{i}.log").read_text() for i in range(1, replicas + 1)]
    return {
        run_id: i
        for run_id in run_ids
        for i, log in enumerate(logs, start=1)
        if f"run {run_id} ended" in log
    }


async def read_from_another_replica(addrs: list[str], token: str) -> None:
    """A run started on replica 1 is read, whole and in order, from replica 3."""
    async with (
        AsyncRunClient(addrs[0], token=token) as first,
        AsyncRunClient(addrs[2], token=token) as third,
    ):
        run = await first.start_run("ticker", {"count": 5, "interval": 0.05})
        events = [event async for event in third.subscribe(run.run_id)]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6, 7]
    assert [e.type for e in events] == ["run.state", *["tick"] * 5, "run.state"]
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED


async def round_robin_snippet(home: Path, ports: list[int]) -> None:
    """The README's round_robin client runs as written: six echo runs succeed, and the
    replicas that executed them are all three."""
    section = readme_section()
    assert ROUND_ROBIN_TARGET in section and '("grpc.lb_policy_name", "round_robin")' in section
    snippet = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    out = await run_shell([sys.executable, "-c", with_ports(snippet, ports)], home, server_env())
    lines = [line.split(" ", 1) for line in out.splitlines()]
    assert len(lines) == 6, out
    for i, (_run_id, rest) in enumerate(lines):
        assert rest == f"RUN_STATE_SUCCEEDED {{'text': 'hello {i}'}}", out
    run_ids = [run_id for run_id, _ in lines]

    def all_ended() -> dict[str, int]:
        found = executors(home / ".cluster", run_ids, 3)
        return found if len(found) == len(run_ids) else {}

    ran_on = await wait_for(all_ended)
    assert set(ran_on.values()) == {1, 2, 3}, ran_on


async def printed_and_readme_commands(home: Path, summary: str, ports: list[int]) -> None:
    """The shell lines the script printed, then the README's grpcurl call, run as bash."""
    commands = summary.split("read on the others.\n\n", 1)[1].split("\n\n", 1)[0]
    readme = re.findall(r"```sh\n(.*?)```", readme_section(), re.S)
    grpcurl = [with_ports(block, ports) for block in readme if block.startswith("grpcurl ")]
    assert len(grpcurl) == 1, readme
    env = server_env()
    tools = grpcurl_dir()
    if tools is None:  # without grpcurl, its lines are left out (CI installs it)
        if os.environ.get("CI"):
            pytest.fail("grpcurl is not installed: `make test` installs it into .tools/bin")
        commands = "\n".join(c for c in commands.splitlines() if "grpcurl" not in c)
        grpcurl = []
    else:
        env["PATH"] = f"{tools}:{env['PATH']}"
    script = "set -euo pipefail\n" + "\n".join([commands, *grpcurl])
    out = await run_shell(["bash", "-c", script], home, env)
    assert "7 run.state SUCCEEDED" in out, out
    if tools is not None:
        assert out.count('"state": "RUN_STATE_') == 2, out  # GetRun, then StartRun


async def test_the_cluster_serves_any_run_on_any_replica_and_stops_on_sigint(
    home: Path,
) -> None:
    """Three replicas answer health checks; a run started on one is read from another;
    the README's client and the printed commands work; SIGINT ends every process the
    script started, and the script exits 0."""
    pg_port, *ports = distinct_free_ports(4)
    addrs = [f"127.0.0.1:{port}" for port in ports]
    output = home / "cluster.out"
    command = [sys.executable, "-m", "tools.cluster", "--dir", str(home / ".cluster")]
    command += ["--ports", ",".join(map(str, ports)), "--pg-port", str(pg_port)]
    with output.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - polled without blocking below
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=server_env()
        )
    tree: list[psutil.Process] = []
    try:
        for addr in addrs:
            await wait_healthy(addr, limit=60, proc=proc)
        summary = await wait_for(lambda: printed(output), limit=10)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) > 4, tree  # the three replicas, the postmaster and its workers
        token = dev_token(summary)

        await read_from_another_replica(addrs, token)
        await round_robin_snippet(home, ports)
        await printed_and_readme_commands(home, summary, ports)

        proc.send_signal(signal.SIGINT)
        await wait_for(lambda: proc.poll() is not None, limit=30)
        assert proc.returncode == 0, output.read_text()
        # The script waited for them all: none is left, not even for a moment.
        assert not [p for p in tree if p.is_running()], tree
        assert output.read_text().rstrip().endswith("stopped")
    except BaseException:
        print(output.read_text(errors="replace"))
        raise
    finally:  # after a failure: nothing may outlive the test
        if proc.poll() is None:
            proc.kill()
        for leftover in tree:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        proc.wait(10)
