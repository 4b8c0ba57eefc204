"""The HTTP listener (`--http-listen`): aiohttp on the server's own event loop, calling the
same servicer and manager as the gRPC edge, behind the same authentication.

Every request passes one middleware: it refuses new work while the server drains,
authenticates the caller of any route that exists (api.auth.authenticate, as gRPC does:
the principal reaches the handler through the same context variable), turns whatever a
handler raised into a problem+json answer (problems.py), and counts the request by route
name and status. The routes are those of docs/http.md.
"""

from __future__ import annotations

import http
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from runservice.api.auth import Authentication, authenticate, peer_auth_context
from runservice.api.limits import StreamLimiter
from runservice.api.read_token import ReadTokens
from runservice.api.servicer import RunServiceServicer
from runservice.config import host_port
from runservice.domain.errors import (
    AuthenticationError,
    InvalidArgumentError,
    ServerDrainingError,
)
from runservice.metrics import Metrics
from runservice.runtime.manager import RunManager
from runservice.web import protocol
from runservice.web.events import RunEvents, StreamSettings
from runservice.web.problems import error_response, own_refusal
from runservice.web.runs import RunRoutes
from runservice.web.streams import StreamRoutes

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUN_ID = "{run_id:[^{}/:]+}"  # no ':' so that /v1/runs/{run_id}:stop is a route of its own
STREAMING_ROUTES = frozenset({"RunEventsSSE", "WatchRuns", "StreamSSE"})
UNMATCHED = "Unmatched"
CALLS = {"RunEvents": "Subscribe", "StreamGet": "Subscribe", "StreamHead": "GetRun"}
"""The RunService method a route stands for, where its name is not the method's: what
authentication admits a read token to (api.auth.authenticate)."""
ACCESS_TOKEN = "access_token"
"""The query parameter that may carry a read token (never a user's credentials)."""

CORS_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
CORS_REQUEST_HEADERS = (
    "Authorization, Content-Type, Last-Event-ID, If-None-Match, "
    "Stream-Seq, Stream-TTL, Stream-Expires-At, Stream-Closed, "
    "Producer-Id, Producer-Epoch, Producer-Seq, "
    "Stream-Forked-From, Stream-Fork-Offset, Stream-Fork-Sub-Offset"
)
"""What a page may send: credentials, a JSON body, the resume and revalidation headers of
reads, and the Durable Streams protocol's request headers."""
CORS_EXPOSED = ", ".join(
    (
        protocol.NEXT_OFFSET,
        protocol.UP_TO_DATE,
        protocol.CLOSED,
        protocol.CURSOR,
        "Producer-Epoch",
        "Producer-Seq",
        "Producer-Expected-Seq",
        "Producer-Received-Seq",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-SSE-Data-Encoding",
        "ETag",
        "Location",
        "WWW-Authenticate",
    )
)
CORS_MAX_AGE = "600"  # seconds a browser may reuse a preflight's answer


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of an --http-listen value; config.AddressError if it is not HOST:PORT."""
    return host_port(address, "--http-listen", "127.0.0.1:8080")


@dataclass(frozen=True)
class WebSettings:
    """What the HTTP edge serves, and how."""

    listen: str
    streams: StreamSettings
    max_body: int
    """The largest request body taken (--max-receive-message-size, as for gRPC)."""
    shutdown_grace: float
    """How long handlers may go on when the server stops, as gRPC's calls may."""
    reuse_port: bool = False
    """A worker of --workers shares the port with its peers (SO_REUSEPORT), as for gRPC."""
    ssl_context: ssl.SSLContext | None = None
    cors_origins: tuple[str, ...] = ()
    """Origins whose pages may call this edge (--http-cors-origin; `*`: any)."""


