"""The composition root: builds the store, the manager and the gRPC server; ordered shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import secrets
import signal
import ssl
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from runservice.agents import BUILTINS
from runservice.api.auth import (
    Authentication,
    Authenticator,
    MtlsIdentity,
    TokensFileAuthenticator,
    add_authenticated_service,
)
from runservice.api.convert import decode_event, encode_event
from runservice.api.jwt_auth import JwtAuthenticator, JwtSettings, parse_algorithms
from runservice.api.limits import StreamLimiter
from runservice.api.page_token import PageTokens
from runservice.api.read_token import ReadTokens
from runservice.api.reflection import enable_reflection
from runservice.api.servicer import PAGE_BYTES, RunServiceServicer
from runservice.config import AddressError, Settings, is_loopback
from runservice.domain.errors import StoreError, StoreUnavailableError
from runservice.domain.ports import Clock
from runservice.metrics import (
    Metrics,
    MetricsServer,
    parse_address,
    worker_multiprocess_dir,
)
from runservice.runtime.agent import AgentRegistry
from runservice.runtime.clock import SystemClock
from runservice.runtime.manager import RunManager, RuntimeSettings
from runservice.runtime.policies import Limits, duration_text
from runservice.runtime.streams import StreamLimits
from runservice.store import SqlRunStore, open_store
from runservice.store.lock import DatabaseInUseError, FileLock, lock_for
from runservice.store.preflight import DatabaseRefusedError
from runservice.store.webhooks import SqlWebhookLog
from runservice.tokens import TokensFileError, ensure_dev_token, load_tokens
from runservice.tracing import Tracing, TracingSetupError, start_tracing
from runservice.v1 import run_service_pb2, run_service_pb2_grpc
from runservice.web import StreamSettings, WebEdge, WebSettings
from runservice.web import parse_address as parse_http_address
from runservice.webhooks import SenderSettings, WebhookSender, completion_body
from runservice.webhooks.setup import WebhookSetup, webhook_setup

logger = logging.getLogger(__name__)

SERVICE_NAME = run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name
SERVER_STOP_GRACE_S = 1.0


@dataclass
class App:
    """A running server and what it is made of."""

    server: grpc.aio.Server
    manager: RunManager
    store: SqlRunStore
    health: health.aio.HealthServicer
    port: int
    lock: FileLock | None = None
    tracing: Tracing | None = None
    metrics: Metrics | None = None
    metrics_server: MetricsServer | None = None
    """The endpoint of --metrics-listen (a worker of --workers has none: its parent serves)."""
    web: WebEdge | None = None
    """The HTTP edge of --http-listen, if asked for."""
    webhooks: WebhookSender | None = None
    """The sender of completion webhooks, with --webhook-secret-file."""
    _gauges: asyncio.Task[None] | None = None  # a worker's gauges, written for its parent
    _stopped: bool = False

    async def stop(self) -> None:
        """Stops in order: refuse work, drain runs, end streams, stop serving, close the store."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self.web is not None:
            await self.web.stop_accepting()
        await self.manager.shutdown()
        if self.webhooks is not None:  # after the drain: runs that ended in it are stored
            await self.webhooks.stop()
        # Streams of runs that ended got their terminal events; the rest are cut short.
        await asyncio.gather(self.server.stop(SERVER_STOP_GRACE_S), self._close_web())
        await self.manager.settle()  # store work that callers who left let finish
        await self.store.close()
        await self._stop_metrics()
        if self.lock is not None:
            self.lock.release()
        if self.tracing is not None:
            self.tracing.shutdown()
        logger.info("stopped")

    @property
    def http_port(self) -> int:
        """The port the HTTP edge listens on (0: it has none)."""
        return self.web.port if self.web is not None else 0

    async def _close_web(self) -> None:
        if self.web is not None:
            await self.web.close()

    async def _stop_metrics(self) -> None:
        """Last, so that a scrape can watch the drain."""
        if self._gauges is not None:
            self._gauges.cancel()
            await asyncio.gather(self._gauges, return_exceptions=True)
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)


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


class ConfigError(RuntimeError):
    """The server's options do not fit together."""


