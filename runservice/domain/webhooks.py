"""Completion webhooks: the deliveries a run's end makes, and which URLs a run may name.

A run that ends is sent, by POST, to the deployment's webhook (`--webhook-url`) and to the
URL its StartRun named, if any. Each is a delivery stored in the same transaction as the
run's terminal state, then attempted until a receiver answers 2xx or `--webhook-max-age`
has passed since it was stored (runservice/webhooks sends them).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol
from urllib.parse import SplitResult, urlsplit

from runservice.domain.errors import InvalidArgumentError, WebhookUrlNotAllowedError

MAX_URL_CHARS = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}


class DeliveryState(enum.StrEnum):
    """Where a delivery stands; values match the proto names without the prefix."""

    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


class WebhookTarget(enum.StrEnum):
    """Whose webhook a delivery is for: the deployment's (--webhook-url) or the run's own."""

    DEPLOYMENT = "DEPLOYMENT"
    RUN = "RUN"


AttemptOutcome = Literal["delivered", "retrying", "gave_up"]
"""What an attempt led to: the delivery is done, another attempt is scheduled, or it failed
for good (its max age passed)."""


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """One POST of a delivery. `status` is the HTTP status (None: no answer); `error` says
    why it failed in words safe to show its owner ("" when it succeeded)."""

    attempt: int
    at: datetime
    duration: float
    status: int | None
    error: str


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """A run's end, to be POSTed to one URL; `delivery_id` is the `webhook-id` header."""

    delivery_id: str
    run_id: str
    target: WebhookTarget
    url: str
    state: DeliveryState
    created_at: datetime
    next_attempt_at: datetime | None
    ended_at: datetime | None
    attempts: Sequence[WebhookAttempt] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class DueDelivery:
    """A delivery claimed for one attempt, numbered `attempt`; `created_us` is when it was
    stored (microseconds since the epoch), which its max age counts from."""

    delivery_id: str
    run_id: str
    url: str
    body: bytes
    created_us: int
    attempt: int


def delivery_id(run_id: str, target: WebhookTarget) -> str:
    """The `webhook-id` of a run's delivery to `target`: the same for every attempt, and
    for the same end committed twice (so it is stored once)."""
    return f"msg_{run_id}_{target.value.lower()}"


class WebhookLog(Protocol):
    """The deliveries as stored, for ListWebhookDeliveries."""

    async def deliveries(self, run_id: str) -> list[WebhookDelivery]:
        """The run's deliveries with their attempts (the caller checked it may see them)."""
        ...


def check_url(url: str, field_name: str) -> SplitResult:
    """`url` split, when it is an absolute http or https URL with a host and neither
    credentials nor a fragment; InvalidArgumentError naming `field_name` otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidArgumentError(field_name, f"must be at most {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):  # noqa: PLR2004
        raise InvalidArgumentError(field_name, "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidArgumentError(field_name, "is not a URL") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InvalidArgumentError(
            field_name, "must be an http or https URL with a host, like https://example.com/hook"
        )
    if parts.username is not None or parts.password is not None or parts.fragment:
        raise InvalidArgumentError(field_name, "must carry neither credentials nor a #fragment")
    del port  # only parsed, so that a bad port is refused here
    return parts


@dataclass(frozen=True)
class WebhookPolicy:
    """Which URLs a run may name as its own webhook: those under one of `allow`'s prefixes.

    A prefix matches a URL of the same scheme, host and port (80 and 443 are the same as
    no port) whose path starts with the prefix's path; a prefix with no path allows the
    whole host. Comparing the parts rather than the text keeps `https://hooks.example.com`
    from allowing `https://hooks.example.com.attacker.net/`.
    """

    allow: tuple[str, ...] = ()

    def check(self, url: str) -> None:
        """Nothing for "" (no webhook) or an allowed URL; InvalidArgumentError for a
        malformed one, WebhookUrlNotAllowedError for one outside every prefix."""
        if not url:
            return
        parts = check_url(url, "webhook_url")
        if not any(_under(parts, urlsplit(prefix)) for prefix in self.allow):
            raise WebhookUrlNotAllowedError(url, self.allow)


def _under(url: SplitResult, prefix: SplitResult) -> bool:
    if (url.scheme, _host(url)) != (prefix.scheme, _host(prefix)):
        return False
    base = prefix.path or "/"
    path = url.path or "/"
    if not path.startswith(base):
        return False
    # A prefix path that does not end with "/" matches whole segments only: /hooks allows
    # /hooks and /hooks/x, not /hooksx.
    return base.endswith("/") or len(path) == len(base) or path[len(base)] == "/"


def _host(parts: SplitResult) -> tuple[str, int]:
    return (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
