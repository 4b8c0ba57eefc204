"""`runservice serve --workers N`: N replicas on one port, so one machine uses every core.

The parent starts each worker as `python -m runservice serve` with the parent's options
(config.serve_invocation), a data dir of its own (DATA_DIR/worker-<i>, where the replica
keeps its id and lock) and the parent's tokens file. Every worker binds the one --listen
port (and the one --http-listen port, if any) with SO_REUSEPORT, so the kernel spreads new
connections over them, and they coordinate through PostgreSQL as any replicas do (leases,
LISTEN/NOTIFY): hence --workers needs PostgreSQL.

The parent serves nothing and owns no runs. It sends SIGTERM to every worker when it gets
SIGTERM or SIGINT, waits for them, and exits 0 when each stopped cleanly. A worker that
ends on its own is restarted after a backoff, at most RESTARTS_PER_MINUTE times a minute
(its peers' leases cover its runs meanwhile), except when its first start fails: then the
options do not let a worker start, and the parent stops the others and exits 1 (the
worker's own log line says why). A worker says it serves by writing a byte to a pipe the
parent gave it. Workers run in process groups of their own, so a terminal's Ctrl-C
reaches them once, through the parent, and the kernel sends them SIGTERM if the parent
dies.

With --metrics-listen the parent alone listens there, and serves what its workers write to
DATA_DIR/metrics (prometheus_client's multiprocess mode, emptied at each start): counters
summed over every worker and every life of one, gauges over the workers alive now.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from runservice import config, metrics
from runservice.config import Settings
from runservice.tokens import TokensFileError, ensure_dev_token

logger = logging.getLogger(__name__)

RESTARTS_PER_MINUTE = 5
"""A worker is restarted at most this many times in any minute; more restarts wait."""
RESTART_WINDOW_S = 60.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
"""The wait before a restart doubles with each restart in the last minute, up to this."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
READY = b"1"
_PR_SET_PDEATHSIG = 1


def serve(settings: Settings) -> int:
    """Runs settings.workers workers until SIGINT or SIGTERM; returns the exit code (0 when
    every worker stopped cleanly, else 1). A refusal is logged in one line and returns 1."""
    problem = refusal(settings) or prepare(settings)
    if problem:
        logger.error("%s", problem)
        return 1
    try:
        endpoint = serve_metrics(settings)
    except OSError as exc:
        logger.error(
            "cannot serve metrics on %s (%s; is another process using it?)",
            settings.metrics_listen,
            exc.strerror,
        )
        return 1
    try:
        return asyncio.run(Supervisor(settings).run())
    finally:
        if endpoint is not None:
            endpoint.stop()


def refusal(settings: Settings) -> str | None:
    """Why `settings` cannot run as several workers, in one line; None when they can."""
    try:
        backend = make_url(settings.db_url).get_backend_name()
    except ArgumentError:
        backend = ""
    if backend != "postgresql":
        return (
            "--workers needs PostgreSQL (--db postgresql+asyncpg://...): a SQLite file serves "
            "one process; see docs/scaling.md"
        )
    for flag, address in (("--listen", settings.listen), ("--http-listen", settings.http_listen)):
        if address.rpartition(":")[2] == "0":
            return (
                f"--workers needs a fixed port in {flag} (got {address}): the workers share "
                "one known port"
            )
    if settings.metrics_listen:
        try:
            metrics.parse_address(settings.metrics_listen)
        except config.AddressError as exc:
            return str(exc)
    return None


