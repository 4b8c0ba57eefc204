"""Opaque, tamper-evident page tokens for ListRuns (AIP-158).

A token records where the next page starts and a digest of the query it belongs to, and
is signed with the server's secret: a token cannot be forged, edited, or replayed with
another query or by another user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

from runservice.domain.errors import InvalidPageTokenError
from runservice.domain.model import RunFilter, Scope

_SIG_BYTES = 16
MAX_TOKEN_LEN = 1024


def _query_digest(scope: Scope, run_filter: RunFilter) -> str:
    query = {
        "u": scope.user,
        "e": scope.everyone,
        "s": sorted(s.value for s in run_filter.states),
        "a": run_filter.agent,
        "t": run_filter.thread_id,
        "l": sorted(run_filter.labels.items()),
        "w": run_filter.waiting_for_input,
    }
    raw = json.dumps(query, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


class PageTokens:
    """Signs and checks page tokens with a server secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def encode(self, scope: Scope, run_filter: RunFilter, before_run_id: str) -> str:
        """The token for the page after `before_run_id`."""
        body = json.dumps(
            {"b": before_run_id, "q": _query_digest(scope, run_filter)}, separators=(",", ":")
        ).encode()
        sig = hmac.new(self._secret, body, hashlib.sha256).digest()[:_SIG_BYTES]
        return base64.urlsafe_b64encode(sig + body).decode().rstrip("=")

    def decode(self, token: str, scope: Scope, run_filter: RunFilter) -> str:
        """The run id the page starts after; InvalidPageTokenError for any other token."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            sig, body = raw[:_SIG_BYTES], raw[_SIG_BYTES:]
            expected = hmac.new(self._secret, body, hashlib.sha256).digest()[:_SIG_BYTES]
            if len(token) > MAX_TOKEN_LEN or not hmac.compare_digest(sig, expected):
                raise InvalidPageTokenError()
            data = json.loads(body)
            if data["q"] != _query_digest(scope, run_filter) or not isinstance(data["b"], str):
                raise InvalidPageTokenError()
            before: str = data["b"]
        except (ValueError, KeyError, TypeError):
            raise InvalidPageTokenError() from None
        return before
