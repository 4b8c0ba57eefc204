"""`make cluster`: three runservice replicas on one private PostgreSQL, to try replicas locally.

Everything lives in one directory (`.cluster` by default): PostgreSQL's data in `pg/`
(initdb'd on first use, then kept, so a second `make cluster` finds the runs of the
first), each replica's `--data-dir` in `replica-N/`, the shared tokens file `tokens.toml`
holding the development token `dev-token` (admin user `dev`), and the logs
`postgres.log` and `replica-N.log`.

PostgreSQL runs in the foreground as a child of this script (as the `postgres` user when
started as root, since PostgreSQL refuses to run as root), on 127.0.0.1 only, with trust
authentication. Each child has a process group of its own, so a Ctrl-C in the terminal
reaches this script alone and the shutdown keeps its order: SIGINT, SIGTERM or SIGHUP
stop the replicas (SIGTERM: each drains its runs for its `--drain-timeout`, 30 s by
default; a second signal makes them interrupt the runs at once), then PostgreSQL (a fast
shutdown), and wait for every process.

tests/pgserver.py starts a throwaway PostgreSQL for the tests (a temp dir, a random port,
`pg_ctl` in the background, removed when done); this launcher keeps its data and its
process. Both find the binaries, and whom to run them as, through tools/pg.py.

Run it as `python -m tools.cluster` from the repository (`make cluster` does).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runservice.tokens import ensure_dev_token
from tools.pg import SUPERUSER, PgUnavailableError, find_bindir, postgres_owner

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "runservice"
SERVICE = "runservice.v1.RunService"
DEFAULT_DIR = ".cluster"
DEFAULT_PORTS = "50061,50062,50063"
DEFAULT_PG_PORT = 50060
START_TIMEOUT_S = 60.0
# Above a replica's default --drain-timeout (30 s) plus its --stop-grace (5 s).
REPLICA_STOP_TIMEOUT_S = 60.0
PG_STOP_TIMEOUT_S = 30.0
POLL_S = 0.05
LOG_TAIL_LINES = 20


class ClusterError(RuntimeError):
    """The cluster cannot start or lost a process; the message says why and what to do."""


class Signals:
    """Counts SIGINT, SIGTERM and SIGHUP; the handler only counts, the main loop acts."""

    def __init__(self) -> None:
        self.count = 0

    def install(self) -> None:
        """Routes the three signals here instead of to KeyboardInterrupt or death."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, indented, for an error message."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return "    (no log)"
    return "\n".join(f"    {line}" for line in text)


def stop_process(proc: subprocess.Popen[bytes], sig: int, limit: float) -> None:
    """Sends `sig` and waits up to `limit` seconds, then SIGKILL and wait: never leaves it."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Postgres:
    """A private PostgreSQL server: data in ROOT/data, its unix socket in ROOT."""

    bindir: Path
    root: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    @property
    def url(self) -> str:
        """The runservice --db URL of the cluster's database, as the superuser."""
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{DATABASE}"

    def init(self) -> None:
        """Creates the data directory with initdb unless an earlier run did."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = _owner_kwargs()
        if owner:
            os.chown(self.root, owner["user"], owner["group"])
            self._check_reachable(owner)
        if (self.datadir / "PG_VERSION").exists():
            return
        shutil.rmtree(self.datadir, ignore_errors=True)  # what an interrupted initdb left
        self._tool(
            "initdb",
            *("-D", str(self.datadir), "-U", SUPERUSER, "--auth=trust"),
            *("--encoding=UTF8", "--locale=C", "--no-sync"),
        )

    def start(self) -> None:
        """Starts the server as a child in its own process group."""
        cmd = [
            str(self.bindir / "postgres"),
            *("-D", str(self.datadir)),
            *("-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}"),
            *("-c", f"unix_socket_directories={self.root}", "-c", "max_connections=200"),
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                process_group=0,
                **_owner_kwargs(),
            )

    def ready(self) -> bool:
        """True once the server accepts connections; ClusterError if it exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ClusterError(f"PostgreSQL exited while starting.{self.failure()}")
        done = subprocess.run(
            [str(self.bindir / "pg_isready"), *self._conn("postgres"), "-q", "-t", "1"],
            check=False,
        )
        return done.returncode == 0

    def ensure_database(self) -> None:
        """Creates the runservice database unless it exists."""
        query = f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        found = self._tool("psql", "-X", "-A", "-t", *self._conn("postgres"), "-c", query)
        if found.strip() != "1":
            self._tool("createdb", *self._conn(""), DATABASE)

    def stop(self) -> None:
        """Fast shutdown (sessions ended, checkpoint written), waited for."""
        if self.proc is None:
            return
        stop_process(self.proc, signal.SIGINT, PG_STOP_TIMEOUT_S)

    def _conn(self, database: str) -> list[str]:
        args = ["-h", str(self.root), "-p", str(self.port), "-U", SUPERUSER]
        return [*args, "-d", database] if database else args

    def _tool(self, tool: str, *args: str) -> str:
        done = subprocess.run(
            [str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            cwd=self.root,
            check=False,
            **_owner_kwargs(),
        )
        if done.returncode != 0:
            raise ClusterError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}")
        return str(done.stdout)  # Any: the owner's kwargs hide the text=True overload

    def _check_reachable(self, owner: dict[str, Any]) -> None:
        done = subprocess.run(["test", "-w", str(self.root)], check=False, **owner)
        if done.returncode != 0:
            raise ClusterError(
                f"the {SUPERUSER} user cannot reach {self.root} (a parent directory is closed "
                "to other users); pass --dir under a directory every user can enter, "
                "e.g. --dir /tmp/runservice-cluster"
            )

    def failure(self) -> str:
        """What went wrong, from the log: a hint when it is a known case, and the log's end."""
        tail = log_tail(self.log_path)
        hint = ""
        if "could not bind" in tail:
            hint = f"\nPort {self.port} is taken: pick another with --pg-port."
        elif "lock file" in tail and "already exists" in tail:
            hint = (
                f"\nAnother PostgreSQL uses {self.datadir}: another cluster on this --dir "
                "still runs (Ctrl-C stops it), or one was killed and left it (kill -INT the "
                "pid on the first line of its postmaster.pid)."
            )
        return f"{hint}\nThe end of {self.log_path}:\n{tail}"