def prepare(settings: Settings) -> str | None:
    """Readies what the workers share: the port, which no other process may hold, the data
    dirs (mode 700), and the dev token when asked for (written once, here). Returns the
    problem in one line, or None."""
    for flag, address in (("", settings.listen), ("--http-listen ", settings.http_listen)):
        taken = port_taken(address, flag) if address else None
        if taken:
            return taken
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for index in range(settings.workers):
            worker_dir(settings, index).mkdir(exist_ok=True, mode=0o700)
        if settings.metrics_listen:
            metrics.prepare_multiprocess_dir(metrics_dir(settings))
    except OSError as exc:
        return f"cannot create the data directory {exc.filename}: {exc.strerror}"
    if settings.dev_token:
        try:
            ensure_dev_token(settings.data_dir, settings.tokens_path)
        except TokensFileError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot write the development token in {settings.data_dir}: {exc.strerror}"
        logger.info(
            "development token of the admin user 'dev' is in %s (mode 600)",
            settings.data_dir / "dev-token",
        )
    return None


def port_taken(listen: str, flag: str = "") -> str | None:
    """A refusal when another process holds the port of --listen (or of `flag`, e.g.
    "--http-listen "). Without it, the workers' SO_REUSEPORT would share the port with any
    server of this user that sets it too."""
    host, _, port = listen.rpartition(":")
    try:
        found = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError):
        return None  # not a HOST:PORT this can probe: the workers say what is wrong with it
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"cannot listen on {flag}{listen} (is another process using it?)"
    return None


def worker_dir(settings: Settings, index: int) -> Path:
    """Worker `index`'s data dir."""
    return settings.data_dir / f"worker-{index}"


def metrics_dir(settings: Settings) -> Path:
    """Where the workers write their metrics for the parent to serve."""
    return settings.data_dir / "metrics"


def serve_metrics(settings: Settings) -> metrics.MetricsServer | None:
    """The parent's endpoint of --metrics-listen, serving every worker's metrics; None
    without the option. OSError when it cannot listen."""
    if not settings.metrics_listen:
        return None
    registry = metrics.multiprocess_registry(metrics_dir(settings))
    endpoint = metrics.MetricsServer.start(settings.metrics_listen, registry)
    logger.info("metrics of the %d workers on %s", settings.workers, endpoint.url)
    return endpoint


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: the parent's, with a data dir of its own, the parent's
    tokens file, and no dev token (the parent wrote it)."""
    return replace(
        settings,
        data_dir=worker_dir(settings, index),
        tokens_file=settings.tokens_path,
        dev_token=False,
        workers=1,
        worker_index=index,
        metrics_listen="",  # the parent serves the workers' metrics
    )


def worker_invocation(
    settings: Settings, index: int, ready_fd: int
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of worker `index`, which reports that it serves
    on `ready_fd`: ours, without the server's variables but those carrying secrets."""
    argv, variables = config.serve_invocation(worker_settings(settings, index))
    drop = config.server_variables() | {metrics.MULTIPROCESS_DIR_VARIABLE}
    env = {name: value for name, value in os.environ.items() if name not in drop}
    if settings.metrics_listen:
        variables[metrics.MULTIPROCESS_DIR_VARIABLE] = str(metrics_dir(settings))
    command = [sys.executable, "-m", "runservice", "serve", *argv, f"--worker-ready-fd={ready_fd}"]
    return command, env | variables


def ready_reporter(fd: int) -> Callable[[], None]:
    """What a worker calls once it serves: tells its parent through the pipe `fd`."""
    os.set_inheritable(fd, False)  # the agents' subprocesses have no business with it

    def report() -> None:
        with contextlib.suppress(OSError):  # the parent is gone; its SIGTERM follows
            os.write(fd, READY)
        os.close(fd)

    return report


def restart_delay(history: deque[float], now: float) -> float:
    """Seconds to wait before the next restart of a worker whose restarts (times, on the
    monotonic clock) are `history`; records the restart there."""
    while history and history[0] <= now - RESTART_WINDOW_S:
        history.popleft()
    delay = min(FIRST_BACKOFF_S * 2.0 ** len(history), MAX_BACKOFF_S)
    if len(history) >= RESTARTS_PER_MINUTE:
        delay = max(delay, history[-RESTARTS_PER_MINUTE] + RESTART_WINDOW_S - now)
    history.append(now + delay)
    return delay