def build_authentication(settings: Settings) -> Authentication:
    """The authentication backends the options ask for (tokens file, JWT, mTLS)."""
    bearer: list[Authenticator] = []
    if settings.jwt_issuer or settings.jwt_audience:
        bearer.append(JwtAuthenticator(_jwt_settings(settings)))
    mtls = MtlsIdentity(settings.mtls_identity) if settings.tls_client_ca else None
    explicit = settings.tokens_file is not None or settings.dev_token
    if explicit or settings.tokens_path.exists() or not (bearer or mtls):
        bearer.append(TokensFileAuthenticator(settings.tokens_path))
    if settings.insecure_no_auth:
        if not is_loopback(settings.listen):
            raise ConfigError(
                "--insecure-no-auth is refused unless --listen is a loopback address "
                f"(got {settings.listen})"
            )
        if settings.http_listen and not is_loopback(settings.http_listen):
            raise ConfigError(
                "--insecure-no-auth is refused unless --http-listen is a loopback address "
                f"(got {settings.http_listen})"
            )
        logger.warning(
            "--insecure-no-auth: calls without credentials are accepted as user 'anonymous'"
        )
    return Authentication(
        bearer, mtls, admins=frozenset(settings.admins), anonymous=settings.insecure_no_auth
    )


def _jwt_settings(settings: Settings) -> JwtSettings:
    if not (settings.jwt_issuer and settings.jwt_audience):
        raise ConfigError("JWT auth needs both --jwt-issuer and --jwt-audience")
    try:
        return JwtSettings(
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            algorithms=parse_algorithms(settings.jwt_algorithms),
            secret=_read(settings.jwt_secret_file, strip=True),
            public_key_pem=_read(settings.jwt_public_key),
            jwks_file=settings.jwks_file,
            leeway=settings.jwt_leeway,
            user_claim=settings.jwt_user_claim,
            roles_claim=settings.jwt_roles_claim,
        )
    except ValueError as exc:
        raise ConfigError(f"JWT: {exc}") from exc


MIN_EVENT_SIZE = 1024
MESSAGE_HEADROOM = 64 * 1024
"""What a Subscribe response adds around its largest event, with room to spare."""


def event_size_limit(settings: Settings) -> int:
    """The largest event agents may emit: --max-event-size, lowered (with a warning) to what
    fits in a response under --max-send-message-size; ConfigError if that is below 1KiB."""
    room = settings.max_send_message_size - MESSAGE_HEADROOM
    if min(room, settings.max_event_size) < MIN_EVENT_SIZE:
        raise ConfigError(
            f"--max-event-size must be at least 1KiB and --max-send-message-size at least "
            f"{MIN_EVENT_SIZE + MESSAGE_HEADROOM} bytes (got {settings.max_event_size} and "
            f"{settings.max_send_message_size})"
        )
    if settings.max_event_size <= room:
        return settings.max_event_size
    logger.warning(
        "--max-event-size %d does not fit in a response under --max-send-message-size %d: "
        "events are limited to %d bytes",
        settings.max_event_size,
        settings.max_send_message_size,
        room,
    )
    return room


def check_retention(settings: Settings) -> None:
    """ConfigError when --retention is above --max-retention: runs that ask for no
    retention would be kept longer than any run may ask to be."""
    if settings.retention > settings.max_retention:
        raise ConfigError(
            f"--retention ({duration_text(settings.retention)}) must not exceed "
            f"--max-retention ({duration_text(settings.max_retention)}): lower --retention or "
            "raise --max-retention"
        )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca for mTLS), or None."""
    if settings.tls_client_ca and not settings.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if not settings.tls_cert:
        return None
    if not settings.tls_key:
        raise ConfigError("--tls-cert needs --tls-key")
    cert, key = _read(settings.tls_cert), _read(settings.tls_key)
    assert cert is not None and key is not None
    client_ca = _read(settings.tls_client_ca)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The HTTP edge's TLS, from the files gRPC's uses (server_credentials checked them):
    TLS 1.2 or later, and with --tls-client-ca a client certificate it signed required."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if settings.tls_client_ca:
            context.load_verify_locations(cafile=str(settings.tls_client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS for --http-listen: {exc}") from exc
    return context


def _read(path: Path | None, *, strip: bool = False) -> bytes | None:
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return data.strip() if strip else data


class AgentLoadError(RuntimeError):
    """An --agent spec could not be loaded."""


class ListenError(RuntimeError):
    """The server could not bind its listen address."""


class StartupError(RuntimeError):
    """A file or directory the server was given cannot be used; the message is one line
    naming it and the problem, and the file is left as it was."""


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
        ("grpc.max_metadata_size", settings.max_metadata_size),
        *_connection_age(settings),
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 20_000),
        # Only the workers of --workers share their port; a second server fails to bind.
        ("grpc.so_reuseport", int(settings.worker_index is not None)),
    ]


def _connection_age(settings: Settings) -> list[tuple[str, int]]:
    if not settings.max_connection_age:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
    ]


def proposed_secret(path: Path) -> bytes:
    """The page-token key this server proposes to the database: a `secret.key` left in the
    data directory by an earlier release (so its page tokens stay valid), else a new one."""
    try:
        if not path.exists():
            return secrets.token_bytes(32)
        secret = path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot use the signing secret {path}: {exc.strerror}") from exc
    if len(secret) < SECRET_MIN_BYTES:
        raise StartupError(
            f"the signing secret {path} is too short ({len(secret)} bytes); delete it and "
            "restart (page tokens issued before become invalid)"
        )
    return secret


SECRET_MIN_BYTES = 16
PAGE_TOKEN_SECRET = "page-tokens"
"""The name of the page-token signing key among the database's shared secrets."""
READ_TOKEN_SECRET = "read-token"
"""The name of the read-token signing key among the database's shared secrets: every
replica signs and checks read tokens with it."""


