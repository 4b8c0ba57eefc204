"""Authentication: the handler wrapper that reads `authorization: Bearer <token>` (or the
client certificate), and the backends.

Every RunService method needs a principal; health checking and reflection stay open, and
methods the server does not know are not wrapped, so the server answers UNIMPLEMENTED
(grpcurl relies on that to pick a reflection version). The principal reaches handlers
through a context variable set inside the wrapped handler, so it holds for streaming
calls too.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeAlias, cast

import grpc

from runservice.api import status
from runservice.api.limits import StreamLimiter
from runservice.api.read_token import ReadTokens
from runservice.domain.errors import (
    AuthenticationError,
    CredentialsMissingError,
    ReadTokenScopeError,
)
from runservice.domain.model import READ_TOKEN_CALLS, Principal
from runservice.metrics import Metrics
from runservice.tokens import TokensFileError, hash_token, load_tokens

logger = logging.getLogger(__name__)


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the type stubs

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("runservice_principal")


def current_principal() -> Principal:
    """The authenticated caller of the current RPC (set before its handler runs)."""
    return _principal.get()  # LookupError here is a wiring bug, not a client error


class Authenticator(Protocol):
    """Turns a bearer token into a principal, or raises AuthenticationError."""

    def authenticate(self, token: str) -> Principal:
        """The principal the token stands for."""
        ...


class TokensFileAuthenticator:
    """Tokens from a TOML file of `[[tokens]]` tables (user, sha256, roles).

    The file holds only SHA-256 digests. It is re-read when it changes, so tokens can be
    added or revoked without a restart; a change that makes it invalid is logged as an
    error and the previous tokens stay in force.
    """

    def __init__(self, path: Path) -> None:
        """Reads the file now: TokensFileError if it exists and is not valid (a missing file
        means no tokens)."""
        self._path = path
        self._stamp: tuple[float, int] | None = None
        self._by_hash: dict[str, Principal] = {}
        self._warned = False
        self._reload(strict=True)

    def recognizes(self, token: str) -> bool:
        """Any token may be in the file; asked first for tokens that are not JWT-shaped."""
        return True

    def authenticate(self, token: str) -> Principal:
        """The principal for `token`."""
        self._reload()
        principal = self._by_hash.get(hash_token(token))
        if principal is None:
            raise AuthenticationError("the bearer token is not valid for this server")
        return principal

    def _reload(self, *, strict: bool = False) -> None:
        """Re-reads the file if it changed. An invalid file raises TokensFileError when
        `strict`; otherwise it is logged and the previous tokens are kept."""
        try:
            self._reload_if_changed()
        except TokensFileError as exc:
            if strict:
                raise
            logger.error("tokens file not reloaded, keeping the previous tokens: %s", exc)

    def _reload_if_changed(self) -> None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            if self._stamp is not None or not self._warned:
                logger.warning(
                    "tokens file %s does not exist: no token is accepted until it is created "
                    "(`runservice tokens add`)",
                    self._path,
                )
                self._warned = True
            self._by_hash, self._stamp = {}, None
            return
        except OSError as exc:
            raise TokensFileError(f"cannot read {self._path}: {exc.strerror}") from exc
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp  # an invalid file is reported once, not on every call
        self._by_hash = load_tokens(self._path)
        logger.info("loaded %d tokens from %s", len(self._by_hash), self._path)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The bearer token in `metadata`; CredentialsMissingError when there is none."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError("the authorization metadata must read 'Bearer <token>'")
            return token.strip()
    raise CredentialsMissingError(
        "this call needs credentials: send metadata 'authorization: Bearer <token>'"
    )


class MtlsIdentity:
    """The verified client certificate's identity (its CN, or its first SAN) as the user.

    Only meaningful on a server that requires client certificates from a trusted CA:
    gRPC has verified the chain during the handshake.
    """

    def __init__(self, field: str = "cn") -> None:
        if field not in ("cn", "san"):
            raise ValueError("the mTLS identity is taken from 'cn' or 'san'")
        self._key = "x509_common_name" if field == "cn" else "x509_subject_alternative_name"

    def identify(self, auth_context: Mapping[str, Sequence[bytes]]) -> Principal | None:
        """The principal of the peer's certificate, or None without one."""
        values = auth_context.get(self._key) or ()
        for value in values:
            user = value.decode(errors="replace").strip()
            if user:
                return Principal(user)
        return None