@dataclass
class _Worker:
    """One worker's place: the process in it now, how many it had, when it restarted."""

    index: int
    process: asyncio.subprocess.Process | None = None
    lives: int = 0
    restarts: deque[float] = field(default_factory=deque)


class Supervisor:
    """Starts the workers, keeps them running, and stops them when told to."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._workers = [_Worker(index) for index in range(settings.workers)]
        self._stopping = asyncio.Event()
        self._failed = False

    async def run(self) -> int:
        """Runs until every worker has stopped; the exit code."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            clean = await asyncio.gather(*(self._keep(worker) for worker in self._workers))
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
        logger.info("the workers have stopped")
        return 0 if all(clean) and not self._failed else 1

    async def _keep(self, worker: _Worker) -> bool:
        """Keeps `worker` running until the parent stops; True if its last life ended
        cleanly (status 0, or stopped before it served)."""
        while True:
            try:
                process, ready_pipe = await self._start(worker)
            except OSError as exc:
                self._give_up(f"cannot start worker {worker.index}: {exc}")
                return False
            code = await process.wait()
            served = _served(ready_pipe)
            if self._settings.metrics_listen:
                metrics.process_gone(process.pid, metrics_dir(self._settings))
            if self._stopping.is_set():
                if code == 0 or (not served and code == -signal.SIGTERM):
                    return True
                logger.error(
                    "worker %d (pid %d) %s as it stopped", worker.index, process.pid, _ending(code)
                )
                return False
            if worker.lives == 1 and not served and code > 0:
                self._give_up(
                    f"worker {worker.index} exited with status {code} before it served; "
                    "stopping the others"
                )
                return False
            delay = restart_delay(worker.restarts, time.monotonic())
            logger.error(
                "worker %d (pid %d) %s; restarting it in %.1fs",
                worker.index,
                process.pid,
                _ending(code),
                delay,
            )
            if await self._stopped_within(delay):
                return True

    async def _start(self, worker: _Worker) -> tuple[asyncio.subprocess.Process, int]:
        """A new process for `worker`, and the pipe on which it will say it serves."""
        ready_pipe, ready_fd = os.pipe()
        try:
            os.set_blocking(ready_pipe, False)
            command, env = worker_invocation(self._settings, worker.index, ready_fd)
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
                pass_fds=(ready_fd,),
                process_group=0,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except BaseException:
            os.close(ready_pipe)
            raise
        finally:
            os.close(ready_fd)
        worker.process = process
        worker.lives += 1
        logger.info(
            "worker %d started (pid %d, data dir %s)",
            worker.index,
            process.pid,
            worker_dir(self._settings, worker.index),
        )
        if self._stopping.is_set():  # a signal came while it was being started
            _terminate(process)
        return process, ready_pipe

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping.is_set():
            logger.warning("second signal: the workers interrupt their remaining runs now")
        else:
            logger.info(
                "%s: stopping %d workers; a second Ctrl-C (SIGINT or SIGTERM) interrupts "
                "their runs at once",
                sig.name,
                len(self._workers),
            )
        self._stop_all()

    def _give_up(self, reason: str) -> None:
        logger.error("%s", reason)
        self._failed = True
        self._stop_all()

    def _stop_all(self) -> None:
        """SIGTERM to every worker: the first starts its drain, a second cuts it short."""
        self._stopping.set()
        for worker in self._workers:
            if worker.process is not None:
                _terminate(worker.process)

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True


def _terminate(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it has just ended
            process.send_signal(signal.SIGTERM)


def _served(ready_pipe: int) -> bool:
    """Whether the worker that just ended had said it serves; closes the pipe."""
    try:
        return os.read(ready_pipe, len(READY)) == READY
    except BlockingIOError:
        return False
    finally:
        os.close(ready_pipe)


def _ending(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn that asks Linux for SIGTERM when the parent dies, so a parent killed
    with SIGKILL leaves no workers behind on the port; None where there is no prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # it died before the request took effect
            os._exit(1)

    return preexec