async def build(settings: Settings, *, clock: Clock | None = None) -> App:
    """Opens the store, reconciles orphans, and starts a server listening on settings.listen.

    StartupError when the data directory, the tokens file or the database cannot be used.
    """
    _prepare_data_dir(settings.data_dir)
    if settings.dev_token:  # first: on a first start it creates the tokens file read below
        _ensure_dev_token(settings)
    with _file_refusals():
        authentication = build_authentication(settings)
    credentials = server_credentials(settings)
    # Reconciliation marks every unfinished run INTERRUPTED: that is only right when no
    # other live server owns them, so a SQLite file serves one process at a time. On
    # PostgreSQL, replicas share the database and each has a data dir of its own.
    lock = lock_for(settings.db_url)
    if make_url(settings.db_url).get_backend_name() == "postgresql":
        lock = replica_lock(settings.data_dir)
    if lock is not None:
        _acquire(lock)
    try:
        with _file_refusals(settings.db_url):
            return await _build_locked(settings, clock, authentication, credentials, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


DEV_TOKEN_FILE = "dev-token"  # where tokens.ensure_dev_token writes it, in the data dir


def _ensure_dev_token(settings: Settings) -> None:
    """Writes the development token if absent and logs where it is (never what it is).

    StartupError for a tokens file that is not valid (refused before it is touched) or a
    file that cannot be written.
    """
    with _file_refusals():
        if settings.tokens_path.exists():
            load_tokens(settings.tokens_path)
    try:
        ensure_dev_token(settings.data_dir, settings.tokens_path)
    except OSError as exc:
        raise StartupError(
            f"cannot write the development token in {settings.data_dir}: {exc.strerror}"
        ) from exc
    logger.info(
        "development token of the admin user 'dev' is in %s (mode 600)",
        settings.data_dir / DEV_TOKEN_FILE,
    )


REPLICA_ID_FILE = "replica-id"


def replica_name(data_dir: Path) -> str:
    """This replica's name, kept in its data dir across restarts (a new one the first
    time): at a restart the replica ends its earlier life's lease at once, so its runs are
    reconciled then rather than when that lease expires."""
    path = data_dir / REPLICA_ID_FILE
    try:
        name = path.read_text().strip() if path.exists() else ""
        if not name:
            name = uuid.uuid4().hex
            path.write_text(name + "\n")
    except OSError as exc:
        raise StartupError(f"cannot use the replica id file {path}: {exc.strerror}") from exc
    return name


def replica_lock(data_dir: Path) -> FileLock:
    """The lock that keeps a data dir to one replica of a PostgreSQL deployment."""
    return FileLock(
        data_dir / "replica.lock",
        "another runservice replica (pid {pid}) uses this data dir; give each replica a "
        "--data-dir of its own",
    )


def _prepare_data_dir(path: Path) -> None:
    """Creates the data directory (mode 700) when it is missing; StartupError unless it is
    a directory the server can write to."""
    if path.exists() and not path.is_dir():
        raise StartupError(f"the data directory {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupError(f"cannot create the data directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"the data directory {path} is not writable")


def _acquire(lock: FileLock) -> None:
    """Takes the database's lock; StartupError when its file cannot be opened."""
    try:
        lock.acquire()
    except OSError as exc:
        raise StartupError(f"cannot open the lock file {lock.path}: {exc.strerror}") from exc


@contextlib.contextmanager
def _file_refusals(db_url: str = "") -> Iterator[None]:
    """Re-raises a layer's refusal of the tokens file or the database as StartupError."""
    where = f" ({_safe_url(db_url)})" if db_url else ""
    try:
        yield
    except (TokensFileError, DatabaseRefusedError) as exc:
        raise StartupError(str(exc)) from exc
    except StoreUnavailableError as exc:
        raise StartupError(f"cannot start: {exc.cause}{where}") from exc
    except StoreError as exc:
        raise StartupError(f"cannot start: the database refused the work{where}") from exc


async def _build_locked(
    settings: Settings,
    clock: Clock | None,
    authentication: Authentication,
    credentials: grpc.ServerCredentials | None,
    lock: FileLock | None,
) -> App:
    # Everything that can refuse the options comes before the store opens.
    agents = build_agents(settings)
    metrics = build_metrics(settings)
    metrics.expect_agents(info.name for info in agents.infos())
    try:
        tracing = start_tracing()
    except TracingSetupError as exc:
        raise ConfigError(str(exc)) from None
    max_event_bytes = event_size_limit(settings)
    check_retention(settings)
    http_tls = _check_http(settings)
    webhooks = _check_webhooks(settings)
    proposed = proposed_secret(settings.data_dir / "secret.key")
    store = await open_store(
        settings.db_url,
        encode_event,
        decode_event,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        # A replica stalled inside a transaction for as long as its lease lets go of its
        # locks, so a peer's sweep never waits on it.
        idle_in_transaction=settings.lease_ttl,
    )
    replica = replica_name(settings.data_dir) if store.cluster is not None else ""
    if webhooks.sends:  # before the first commit: runs ended at start get theirs too
        store.webhook_rows.enable(settings.webhook_url, completion_body(settings.retention))
    manager = RunManager(
        store,
        agents,
        clock or SystemClock(),
        encode_event,
        RuntimeSettings(
            stop_grace=settings.stop_grace,
            drain_timeout=settings.drain_timeout,
            memory_grace=settings.memory_grace,
            retention=settings.retention,
            max_retention=settings.max_retention,
            max_event_bytes=max_event_bytes,
            snapshot_every=settings.snapshot_every,
            max_resumes=settings.max_resumes,
            purge_interval=settings.purge_interval,
            default_timeout=settings.default_timeout,
            max_timeout=settings.max_timeout,
            limits=Limits(
                max_active=settings.max_active,
                max_active_per_user=settings.max_active_per_user,
                max_queued=settings.max_queued,
                max_queued_per_user=settings.max_queued_per_user,
            ),
            lease_ttl=settings.lease_ttl,
        ),
        cluster=store.cluster,
        replica=replica,
        metrics=metrics,
        streams=store.streams,
        stream_limits=StreamLimits(settings.max_open_streams, settings.max_open_streams_per_user),
    )
    try:
        await manager.start()  # reads every unfinished run first: a damaged file shows here
        page_tokens, read_tokens = await _signers(store, proposed, settings)
    except BaseException:
        await _undo(manager, store)
        raise
    server = grpc.aio.server(
        options=server_options(settings),
        interceptors=tracing.interceptors() if tracing is not None else None,
    )
    authentication.use_read_tokens(read_tokens)
    servicer = RunServiceServicer(
        manager,
        page_tokens,
        read_tokens,
        page_bytes=min(PAGE_BYTES, settings.max_send_message_size // 2),
        replica=replica,
        webhook_policy=webhooks.policy,
        webhook_log=SqlWebhookLog(store),
    )
    streams = StreamLimiter(settings.max_streams_per_user)  # one cap over both edges
    add_authenticated_service(
        run_service_pb2_grpc.add_RunServiceServicer_to_server,
        servicer,
        server,
        authentication,
        streams,
        stall_timeout=settings.stream_stall_timeout,
        metrics=metrics,
    )
    health_servicer = await _add_health(server, manager)
    enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)
    try:
        if credentials is None:
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, credentials)
    except RuntimeError as exc:
        await _undo(manager, store)
        raise ListenError(
            f"cannot listen on {settings.listen} (is another process using it?)"
        ) from exc
    web = _web_edge(
        settings,
        http_tls,
        servicer=servicer,
        manager=manager,
        authentication=authentication,
        streams=streams,
        metrics=metrics,
    )
    try:
        metrics_server = await _start_endpoints(settings, metrics, web)
    except ListenError:
        await _undo(manager, store, server)
        raise
    await server.start()
    logger.info(
        "listening on %s (port %d), database %s", settings.listen, port, _safe_url(settings.db_url)
    )
    app = App(server, manager, store, health_servicer, port, lock, tracing)
    app.web = web
    app.webhooks = await _start_webhooks(webhooks, store, settings, metrics)
    _measure(app, metrics, metrics_server)
    return app