class Authentication:
    """Who the caller of one RPC is: bearer backends first, then the client certificate.

    The first backend that authenticates wins. With `anonymous` (--insecure-no-auth), a
    call with no credentials is the user `anonymous`. A read token (`rsr_...`) is checked
    by `read_tokens` alone, never by the other backends, and never gains a role.
    """

    def __init__(
        self,
        bearer: Sequence[Authenticator],
        mtls: MtlsIdentity | None = None,
        *,
        admins: frozenset[str] = frozenset(),
        anonymous: bool = False,
    ) -> None:
        self._bearer = list(bearer)
        self._mtls = mtls
        self._admins = admins
        self._anonymous = anonymous
        self._read_tokens: ReadTokens | None = None

    def use_read_tokens(self, read_tokens: ReadTokens) -> None:
        """Accepts read tokens from now on (their key comes from the store, opened after
        the authentication is built)."""
        self._read_tokens = read_tokens

    def principal(
        self, metadata: Iterable[tuple[str, Any]] | None, auth_context: Mapping[str, Any]
    ) -> Principal:
        """The caller; AuthenticationError (saying what failed) when there is none."""
        principal = self._identify(metadata, auth_context)
        if principal.read_only_run is not None:
            return principal
        if principal.user in self._admins and not principal.is_admin:
            principal = replace(principal, roles=principal.roles | {"admin"})
        return principal

    def _identify(
        self, metadata: Iterable[tuple[str, Any]] | None, auth_context: Mapping[str, Any]
    ) -> Principal:
        if _has_authorization(metadata):
            return self._from_token(bearer_token(metadata))
        if self._mtls is not None:
            found = self._mtls.identify(auth_context)
            if found is not None:
                return found
        if self._anonymous:
            return Principal("anonymous")
        return self._from_token(bearer_token(metadata))  # raises CredentialsMissingError

    def _from_token(self, token: str) -> Principal:
        if ReadTokens.recognizes(token):
            if self._read_tokens is None:
                raise AuthenticationError("this server does not take read tokens")
            return self._read_tokens.authenticate(token)
        failure: AuthenticationError | None = None
        for authenticator in sorted(self._bearer, key=lambda a: not _recognizes(a, token)):
            try:
                return authenticator.authenticate(token)
            except AuthenticationError as exc:
                failure = failure or exc
        raise failure or AuthenticationError("no token authentication is configured")


def _recognizes(authenticator: Authenticator, token: str) -> bool:
    recognizes = getattr(authenticator, "recognizes", None)
    return bool(recognizes(token)) if recognizes is not None else False


def _has_authorization(metadata: Iterable[tuple[str, Any]] | None) -> bool:
    return any(key == "authorization" for key, _ in metadata or ())


def authenticate(
    authentication: Authentication,
    metadata: Iterable[tuple[str, Any]] | None,
    auth_context: Mapping[str, Any],
    metrics: Metrics | None = None,
    *,
    call: str,
) -> Principal:
    """The caller of `call` (a RunService method name; the HTTP edge names the method its
    route stands for), on either edge, made the principal that `current_principal()`
    returns for the rest of the call's task.

    Raises AuthenticationError, counted in `metrics` by reason, when there is none; and
    ReadTokenScopeError when the caller holds a read token and `call` is not one of
    READ_TOKEN_CALLS (the one place that rule is enforced; which run it reads is
    RunManager.get_run's to check).
    """
    try:
        principal = authentication.principal(metadata, auth_context)
    except AuthenticationError as exc:
        if metrics is not None:
            metrics.auth_refused(exc.reason)
        raise
    if principal.read_only_run is not None and call not in READ_TOKEN_CALLS:
        raise ReadTokenScopeError(call)
    _principal.set(principal)
    return principal


_SAN_KINDS = ("DNS", "email", "URI", "IP Address")
"""The subject alternative names gRPC puts in `x509_subject_alternative_name`."""


