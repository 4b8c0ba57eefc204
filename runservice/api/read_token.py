"""Read tokens (CreateReadToken): short-lived JWTs that let their bearer read one run.

A read token is `rsr_` + an HS256 JWT signed with a secret every replica shares (the
database's `read-token` secret, as for page tokens), so any replica honours a token
another minted. Its claims: `sub` (the run's owner), `run_id`, `aud` (READ_AUDIENCE),
`iat`, `exp`. The prefix lets the authenticator tell it at a glance from a tokens-file
token or a --jwt-* JWT: a read token is checked here and nowhere else, and nothing else
is checked here. Only HS256 is accepted and `exp` has no leeway.

What the bearer may do is decided elsewhere, once for both edges: `authenticate`
(api/auth.py) admits a read token's principal to READ_TOKEN_CALLS only, and
RunManager.get_run (which every read of a run passes) to its one run only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import jwt

from runservice.domain.errors import AuthenticationError, InvalidArgumentError, TokenExpiredError
from runservice.domain.model import Principal

PREFIX = "rsr_"
READ_AUDIENCE = "runservice:read"
ALGORITHM = "HS256"
MAX_TOKEN_LEN = 2048
"""Longer bearer strings with the prefix are refused before any parsing."""


class ReadTokens:
    """Mints and checks read tokens with the shared `secret`; `max_ttl` seconds is both
    the default and the longest lifetime (--read-token-ttl)."""

    def __init__(
        self, secret: bytes, max_ttl: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._secret = secret
        self._max_ttl = max_ttl
        self._clock = clock

    def mint(self, owner: str, run_id: str, ttl: float | None = None) -> tuple[str, datetime]:
        """A token reading `run_id` (owned by `owner`) and when it expires. `ttl` None or 0
        means the maximum; InvalidArgumentError (field `ttl`) outside 1s..max."""
        seconds = self._lifetime(ttl)
        now = self._clock()
        expires = math.ceil(now + seconds)
        claims = {
            "sub": owner,
            "run_id": run_id,
            "aud": READ_AUDIENCE,
            "iat": int(now),
            "exp": expires,
        }
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        return PREFIX + token, datetime.fromtimestamp(expires, UTC)

    def _lifetime(self, ttl: float | None) -> float:
        if not ttl:
            return self._max_ttl
        if ttl < 1 or ttl > self._max_ttl:
            raise InvalidArgumentError(
                "ttl", f"must be between 1s and {self._max_ttl:g}s (the server's maximum)"
            )
        return ttl

    @staticmethod
    def recognizes(token: str) -> bool:
        """True for tokens shaped like a read token (the prefix)."""
        return token.startswith(PREFIX)

    def authenticate(self, token: str) -> Principal:
        """The principal restricted to the token's run; TokenExpiredError when it has
        expired, AuthenticationError when it is not one this server signed."""
        if not self.recognizes(token) or len(token) > MAX_TOKEN_LEN:
            raise AuthenticationError("the read token is not valid for this server")
        claims = self._decode(token.removeprefix(PREFIX))
        user, run_id = claims.get("sub"), claims.get("run_id")
        if not isinstance(user, str) or not user or not isinstance(run_id, str) or not run_id:
            raise AuthenticationError("the read token is not valid for this server")
        expires = datetime.fromtimestamp(float(claims["exp"]), UTC)
        return Principal(user, expires_at=expires, read_only_run=run_id)

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=READ_AUDIENCE,
                leeway=0,
                # iat is informative: a replica whose clock is a little behind the minting
                # one must not refuse a fresh token. exp is what bounds it.
                options={"require": ["exp", "aud", "sub"], "verify_iat": False},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpiredError(
                "the read token has expired; ask the backend that gave it for a new one"
            ) from None
        except jwt.InvalidTokenError:
            raise AuthenticationError("the read token is not valid for this server") from None
        return claims


__all__: Sequence[str] = ["PREFIX", "READ_AUDIENCE", "ReadTokens"]
