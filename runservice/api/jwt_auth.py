"""JWT bearer tokens (PyJWT): HS256 with a secret, RS256/ES256 with a PEM key or a JWKS file.

The key is chosen by the token's `alg` within an allowlist, never by the token alone:
HMAC algorithms use only the configured secret and asymmetric ones only public keys, so
`alg: none` and algorithm confusion (an HS256 token "signed" with the RSA public key)
are impossible. `iss`, `aud` and `exp` are required and checked, `nbf` is honoured, with
a leeway. A JWKS file is re-read when it changes, so keys rotate by `kid` without a
restart. Messages say which check failed and never echo the token.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from runservice.domain.errors import AuthenticationError, TokenExpiredError
from runservice.domain.model import Principal

logger = logging.getLogger(__name__)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512"})
_KEY_TYPES = {"RS": "RSA", "ES": "EC"}
JWT_PARTS = 3  # header.payload.signature


@dataclass(frozen=True)
class JwtSettings:
    """How JWTs are checked; at least one key source is required."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    secret: bytes | None = None
    public_key_pem: bytes | None = None
    jwks_file: Path | None = None
    leeway: float = 30.0
    user_claim: str = "sub"
    roles_claim: str = "roles"

    def __post_init__(self) -> None:
        unknown = set(self.algorithms) - HMAC_ALGORITHMS - ASYMMETRIC_ALGORITHMS
        if unknown:
            raise ValueError(f"unsupported JWT algorithms: {', '.join(sorted(unknown))}")
        if not (self.secret or self.public_key_pem or self.jwks_file):
            raise ValueError("JWT needs a secret, a public key or a JWKS file")


class JwtAuthenticator:
    """Authenticates `Bearer <JWT>` tokens."""

    def __init__(self, settings: JwtSettings) -> None:
        self._s = settings
        self._jwks_stamp: tuple[float, int] | None = None
        self._jwks: dict[str, jwt.PyJWK] = {}
        self._jwks_missing_logged = False
        self._reload_jwks()

    def recognizes(self, token: str) -> bool:
        """True for tokens shaped like a JWT (three dot-separated parts)."""
        return len(token.split(".")) == JWT_PARTS

    def authenticate(self, token: str) -> Principal:
        """The principal the JWT names; AuthenticationError saying which check failed."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthenticationError("the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._s.algorithms:
            allowed = ", ".join(self._s.algorithms)
            raise AuthenticationError(f"JWT algorithm {alg!r} is not allowed (allowed: {allowed})")
        key = self._key_for(alg, header.get("kid"))
        claims = self._decode(token, key, alg)
        return self._principal(claims)

    def _key_for(self, alg: str, kid: Any) -> Any:
        if alg in HMAC_ALGORITHMS:
            if not self._s.secret:
                raise AuthenticationError(f"JWT algorithm {alg} is not configured on this server")
            return self._s.secret
        if self._s.jwks_file is not None:
            self._reload_jwks()
            if not isinstance(kid, str) or kid not in self._jwks:
                raise AuthenticationError("the JWT's key id (kid) is not one this server knows")
            jwk = self._jwks[kid]
            if jwk.key_type != _KEY_TYPES[alg[:2]]:
                raise AuthenticationError(f"the key {kid!r} does not match algorithm {alg}")
            return jwk.key
        if self._s.public_key_pem:
            return self._s.public_key_pem
        raise AuthenticationError(f"JWT algorithm {alg} is not configured on this server")

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._s.audience,
                issuer=self._s.issuer,
                leeway=self._s.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpiredError("the JWT has expired; get a new one") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError(
                "the JWT is not valid yet (nbf or iat in the future)"
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("the JWT's issuer (iss) is not accepted here") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("the JWT's audience (aud) is not this service") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"the JWT lacks the required claim {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("the JWT's signature does not verify") from None
        except (jwt.InvalidKeyError, jwt.InvalidAlgorithmError):
            raise AuthenticationError(f"the JWT cannot be verified with algorithm {alg}") from None
        except jwt.InvalidTokenError:
            raise AuthenticationError("the token is not a valid JWT") from None
        return claims

    def _principal(self, claims: dict[str, Any]) -> Principal:
        user = claims.get(self._s.user_claim)
        if not isinstance(user, str) or not user:
            raise AuthenticationError(f"the JWT lacks a user claim ({self._s.user_claim!r})")
        roles = claims.get(self._s.roles_claim, [])
        if isinstance(roles, str):
            roles = roles.split()
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthenticationError(f"the JWT's {self._s.roles_claim!r} claim is not a list")
        expires = datetime.fromtimestamp(float(claims["exp"]) + self._s.leeway, UTC)
        return Principal(user, frozenset(roles), expires_at=expires)

    def _reload_jwks(self) -> None:
        path = self._s.jwks_file
        if path is None:
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if not self._jwks_missing_logged:  # once, not on every call
                logger.error("JWKS file %s does not exist: no JWT is accepted", path)
                self._jwks_missing_logged = True
            self._jwks, self._jwks_stamp = {}, None
            return
        self._jwks_missing_logged = False
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._jwks_stamp:
            return
        self._jwks_stamp = stamp
        try:
            keys = jwt.PyJWKSet.from_dict(json.loads(path.read_text())).keys
        except (OSError, ValueError, jwt.PyJWKSetError) as exc:
            logger.error("JWKS file %s not reloaded, keeping the previous keys: %s", path, exc)
            return
        self._jwks = {k.key_id: k for k in keys if k.key_id}
        logger.info("loaded %d keys from %s", len(self._jwks), path)


def parse_algorithms(text: str) -> tuple[str, ...]:
    """`RS256,ES256` → ("RS256", "ES256")."""
    return tuple(a.strip().upper() for a in text.split(",") if a.strip())


__all__: Sequence[str] = ["JwtAuthenticator", "JwtSettings", "parse_algorithms"]