class WebEdge:
    """The HTTP listener: start, stop accepting (drain), close."""

    def __init__(
        self,
        servicer: RunServiceServicer,
        manager: RunManager,
        authentication: Authentication,
        streams: StreamLimiter,
        settings: WebSettings,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._authentication = authentication
        self._settings = settings
        self._metrics = metrics
        self._draining = False
        self._events = RunEvents(manager, streams, settings.streams)
        runs = RunRoutes(servicer, streams, settings.streams)
        self._names: dict[Handler, str] = {}
        app = web.Application(middlewares=[self._edge], client_max_size=settings.max_body)
        self._route(
            app,
            "/v1/runs",
            {"POST": (runs.start_run, "StartRun"), "GET": (runs.list_runs, "ListRuns")},
        )
        self._route(app, "/v1/runs:watch", {"GET": (runs.watch_runs, "WatchRuns")})
        self._route(app, "/v1/agents", {"GET": (runs.list_agents, "ListAgents")})
        self._route(
            app,
            f"/v1/runs/{RUN_ID}",
            {"GET": (runs.get_run, "GetRun"), "DELETE": (runs.delete_run, "DeleteRun")},
        )
        self._route(app, f"/v1/runs/{RUN_ID}:stop", {"POST": (runs.stop_run, "StopRun")})
        self._route(app, f"/v1/runs/{RUN_ID}:input", {"POST": (runs.send_input, "SendInput")})
        self._route(
            app,
            f"/v1/runs/{RUN_ID}:readToken",
            {"POST": (runs.create_read_token, "CreateReadToken")},
        )
        self._route(
            app,
            f"/v1/runs/{RUN_ID}/webhookDeliveries",
            {"GET": (runs.list_webhook_deliveries, "ListWebhookDeliveries")},
        )
        self._route(
            app,
            f"/v1/runs/{RUN_ID}/events",
            {"GET": (self._events.get, "RunEvents"), "HEAD": (self._events.head, "RunEvents")},
        )
        streams_routes = StreamRoutes(manager, streams, settings.streams)
        self._route(
            app,
            "/v1/streams/{path:.+}",
            {
                "PUT": (streams_routes.put, "StreamPut"),
                "POST": (streams_routes.post, "StreamPost"),
                "GET": (streams_routes.get, "StreamGet"),
                "HEAD": (streams_routes.head, "StreamHead"),
                "DELETE": (streams_routes.delete, "StreamDelete"),
            },
        )
        app.on_response_prepare.append(_security_headers)
        self._cors = Cors(settings.cors_origins)
        app.on_response_prepare.append(self._cors.add_headers)
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that leaves cancels its handler, as in gRPC
            access_log=None,
            shutdown_timeout=settings.shutdown_grace,
        )
        self._site: web.TCPSite | None = None
        self.port = 0

    def _route(
        self, app: web.Application, path: str, methods: dict[str, tuple[Handler, str]]
    ) -> None:
        resource = app.router.add_resource(path)
        for method, (handler, name) in methods.items():
            resource.add_route(method, handler)
            self._names[handler] = name

    @property
    def url(self) -> str:
        """The base URL clients use (the host as given, the port as bound)."""
        host, _ = parse_address(self._settings.listen)
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self._settings.ssl_context is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        """Listens; OSError when the address cannot be bound (in use, not this machine's)."""
        host, port = parse_address(self._settings.listen)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            host,
            port,
            ssl_context=self._settings.ssl_context,
            reuse_port=self._settings.reuse_port or None,
        )
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self._site = site
        self.port = int(self._runner.addresses[0][1])

    async def stop_accepting(self) -> None:
        """Drain: the port closes (a worker's peers take its new connections) and requests
        that still come on open connections are refused (503, SERVER_DRAINING); requests
        in flight, SSE streams included, go on."""
        self._draining = True
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def close(self) -> None:
        """Closes every connection: handlers still running (SSE streams of runs that did
        not end) get the shutdown grace, then are cancelled."""
        self._draining = True
        await self._runner.cleanup()

    # -- every request -----------------------------------------------------------------

    @web.middleware
    async def _edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        began = time.perf_counter()
        route = self._name(request)
        status = 499  # the client left (its handler was cancelled)
        try:
            response = await self._answer(request, handler)
            status = response.status
            return response
        finally:
            if self._metrics is not None:
                seconds = time.perf_counter() - began
                streaming = route in STREAMING_ROUTES
                self._metrics.http_handled(route, status, seconds, streaming=streaming)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._draining:
            response = error_response(ServerDrainingError())
            response.force_close()
            return response
        preflight = self._cors.preflight(request)
        if preflight is not None:
            return preflight
        try:
            if request.match_info.http_exception is None:
                route = self._names.get(request.match_info.handler, UNMATCHED)
                authenticate(
                    self._authentication,
                    _metadata(request),
                    _auth_context(request),
                    self._metrics,
                    call=CALLS.get(route, route),
                )
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, too large
            return own_refusal(exc)
        except Exception as exc:
            return error_response(exc)

    def _name(self, request: web.Request) -> str:
        """The request's route name for metrics (bounded: never a path)."""
        name = self._names.get(request.match_info.handler, UNMATCHED)
        if name not in ("RunEvents", "StreamGet") or request.method != "GET":
            return name
        try:
            mode = RunEvents.mode(request)
        except InvalidArgumentError:
            return name
        base = name.removesuffix("Get")
        return {"long-poll": f"{base}LongPoll", "sse": f"{base}SSE"}.get(mode, name)