async def _undo(
    manager: RunManager, store: SqlRunStore, server: grpc.aio.Server | None = None
) -> None:
    """Takes back a start that failed half-way: the server (if it was made), the runtime
    (runs interrupted at once) and the store."""
    if server is not None:
        await server.stop(None)
    await manager.shutdown(0)
    await store.close()


async def _signers(
    store: SqlRunStore, proposed: bytes, settings: Settings
) -> tuple[PageTokens, ReadTokens]:
    """The page-token and read-token signers, with keys every replica of the database
    shares (the first replica's proposal wins)."""
    page_key = await store.shared_secret(PAGE_TOKEN_SECRET, proposed)
    read_key = await store.shared_secret(READ_TOKEN_SECRET, secrets.token_bytes(32))
    return PageTokens(page_key), ReadTokens(read_key, settings.read_token_ttl)


async def _add_health(server: grpc.aio.Server, manager: RunManager) -> health.aio.HealthServicer:
    """The health service, SERVING; readiness follows the store's health."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    manager.on_store_health(_readiness(health_servicer))
    return health_servicer


def _check_http(settings: Settings) -> ssl.SSLContext | None:
    """Refuses an --http-listen that is not HOST:PORT (ConfigError); the HTTP edge's TLS."""
    if not settings.http_listen:
        return None
    try:
        parse_http_address(settings.http_listen)
    except AddressError as exc:
        raise ConfigError(str(exc)) from None
    return http_ssl_context(settings)


