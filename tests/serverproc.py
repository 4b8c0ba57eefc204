"""Real `runservice serve` subprocesses for process-level tests.

`start_server` launches `python -m runservice serve` on a free loopback port with a given
data directory, captures its stderr log to a file, and returns once the server answers
gRPC health checks with SERVING (polled against a deadline, never a fixed sleep).
`ServerProcess.terminate()` sends SIGTERM and waits for the exit code; `kill()` sends
SIGKILL. `running_server` wraps both as an async context manager that always reaps the
process and prints the server's log when the body raised.

Also here: `wait_for`, a deadline-bound poll for a condition, and `bearer`, the auth
metadata for a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runservice.client.errors import error_info
from runservice.v1 import run_service_pb2 as pb

T = TypeVar("T")

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_CHARS = 6000
# Starting on a port another process grabbed between our probe and the server's bind
# fails fast; try again on a fresh port this many times.
PORT_ATTEMPTS = 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bearer(token: str) -> tuple[tuple[str, str]]:
    """The gRPC metadata that authenticates as `token`."""
    return (("authorization", f"Bearer {token}"),)


async def wait_for(
    condition: Callable[[], Any | Awaitable[Any]],
    *,
    limit: float = 10.0,
    interval: float = 0.01,
    message: str = "",
) -> Any:
    """Polls `condition` (sync or async) until it returns a truthy value, which is returned.

    Raises TimeoutError (with `message`) if it stays falsy for `limit` seconds.
    """
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"condition not met within {limit:g}s")
        await asyncio.sleep(interval)


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a server or CLI subprocess: ours without RUNSERVICE_*, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSERVICE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    """A `runservice serve` subprocess."""

    port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    @property
    def addr(self) -> str:
        """HOST:PORT for clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.proc.poll()

    def log_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The end of the server's log, for failure messages."""
        return self.log_text()[-chars:]

    async def wait_exit(self, limit: float = STOP_TIMEOUT_S) -> int:
        """Waits (polling, bounded) for the process to exit; returns its exit code."""
        await wait_for(
            lambda: self.proc.poll() is not None,
            limit=limit,
            interval=0.02,
            message=f"server pid {self.pid} did not exit within {limit:g}s",
        )
        self._close_log()
        code = self.proc.returncode
        assert code is not None
        return code

    async def terminate(self, limit: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then the exit code (SIGKILL and raise if it outlives `limit`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(limit)
        except TimeoutError:
            await self.kill()
            raise

    async def kill(self) -> int:
        """SIGKILL, then the exit code (-9 unless it had already exited)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return await self.wait_exit(10.0)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


async def wait_healthy(
    addr: str, *, limit: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Polls grpc.health.v1 Check("") at `addr` until SERVING; fails early if `proc` exits.

    Each attempt uses a fresh channel: a channel that saw "connection refused" would wait out
    gRPC's reconnect backoff (about a second) before trying again.
    """
    deadline = time.monotonic() + limit
    last_error = "no answer yet"
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerExitedError(f"server exited with code {proc.returncode} while starting")
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                request = health_pb2.HealthCheckRequest(service="")
                reply = await stub.Check(request, timeout=0.5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"server at {addr} not healthy within {limit:g}s ({last_error})")
        await asyncio.sleep(0.02)


class ServerExitedError(RuntimeError):
    """The server process ended before it became healthy."""


async def start_server(
    data_dir: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    via_env: bool = False,
    log_path: Path | None = None,
    limit: float = STARTUP_TIMEOUT_S,
    port: int | None = None,
) -> ServerProcess:
    """Starts `runservice serve` on a free loopback port with `data_dir`; returns once healthy.

    `args` are extra flags (e.g. ["--drain-timeout", "1s"]); `env` extra environment. With
    `via_env`, the listen address and data directory are passed as RUNSERVICE_LISTEN and
    RUNSERVICE_DATA_DIR instead of flags. The log (stderr and stdout) is appended to
    `log_path`, by default DATA_DIR.log beside the data directory. `port` pins the port
    (to restart a server where its clients expect it).
    """
    data_dir = Path(data_dir)
    log_path = log_path or data_dir.with_name(data_dir.name + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    fixed = port
    for _ in range(PORT_ATTEMPTS if fixed is None else 1):
        port = fixed or free_port()
        listen = f"127.0.0.1:{port}"
        extra_env = dict(env or {})
        cmd = [sys.executable, "-m", "runservice", "serve"]
        if via_env:
            extra_env.update({"RUNSERVICE_LISTEN": listen, "RUNSERVICE_DATA_DIR": str(data_dir)})
        else:
            cmd += ["--listen", listen, "--data-dir", str(data_dir)]
        cmd += list(args)
        log_file = log_path.open("ab")
        log_file.write(f"\n=== {' '.join(cmd)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(  # noqa: ASYNC220 - polled without blocking below
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=server_env(extra_env),
        )
        server = ServerProcess(port, data_dir, log_path, proc, log_file)
        try:
            await wait_healthy(listen, limit=limit, proc=proc)
            return server
        except ServerExitedError as exc:
            await server.kill()
            last = exc
            if "address already in use" not in server.log_text().lower():
                break
        except BaseException:
            await server.kill()
            raise
    raise RuntimeError(f"{last}; log {log_path}:\n{_tail(log_path)}")


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except FileNotFoundError:
        return ""


@contextlib.asynccontextmanager
async def running_server(data_dir: Path, **kwargs: Any) -> AsyncIterator[ServerProcess]:
    """`start_server`, then always reap it on exit (SIGTERM, SIGKILL if stuck).

    When the body raises, the server's log tail is printed so pytest shows it.
    """
    server = await start_server(data_dir, **kwargs)
    try:
        yield server
    except BaseException:
        print(f"--- server log {server.log_path} (tail) ---\n{server.log_tail()}")
        raise
    finally:
        if server.returncode is None:
            with contextlib.suppress(TimeoutError):
                await server.terminate(limit=15.0)
        await server.kill()  # reaps and closes the log even if it already exited


# -- client-side helpers shared by the process tests ---------------------------------------


def error_reason(exc: grpc.aio.AioRpcError) -> str:
    """The runservice ErrorInfo reason of a failed call, or ""."""
    info = error_info(exc)
    return str(info.reason) if info is not None else ""


async def read_log(
    stub: Any, metadata: Any, run_id: str, from_seq: int = 1, *, deadline: float = 30.0
) -> list[Any]:
    """Every event a Subscribe from `from_seq` delivers until the stream ends with OK."""
    events: list[Any] = []
    call = stub.Subscribe(
        pb.SubscribeRequest(run_id=run_id, from_seq=from_seq), metadata=metadata, timeout=deadline
    )
    async for response in call:
        assert len(response.events) > 0, "a SubscribeResponse carries at least one event"
        events.extend(response.events)
    assert await call.code() == grpc.StatusCode.OK
    return events


def assert_gap_free(events: Sequence[Any], first: int = 1) -> None:
    """The events' seqs are first, first+1, ... with no holes or repeats."""
    seqs = [e.seq for e in events]
    expected = list(range(first, first + len(events)))
    if seqs != expected:
        bad = next(i for i, (a, b) in enumerate(zip(seqs, expected, strict=True)) if a != b)
        raise AssertionError(f"seq {seqs[bad]} at position {bad}, expected {expected[bad]}")


@dataclass(frozen=True)
class Exit:
    """What a `runservice serve` process wrote to stderr before it exited."""

    code: int
    lines: list[str]

    @property
    def last(self) -> str:
        """The last line that is not blank."""
        return next((line for line in reversed(self.lines) if line.strip()), "")

    @property
    def text(self) -> str:
        """Everything it wrote to stderr."""
        return "\n".join(self.lines)


async def serve_until_exit(
    data_dir: Path, args: Sequence[str] = (), limit: float = STARTUP_TIMEOUT_S
) -> Exit:
    """Runs `runservice serve` on a free port with `data_dir` and `args` until it exits (a
    server refusing to start); one that starts after all is killed once it says so."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runservice",
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--data-dir",
        str(data_dir),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=server_env(),
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(limit):
            async for raw in proc.stderr:
                lines.append(raw.decode(errors="replace").rstrip("\n"))
                if "listening on" in lines[-1]:
                    proc.kill()
            code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Exit(code, lines)