def _metadata(request: web.Request) -> list[tuple[str, str]]:
    """The request's credentials as gRPC metadata: its Authorization header(s), or a read
    token in `?access_token=`. AuthenticationError for anything else in access_token
    (user credentials never belong in a URL: URLs are logged, kept in histories, sent as
    Referer), or for credentials sent both ways."""
    headers = [("authorization", value) for value in request.headers.getall("Authorization", [])]
    tokens = request.query.getall(ACCESS_TOKEN, [])
    if not tokens:
        return headers
    if headers or len(tokens) > 1:
        raise AuthenticationError(
            "send one credential: a read token either as access_token or in the "
            "Authorization header, not both"
        )
    if not ReadTokens.recognizes(tokens[0]):
        raise AuthenticationError(
            "access_token takes only read tokens (CreateReadToken, POST "
            "/v1/runs/{run_id}:readToken); send your own credentials in the Authorization "
            "header, never in a URL"
        )
    return [("authorization", f"Bearer {tokens[0]}")]


def _auth_context(request: web.Request) -> dict[str, list[bytes]]:
    """What gRPC's auth context would hold for this connection's client certificate."""
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport is not None else None
    return peer_auth_context(peercert)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response: no MIME sniffing (protocol §10.7), and no caching of answers that
    say nothing of their own."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers["Server"] = "runservice"  # not the versions of Python and aiohttp
    if "Cache-Control" not in response.headers and response.status != http.HTTPStatus.NOT_MODIFIED:
        response.headers["Cache-Control"] = "no-store"


class Cors:
    """Cross-origin access for browser pages of the allowed origins (`*`: any): preflights
    answered, responses marked readable. No credentials mode (tokens travel in headers or
    as access_token, never as cookies), so never Access-Control-Allow-Credentials. A
    request from another origin gets no CORS headers, and its browser refuses it."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self._origins = frozenset(origins)
        self._any = "*" in self._origins

    def allowed(self, request: web.Request) -> str | None:
        """The request's Origin when it may read the answer; None otherwise."""
        origin = request.headers.get("Origin")
        if origin is None or not (self._any or origin in self._origins):
            return None
        return origin

    def preflight(self, request: web.Request) -> web.Response | None:
        """The answer to a CORS preflight from an allowed origin; None for any other
        request (a preflight from another origin goes on to the router's own 405)."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        if self.allowed(request) is None:
            return None
        headers = {
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS,
            "Access-Control-Max-Age": CORS_MAX_AGE,
        }
        return web.Response(status=204, headers=headers)

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        """On every response to an allowed origin: who may read it, and which headers."""
        if not self._origins:
            return
        response.headers.add("Vary", "Origin")
        origin = self.allowed(request)
        if origin is None:
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
