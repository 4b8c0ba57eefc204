"""The composition root: builds the store, the manager and the gRPC server; ordered shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import make_url

from runservice.agents import BUILTINS
from runservice.api.auth import Authenticator, AuthInterceptor, TokensFileAuthenticator
from runservice.api.page_token import PageTokens
from runservice.api.servicer import RunServiceServicer
from runservice.config import Settings
from runservice.domain.ports import Clock
from runservice.runtime.agent import AgentRegistry
from runservice.runtime.clock import SystemClock
from runservice.runtime.manager import RunManager, RuntimeSettings
from runservice.runtime.policies import Limits
from runservice.store import SqlRunStore, open_store
from runservice.store.lock import DatabaseInUseError, FileLock, lock_for
from runservice.tokens import ensure_dev_token
from runservice.v1 import run_service_pb2, run_service_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name
SERVER_STOP_GRACE_S = 5.0


@dataclass
class App:
    """A running server and what it is made of."""

    server: grpc.aio.Server
    manager: RunManager
    store: SqlRunStore
    health: health.aio.HealthServicer
    port: int
    lock: FileLock | None = None
    _stopped: bool = False

    async def stop(self) -> None:
        """Stops in order: refuse work, drain runs, end streams, stop serving, close the store."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.manager.shutdown()
        await self.server.stop(SERVER_STOP_GRACE_S)
        await self.store.close()
        if self.lock is not None:
            self.lock.release()
        logger.info("stopped")


def build_agents(settings: Settings) -> AgentRegistry:
    """Built-ins, then installed entry points, then --agent specs (later ones win)."""
    agents = AgentRegistry()
    for name, agent in BUILTINS.items():
        agents.register(name, agent)
    agents.load_entry_points()
    for spec in settings.agents:
        try:
            agents.load_spec(spec)
        except (ValueError, TypeError, ImportError, AttributeError) as exc:
            raise AgentLoadError(f"--agent {spec}: {exc}") from exc
    return agents


class AgentLoadError(RuntimeError):
    """An --agent spec could not be loaded."""


class ListenError(RuntimeError):
    """The server could not bind its listen address."""


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The transport limits, all explicit."""
    return [
        ("grpc.max_receive_message_length", settings.max_receive_message_size),
        ("grpc.max_send_message_length", settings.max_send_message_size),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(settings.keepalive_min_ping_interval * 1000),
        ),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 20_000),
        ("grpc.so_reuseport", 0),
    ]


def load_secret(path: Path) -> bytes:
    """The server's signing secret (page tokens), created mode 600 on first start."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


async def build(
    settings: Settings,
    *,
    clock: Clock | None = None,
    authenticators: list[Authenticator] | None = None,
) -> App:
    """Opens the store, reconciles orphans, and starts a server listening on settings.listen."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.dev_token:
        ensure_dev_token(settings.data_dir, settings.tokens_path)
    # Reconciliation marks every unfinished run INTERRUPTED: that is only right when no
    # other live server owns them, so a SQLite file serves one process at a time.
    lock = lock_for(settings.db_url)
    if lock is not None:
        lock.acquire()
    try:
        return await _build_locked(settings, clock, authenticators, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


async def _build_locked(
    settings: Settings,
    clock: Clock | None,
    authenticators: list[Authenticator] | None,
    lock: FileLock | None,
) -> App:
    store = await open_store(settings.db_url)
    manager = RunManager(
        store,
        build_agents(settings),
        clock or SystemClock(),
        RuntimeSettings(
            stop_grace=settings.stop_grace,
            drain_timeout=settings.drain_timeout,
            memory_grace=settings.memory_grace,
            retention=settings.retention,
            purge_interval=settings.purge_interval,
            default_timeout=settings.default_timeout,
            max_timeout=settings.max_timeout,
            limits=Limits(
                max_active=settings.max_active,
                max_active_per_user=settings.max_active_per_user,
                max_queued=settings.max_queued,
                max_queued_per_user=settings.max_queued_per_user,
            ),
        ),
    )
    await manager.start()
    auths = authenticators or [TokensFileAuthenticator(settings.tokens_path)]
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(auths)], options=server_options(settings)
    )
    servicer = RunServiceServicer(
        manager, PageTokens(load_secret(settings.data_dir / "secret.key"))
    )
    run_service_pb2_grpc.add_RunServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(settings.listen)
    except RuntimeError as exc:
        await manager.shutdown(0)
        await store.close()
        raise ListenError(
            f"cannot listen on {settings.listen} (is another process using it?)"
        ) from exc
    await server.start()
    logger.info(
        "listening on %s (port %d), database %s", settings.listen, port, _safe_url(settings.db_url)
    )
    return App(server, manager, store, health_servicer, port, lock)


def _safe_url(url: str) -> str:
    """The database URL without its password."""
    return make_url(url).render_as_string(hide_password=True)


async def serve(settings: Settings) -> int:
    """Runs the server until SIGINT or SIGTERM, then shuts down in order; returns the exit code."""
    try:
        app = await build(settings)
    except (DatabaseInUseError, AgentLoadError, ListenError) as exc:
        logger.error("%s", exc)
        return 1
    stop = asyncio.Event()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            return
        logger.warning("second signal: interrupting the remaining runs now")
        app.manager.hurry()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    logger.info("shutting down: draining runs for up to %.0fs", settings.drain_timeout)
    await app.stop()
    return 0