def peer_auth_context(peercert: Mapping[str, Any] | None) -> dict[str, list[bytes]]:
    """The auth context gRPC gives a call over a verified client certificate, made from
    the certificate as Python's ssl module decodes it (SSLSocket.getpeercert()): the keys
    MtlsIdentity reads, so both edges name the same user. Empty without a certificate."""
    if not peercert:
        return {}
    common_names = [
        value.encode()
        for rdn in peercert.get("subject", ())
        for name, value in rdn
        if name == "commonName"
    ]
    alternative = [
        value.encode() for kind, value in peercert.get("subjectAltName", ()) if kind in _SAN_KINDS
    ]
    context = {"transport_security_type": [b"ssl"]}
    if common_names:
        context["x509_common_name"] = common_names[:1]
    if alternative:
        context["x509_subject_alternative_name"] = alternative
    return context


def add_authenticated_service(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    authentication: Authentication,
    streams: StreamLimiter,
    *,
    stall_timeout: float,
    metrics: Metrics | None = None,
) -> None:
    """Registers a service whose every method authenticates first and maps its errors.

    `add_to_server` is the generated `add_<Service>Servicer_to_server`. Its handlers are
    wrapped once, here, rather than per call by an interceptor. The check runs inside the
    handler, where the peer's TLS identity is known, so it covers bearer tokens and client
    certificates alike. With `metrics`, each call is counted by method and status code,
    timed, and each refusal at authentication counted by reason.
    """

    def preparer(call: str) -> status.Prepare:
        def prepare(context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
            metadata, auth_context = context.invocation_metadata(), context.auth_context()
            return authenticate(authentication, metadata, auth_context, metrics, call=call)

        return prepare

    captured = _Registration()
    add_to_server(servicer, captured)
    handlers = {
        name: _wrap(h, preparer(name), streams, stall_timeout)
        for name, h in captured.handlers.items()
    }
    if metrics is not None:
        handlers = {name: _measured(name, h, metrics) for name, h in handlers.items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(captured.service, handlers),)
    )
    server.add_registered_method_handlers(captured.service, handlers)


class _Registration:
    """Stands in for the server in a generated add_*_to_server call: keeps its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        """Ignored: the same handlers come by name to add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        """Keeps the service's handlers by method name."""
        self.service = service
        self.handlers = dict(handlers)


def _wrap(
    handler: Any, prepare: status.Prepare, streams: StreamLimiter, stall_timeout: float
) -> Handler:
    deserialize = status.lenient(handler.request_deserializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            status.wrap_unary(handler.unary_unary, prepare),
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            status.wrap_stream(handler.unary_stream, prepare, streams, stall_timeout),
            request_deserializer=deserialize,
            response_serializer=_bytes_or(handler.response_serializer),
        )
    wrapped: Handler = handler  # RunService has no client-streaming methods
    return wrapped


Behavior = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[Any]]


def _measured(method: str, handler: Any, metrics: Metrics) -> Handler:
    """`handler` (a wrapped one: its behaviours are coroutines, streams write their own
    responses) counted and timed by `metrics`."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _timed(method, handler.unary_unary, metrics, streaming=False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is None:  # RunService has no client-streaming methods
        measured: Handler = handler
        return measured
    return grpc.unary_stream_rpc_method_handler(
        _timed(method, handler.unary_stream, metrics, streaming=True),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _timed(method: str, behavior: Behavior, metrics: Metrics, *, streaming: bool) -> Behavior:
    """`behavior`, recording its status code and duration when it ends: the code it set
    or aborted with (OK by default), CANCELLED when the call was cancelled (the client left,
    or the server stopped)."""

    async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        began = time.perf_counter()
        code: grpc.StatusCode | None = None
        try:
            return await behavior(request, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:  # the status wrapper maps every error: a bug if one gets here
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            # The stubs promise a code; grpc.aio gives None while the handler set none.
            code = code or cast("grpc.StatusCode | None", context.code()) or grpc.StatusCode.OK
            metrics.rpc_handled(method, code.name, time.perf_counter() - began, streaming=streaming)

    return timed


def _bytes_or(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A serializer that passes already-serialized responses (bytes) through."""

    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serializer(message)

    return serialize
