"""The two servers under test, each a subprocess: `runservice serve` and bench.bare."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runservice import tokens as token_files
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
STARTUP_S = 60.0
STOP_S = 30.0


def _cli() -> list[str]:
    """The project's own CLI: the `runservice` script of this interpreter's environment."""
    script = Path(sys.executable).parent / "runservice"
    return [str(script)] if script.exists() else [sys.executable, "-m", "runservice"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


# Every cap the server has, off for the bench (0 = no cap); only those this version knows.
CAPS = ("--max-active", "--max-active-per-user", "--max-streams-per-user")


@functools.cache
def _serve_help() -> str:
    done = subprocess.run(
        [*_cli(), "serve", "--help"], capture_output=True, text=True, check=True, env=_env()
    )
    return done.stdout


def serve_has(option: str) -> bool:
    """Whether this version's `runservice serve` has `option` (e.g. "--workers")."""
    return re.search(re.escape(option) + r"(?![\w-])", _serve_help()) is not None


def _caps_off() -> tuple[str, ...]:
    return tuple(x for flag in CAPS if serve_has(flag) for x in (flag, "0"))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """A server process under test."""

    kind: str  # "runservice" or "bare"
    proc: subprocess.Popen[bytes]
    addr: str
    token: str
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)
    users: dict[str, str] = field(default_factory=dict, repr=False)  # user -> token

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def rss(self) -> int:
        """Resident set size in bytes."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def cpu_seconds(self) -> float:
        """User + system CPU time consumed so far (all threads)."""
        t = psutil.Process(self.pid).cpu_times()
        return float(t.user + t.system)

    def stop(self, limit: float = STOP_S) -> None:
        """SIGTERM, then SIGKILL after `limit` seconds (at once if `limit` <= 0)."""
        if self.proc.poll() is None and limit <= 0:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(limit)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log."""
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


def _wait_healthy(server: Server, limit: float = STARTUP_S) -> None:
    deadline = time.monotonic() + limit
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.kind} server exited ({server.proc.returncode}):\n{server.log_tail()}"
            )
        with grpc.insecure_channel(server.addr) as channel:
            try:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(  # type: ignore[attr-defined]  # the stubs omit it
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        if time.monotonic() > deadline:
            server.stop(1)
            raise TimeoutError(f"{server.kind} server not healthy within {limit:g}s")
        time.sleep(0.05)


def add_token(data_dir: Path, user: str) -> str:
    """A new token for `user` in the data dir's tokens file (`runservice tokens add`)."""
    added = subprocess.run(
        [*_cli(), "tokens", "add", "--file", str(data_dir / "tokens.toml"), "--user", user],
        check=True,
        capture_output=True,
        text=True,
    )
    return added.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class TokensFile:
    """A tokens file that several servers read (replicas of one deployment), and the
    token of each user in it."""

    path: Path
    tokens: dict[str, str]  # user -> token; "bench" among them

    @classmethod
    def make(cls, path: Path, users: Sequence[str]) -> TokensFile:
        """A new tokens file at `path` with a token for `bench` and for each of `users`."""
        made = {u: token_files.add_token(path, u, []) for u in dict.fromkeys(("bench", *users))}
        return cls(path, made)


def start_runservice(
    data_dir: Path,
    extra: list[str] | None = None,
    *,
    caps: Sequence[str] | None = None,
    users: Sequence[str] = (),
    loop: str = "uvloop",
    tokens_file: TokensFile | None = None,
) -> Server:
    """`runservice serve` on a free port over a fresh data dir, bench agent added.

    Every cap is off unless `caps` is given: then exactly those flags (with their values)
    are passed and the other caps keep the server's defaults. The token of user `bench`
    is `Server.token`; each of `users` gets one too, in `Server.users`. With
    `tokens_file`, the server reads that file (`--tokens-file`) and its tokens are the
    ones already there (`users` is then ignored).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    if tokens_file is None:
        token = add_token(data_dir, "bench")
        tokens = {user: add_token(data_dir, user) for user in users}
        auth: list[str] = []
    else:
        token = tokens_file.tokens["bench"]
        tokens = {u: t for u, t in tokens_file.tokens.items() if u != "bench"}
        auth = ["--tokens-file", str(tokens_file.path)]
    port = free_port()
    cmd = [
        *_cli(),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(data_dir),
        *(_caps_off() if caps is None else caps),
        "--drain-timeout",
        "0s",
        "--stop-grace",
        "1s",
        "--log-level",
        "warning",
        "--agent",
        "paced=bench.agents:paced",
        "--event-loop",
        loop,
        *auth,
        *(extra or []),
    ]
    log_path = data_dir.with_name(data_dir.name + ".log")
    log = log_path.open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    server = Server("runservice", proc, f"127.0.0.1:{port}", token, log_path, log, tokens)
    _wait_healthy(server)
    return server


def start_bare(log_path: Path, loop: str = "uvloop") -> Server:
    """The bare baseline server (bench.bare) on a free port, on event loop `loop`."""
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bare", "--listen", "127.0.0.1:0", "--event-loop", loop],
        stdout=subprocess.PIPE,
        stderr=log,
        env=_env(),
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"bare server did not start: {line!r}")
    server = Server("bare", proc, f"127.0.0.1:{line.split()[1]}", "", log_path, log)
    _wait_healthy_bare(server)
    return server


def _wait_healthy_bare(server: Server) -> None:
    """The bare server has no health service: one GetRun answering NOT_FOUND is enough."""
    with grpc.insecure_channel(server.addr) as channel:
        stub = pb_grpc.RunServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.GetRun(pb.GetRunRequest(run_id="none"), timeout=STARTUP_S)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