def _bindir() -> Path:
    """Where initdb and postgres are; ClusterError if nowhere."""
    try:
        return find_bindir(server="postgres")
    except PgUnavailableError as exc:
        raise ClusterError(str(exc)) from None


def _owner_kwargs() -> dict[str, Any]:
    """Popen arguments that run a PostgreSQL tool as `postgres` when we are root."""
    try:
        owner = postgres_owner()
    except PgUnavailableError as exc:
        raise ClusterError(str(exc)) from None
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


@dataclass
class Replica:
    """One `runservice serve` process."""

    name: str
    port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        """HOST:PORT for clients."""
        return f"127.0.0.1:{self.port}"

    def start(self, db_url: str, tokens_file: Path) -> None:
        """Starts the replica as a child in its own process group, its log appended."""
        cmd = [
            *(sys.executable, "-m", "runservice", "serve"),
            *("--listen", self.addr, "--data-dir", str(self.data_dir)),
            *("--db", db_url, "--tokens-file", str(tokens_file)),
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {shlex.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                process_group=0,
            )

    def ready(self) -> bool:
        """True once the replica's RunService reports SERVING; ClusterError if it exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ClusterError(f"{self.name} exited while starting.{self.failure()}")
        # A fresh channel each time: one that saw "connection refused" waits out gRPC's
        # reconnect backoff before it tries again.
        with grpc.insecure_channel(self.addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                request = health_pb2.HealthCheckRequest(service=SERVICE)
                # types-grpcio-health-checking declares no methods on HealthStub.
                reply = stub.Check(request, timeout=0.5)  # type: ignore[attr-defined]
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def failure(self) -> str:
        """What went wrong, from the log: a hint when it is a known case, and the log's end."""
        tail = log_tail(self.log_path)
        hint = (
            f"\nPort {self.port} is taken: pick others with --ports."
            if "cannot listen on" in tail
            else ""
        )
        return f"{hint}\nThe end of {self.log_path}:\n{tail}"


class Cluster:
    """PostgreSQL, the development token and the replicas, started and stopped in order."""

    def __init__(self, directory: Path, ports: Sequence[int], pg_port: int) -> None:
        self.dir = directory.resolve()
        self.tokens_file = self.dir / "tokens.toml"
        self.token_file = self.dir / "dev-token"
        self.pg = Postgres(_bindir(), self.dir / "pg", pg_port, self.dir / "postgres.log")
        self.replicas = [
            Replica(f"replica-{i}", port, self.dir / f"replica-{i}", self.dir / f"replica-{i}.log")
            for i, port in enumerate(ports, start=1)
        ]

    def start(self, signals: Signals) -> bool:
        """Starts everything and waits until it serves; False if a signal came first."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            self.dir.chmod(0o711)  # lets the postgres user through to pg/, and no further
        self.pg.init()
        self.pg.start()
        if not _wait(self.pg.ready, signals, "PostgreSQL"):
            return False
        self.pg.ensure_database()
        ensure_dev_token(self.dir, self.tokens_file)
        for replica in self.replicas:
            replica.start(self.pg.url, self.tokens_file)
        return all(_wait(r.ready, signals, r.name) for r in self.replicas)

    def supervise(self, signals: Signals) -> None:
        """Returns at the first signal; ClusterError if a process exits on its own."""
        while not signals.count:
            for replica in self.replicas:
                if replica.proc is not None and replica.proc.poll() is not None:
                    code = replica.proc.returncode
                    raise ClusterError(
                        f"{replica.name} exited with code {code}.{replica.failure()}"
                    )
            if self.pg.proc is not None and self.pg.proc.poll() is not None:
                raise ClusterError(f"PostgreSQL exited.{self.pg.failure()}")
            time.sleep(POLL_S)

    def stop(self, signals: Signals) -> None:
        """Replicas first (SIGTERM, then wait), PostgreSQL last; each waited for."""
        running = [r.proc for r in self.replicas if r.proc is not None and r.proc.poll() is None]
        if running:
            print("stopping the replicas (they drain their runs; Ctrl-C again: interrupt them)")
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        seen = signals.count
        deadline = time.monotonic() + REPLICA_STOP_TIMEOUT_S
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            if signals.count > seen:  # a second Ctrl-C: the replicas interrupt their runs
                seen = signals.count
                for proc in running:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM)
            time.sleep(POLL_S)
        for proc in running:
            stop_process(proc, signal.SIGKILL, 10.0)
        print("stopping PostgreSQL")
        self.pg.stop()

    def summary(self) -> str:
        """What a newcomer needs: addresses, files, the database URL, commands to try."""
        rows = [
            (r.name, r.addr, f"--data-dir {r.data_dir.name}/, log {r.log_path.name}")
            for r in self.replicas
        ]
        rows += [
            ("PostgreSQL", self.pg.url, f"data {self.pg.root.name}/, log {self.pg.log_path.name}"),
            ("tokens file", str(self.tokens_file), "shared by the replicas"),
            ("token file", str(self.token_file), "the development token, admin user dev"),
        ]
        width = max(len(name) for name, _, _ in rows)
        value = max(len(r.addr) for r in self.replicas)
        return "\n".join(
            [
                f"{len(self.replicas)} runservice replicas on one PostgreSQL database; "
                f"their files are in {self.dir}",
                "",
                *(f"  {name:<{width}}  {v:<{value}}  ({note})" for name, v, note in rows),
                "",
                "Try it in another terminal: a run started on one replica, read on the others.",
                "",
                *(f"  {line}" for line in self.commands()),
                "",
                "README.md, section Several replicas, shows a Python client that spreads its",
                "calls over every replica. Ctrl-C here stops the replicas, then PostgreSQL.",
            ]
        )

    def commands(self) -> list[str]:
        """Shell lines to paste, in order: the CLI (the Python client) and grpcurl."""
        first, last = self.replicas[0].addr, self.replicas[-1].addr
        cli = shlex.quote(str(Path(sys.executable).parent / "runservice"))
        grpcurl = shlex.quote(_grpcurl())
        ticker = shlex.quote('{"count": 5, "interval": 0.2}')
        get = '"{\\"run_id\\": \\"$RUN_ID\\"}"'
        return [
            f'export RUNSERVICE_TOKEN="$(cat {shlex.quote(str(self.token_file))})"',
            f"RUN_ID=$({cli} start ticker --input {ticker} --addr {first})",
            f'{cli} tail "$RUN_ID" --addr {last}',
            f"{cli} ls --addr {self.replicas[len(self.replicas) // 2].addr}",
            f'{grpcurl} -plaintext -H "authorization: Bearer $RUNSERVICE_TOKEN" '
            f"-d {get} {last} {SERVICE}/GetRun",
        ]


def _grpcurl() -> str:
    """grpcurl on PATH, else the project's (make grpcurl), else the bare name."""
    local = ROOT / ".tools" / "bin" / "grpcurl"
    return shutil.which("grpcurl") or (str(local) if local.exists() else "grpcurl")


def _wait(ready: Callable[[], bool], signals: Signals, what: str) -> bool:
    """Polls `ready()` until True (True), a signal (False) or the deadline (ClusterError)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not signals.count:
        if ready():
            return True
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} did not become ready within {START_TIMEOUT_S:g}s")
        time.sleep(POLL_S)
    return False


def _ports(text: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of ports: {text!r}") from None
    if not ports or len(set(ports)) != len(ports):
        raise argparse.ArgumentTypeError(f"need distinct ports, comma-separated: {text!r}")
    return ports


def parser() -> argparse.ArgumentParser:
    """The command line; each option also has an environment variable."""
    p = argparse.ArgumentParser(
        prog="tools/cluster.py",
        description="Runs runservice replicas on one private PostgreSQL until Ctrl-C.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("CLUSTER_DIR", DEFAULT_DIR)),
        help=f"where everything lives (env CLUSTER_DIR; default {DEFAULT_DIR})",
    )
    p.add_argument(
        "--ports",
        type=_ports,
        default=_ports(os.environ.get("CLUSTER_PORTS", DEFAULT_PORTS)),
        help="the replicas' ports on 127.0.0.1, one replica each "
        f"(env CLUSTER_PORTS; default {DEFAULT_PORTS})",
    )
    p.add_argument(
        "--pg-port",
        type=int,
        default=int(os.environ.get("CLUSTER_PG_PORT", DEFAULT_PG_PORT)),
        help=f"PostgreSQL's port on 127.0.0.1 (env CLUSTER_PG_PORT; default {DEFAULT_PG_PORT})",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the cluster until a signal; 0 after an orderly stop, 1 when something failed."""
    args = parser().parse_args(argv)
    signals = Signals()
    signals.install()
    try:
        cluster = Cluster(args.dir, args.ports, args.pg_port)
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    code = 0
    try:
        if cluster.start(signals):
            print(cluster.summary(), flush=True)
            cluster.supervise(signals)
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        cluster.stop(signals)
    print("stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