def _check_webhooks(settings: Settings) -> WebhookSetup:
    """The webhook options, checked (ConfigError naming the one at fault)."""
    try:
        return webhook_setup(settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def _start_webhooks(
    webhooks: WebhookSetup, store: SqlRunStore, settings: Settings, metrics: Metrics
) -> WebhookSender | None:
    """The sender of the stored deliveries, sending; None when the server signs none."""
    if not webhooks.sends:
        return None
    sender = WebhookSender(
        SqlWebhookLog(store),
        SenderSettings(
            webhooks.secrets,
            max_age=settings.webhook_max_age,
            # A SQLite file serves one process: claims left in it are a past life's.
            release_claims_at_start=store.cluster is None,
        ),
        metrics,
    )
    await sender.start()
    return sender


def _web_edge(
    settings: Settings,
    tls: ssl.SSLContext | None,
    *,
    servicer: RunServiceServicer,
    manager: RunManager,
    authentication: Authentication,
    streams: StreamLimiter,
    metrics: Metrics,
) -> WebEdge | None:
    """The HTTP edge of --http-listen, not yet listening; None without the option. It
    calls the gRPC edge's servicer and shares its authentication and stream caps."""
    if not settings.http_listen:
        return None
    web_settings = WebSettings(
        listen=settings.http_listen,
        streams=StreamSettings(
            long_poll_timeout=settings.http_long_poll_timeout,
            sse_heartbeat=settings.http_sse_heartbeat,
            sse_max_duration=settings.http_sse_max_duration,
            stall_timeout=settings.stream_stall_timeout,
        ),
        max_body=settings.max_receive_message_size,
        reuse_port=settings.worker_index is not None,
        ssl_context=tls,
        shutdown_grace=SERVER_STOP_GRACE_S,
        cors_origins=settings.http_cors_origins,
    )
    return WebEdge(servicer, manager, authentication, streams, web_settings, metrics=metrics)


async def _start_endpoints(
    settings: Settings, metrics: Metrics, web: WebEdge | None
) -> MetricsServer | None:
    """Starts the endpoints beside gRPC that the options ask for: --metrics-listen's
    (returned) and the HTTP edge of --http-listen. ListenError, with neither left open,
    when one cannot listen."""
    metrics_server = serve_metrics(settings, metrics)
    if web is None:
        return metrics_server
    try:
        await web.start()
    except OSError as exc:
        if metrics_server is not None:
            await asyncio.to_thread(metrics_server.stop)
        raise ListenError(
            f"cannot listen on --http-listen {settings.http_listen} ({exc.strerror}; is "
            "another process using it?)"
        ) from exc
    logger.info("serving HTTP on %s (port %d); see docs/http.md", web.url, web.port)
    return metrics_server


def _measure(app: App, metrics: Metrics, endpoint: MetricsServer | None) -> None:
    """Gives the app its metrics: gauges read at each scrape, or (a worker of --workers)
    written every second for the parent to serve."""
    app.metrics, app.metrics_server = metrics, endpoint
    if metrics.multiprocess:
        app._gauges = asyncio.create_task(
            metrics.refresh_every(app.manager.stats), name="runservice-metrics-gauges"
        )
    else:
        metrics.read_gauges_from(app.manager.stats, asyncio.get_running_loop())


def build_metrics(settings: Settings) -> Metrics:
    """The server's metrics; ConfigError for a --metrics-listen that is not HOST:PORT. A
    worker of --workers writes them to the directory its parent serves them from."""
    if settings.metrics_listen:
        try:
            parse_address(settings.metrics_listen)
        except AddressError as exc:
            raise ConfigError(str(exc)) from None
    worker = settings.worker_index is not None and worker_multiprocess_dir() is not None
    return Metrics(multiprocess=worker)


def serve_metrics(settings: Settings, metrics: Metrics) -> MetricsServer | None:
    """The endpoint of --metrics-listen, if asked for; ListenError when it cannot listen."""
    if not settings.metrics_listen:
        return None
    try:
        endpoint = MetricsServer.start(settings.metrics_listen, metrics.registry)
    except OSError as exc:
        raise ListenError(
            f"cannot serve metrics on {settings.metrics_listen} ({exc.strerror}; is another "
            "process using it?)"
        ) from exc
    logger.info("metrics on %s", endpoint.url)
    return endpoint


def _readiness(health_servicer: health.aio.HealthServicer) -> Callable[[str | None], None]:
    """Keeps the service's health (readiness) NOT_SERVING while the store takes no writes.

    The overall status "" (liveness) stays SERVING: the process works and recovers on its
    own once the store does, so an orchestrator should stop routing to it, not restart it.
    """
    pending: set[asyncio.Task[None]] = set()

    def changed(problem: str | None) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if problem is None else health_pb2.HealthCheckResponse.NOT_SERVING
        task = asyncio.ensure_future(health_servicer.set(SERVICE_NAME, status))
        pending.add(task)
        task.add_done_callback(pending.discard)

    return changed


def _safe_url(url: str) -> str:
    """The database URL without its password."""
    return make_url(url).render_as_string(hide_password=True)


MEMORY_TRIM_INTERVAL_S = 10.0


async def return_freed_memory(interval: float = MEMORY_TRIM_INTERVAL_S) -> None:
    """Every `interval` seconds, hands the memory the C allocator holds free back to the
    operating system (glibc's malloc_trim; nothing elsewhere).

    gRPC's buffers come from malloc, and glibc keeps what they freed in its heaps: without
    this, the memory of many streams that stalled and left stays in the process's RSS
    though nothing uses it (figures in docs/performance.md). A trim is cheap beside the
    interval.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    while True:
        await asyncio.sleep(interval)
        trim(0)


GC_THRESHOLDS = (10_000, 10, 10)
"""The cyclic garbage collector's thresholds for a serving process (Python's: 700, 10, 10)."""


def tune_garbage_collector() -> None:
    """Makes collections rare and cheap for a long-lived server, once startup is done.

    What startup built (modules, the server, the store) lives as long as the process: it is
    frozen out of the generations and never traversed again. And a busy server always has
    thousands of objects that live for milliseconds, not microseconds (timers, pending
    events, calls in flight): with the default young generation of 700 objects each of
    them is traversed and promoted over and over. With 1,000 runs emitting 10 events/s
    each, a subscriber on each, the server spent 2.0 s collecting over a 12 s run with the
    defaults and 0.14 s with these thresholds, its longest pause still under 40 ms.
    Cyclic garbage waits for at most 10,000 more allocations.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    """Runs the server until SIGINT or SIGTERM, then shuts down in order; returns the exit code.

    `on_ready` is called once the server listens and handles those signals.
    """
    try:
        app = await build(settings)
    except (DatabaseInUseError, AgentLoadError, ListenError, ConfigError, StartupError) as exc:
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
    if on_ready is not None:
        on_ready()
    tune_garbage_collector()
    chores = [asyncio.create_task(return_freed_memory(), name="runservice-memory-trim")]
    await stop.wait()
    for chore in chores:
        chore.cancel()
    logger.info(
        "shutting down: draining runs for up to %.0fs; a second Ctrl-C (SIGINT or SIGTERM) "
        "interrupts them at once",
        settings.drain_timeout,
    )
    await app.stop()
    return 0
