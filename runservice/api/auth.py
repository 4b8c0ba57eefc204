"""Authentication: the interceptor that reads `authorization: Bearer <token>`, and backends.

Every RunService method needs a principal; health checking and reflection stay open, and
methods the server does not know fall through so the server answers UNIMPLEMENTED (grpcurl
relies on that to pick a reflection version). The principal reaches handlers through a
context variable set inside the wrapped handler, so it holds for streaming calls too.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import grpc

from runservice.api import status
from runservice.domain.errors import AuthenticationError, CredentialsMissingError
from runservice.domain.model import Principal

logger = logging.getLogger(__name__)

SERVICE_PREFIX = "/runservice.v1.RunService/"
SHA256_HEX_LEN = 64

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the type stubs

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("runservice_principal")


def current_principal() -> Principal:
    """The authenticated caller of the current RPC (set by AuthInterceptor)."""
    return _principal.get()  # LookupError here is a wiring bug, not a client error


class Authenticator(Protocol):
    """Turns a bearer token into a principal, or raises AuthenticationError."""

    def authenticate(self, token: str) -> Principal:
        """The principal the token stands for."""
        ...


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    principal: Principal


class TokensFileAuthenticator:
    """Tokens from a TOML file of `[[tokens]]` tables (user, sha256, roles).

    The file holds only SHA-256 digests. It is re-read when it changes, so tokens can be
    added or revoked without a restart.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[float, int] | None = None
        self._by_hash: dict[str, _Entry] = {}
        self._warned = False
        self._reload()

    def authenticate(self, token: str) -> Principal:
        """The principal for `token`."""
        self._reload()
        entry = self._by_hash.get(hash_token(token))
        if entry is None:
            raise AuthenticationError("the bearer token is not valid for this server")
        return entry.principal

    def _reload(self) -> None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            if self._stamp is not None or not self._warned:
                logger.warning("tokens file %s does not exist: no token is accepted", self._path)
                self._warned = True
            self._by_hash, self._stamp = {}, None
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._by_hash = load_tokens(self._path)
        except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
            logger.error(
                "tokens file %s not reloaded, keeping the previous tokens: %s", self._path, exc
            )
            return
        logger.info("loaded %d tokens from %s", len(self._by_hash), self._path)


def load_tokens(path: Path) -> dict[str, _Entry]:
    """Token digests → entries; ValueError names the first malformed entry."""
    with path.open("rb") as f:
        doc = tomllib.load(f)
    entries: dict[str, _Entry] = {}
    for i, item in enumerate(doc.get("tokens", [])):
        user, digest, roles = item.get("user"), item.get("sha256"), item.get("roles", [])
        if not isinstance(user, str) or not user:
            raise ValueError(f"{path}: tokens[{i}] needs a non-empty user")
        if not isinstance(digest, str) or len(digest) != SHA256_HEX_LEN:
            raise ValueError(f"{path}: tokens[{i}] needs sha256, a 64-character hex digest")
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ValueError(f"{path}: tokens[{i}].roles must be a list of strings")
        entries[digest.lower()] = _Entry(Principal(user, frozenset(roles)))
    return entries


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str:
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


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every RunService call and maps its errors to statuses."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self._authenticators = list(authenticators)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        try:
            principal = self._authenticate(handler_call_details.invocation_metadata)
        except AuthenticationError as exc:
            return _deny(handler, exc)

        def set_principal() -> None:
            _principal.set(principal)

        return _wrap(handler, set_principal)

    def _authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        token = bearer_token(metadata)
        failure: AuthenticationError | None = None
        for authenticator in self._authenticators:
            try:
                return authenticator.authenticate(token)
            except AuthenticationError as exc:
                failure = failure or exc
        raise failure or AuthenticationError("no authentication backend is configured")


def _wrap(handler: Any, before: Callable[[], None]) -> Handler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            status.wrap_unary(handler.unary_unary, before),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            status.wrap_stream(handler.unary_stream, before),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    wrapped: Handler = handler  # RunService has no client-streaming methods
    return wrapped


def _deny(handler: Any, exc: AuthenticationError) -> Handler:
    def refuse() -> None:
        raise exc

    return _wrap(handler, refuse)
