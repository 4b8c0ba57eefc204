"""Admission policies: caps on active and queued runs, threads, and idempotency keys.

Decisions are made synchronously (no await between the check and the registration), so
on one event loop two concurrent StartRun calls can never both pass a check that only
one of them should.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

from runservice.domain.errors import TooManyActiveRunsError
from runservice.domain.model import StartRequest


@dataclass(frozen=True)
class Limits:
    """Caps on runs; 0 means no cap."""

    max_active: int = 0
    max_active_per_user: int = 0
    max_queued: int = 0
    max_queued_per_user: int = 0

    @property
    def any(self) -> bool:
        """True if any cap is set."""
        return any(
            (self.max_active, self.max_active_per_user, self.max_queued, self.max_queued_per_user)
        )

    @property
    def server_wide(self) -> bool:
        """True if a cap counts every user's runs."""
        return bool(self.max_active or self.max_queued)


class Admission:
    """Counts each user's active and queued runs and refuses past the caps."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._active: Counter[str] = Counter()
        self._queued: Counter[str] = Counter()

    def check(self, owner: str, *, queued: bool) -> None:
        """Raises TooManyActiveRunsError if one more run for `owner` would pass a cap."""
        counts = Counts(
            self._active[owner], self._queued[owner], self._active.total(), self._queued.total()
        )
        check_caps(self._limits, counts, queued=queued)

    def add(self, owner: str, *, queued: bool) -> None:
        """Counts a new run."""
        (self._queued if queued else self._active)[owner] += 1

    def promote(self, owner: str) -> None:
        """A queued run starts: it now counts as active."""
        self._queued[owner] -= 1
        self._active[owner] += 1

    def remove(self, owner: str, *, queued: bool) -> None:
        """A run ended."""
        counter = self._queued if queued else self._active
        counter[owner] -= 1
        if counter[owner] <= 0:
            del counter[owner]

    def active(self, owner: str | None = None) -> int:
        """Active runs of `owner`, or of everyone."""
        return self._active.total() if owner is None else self._active[owner]


@dataclass(frozen=True)
class Counts:
    """A user's active and queued runs, and everyone's."""

    active: int
    queued: int
    all_active: int
    all_queued: int


def check_caps(limits: Limits, counts: Counts, *, queued: bool) -> None:
    """Raises TooManyActiveRunsError if one more run (queued or active) would pass a cap."""
    if queued:
        _cap(
            counts.queued,
            limits.max_queued_per_user,
            "queued runs per user",
            "--max-queued-per-user",
        )
        _cap(counts.all_queued, limits.max_queued, "queued runs on this server", "--max-queued")
    else:
        _cap(
            counts.active,
            limits.max_active_per_user,
            "active runs per user",
            "--max-active-per-user",
        )
        _cap(counts.all_active, limits.max_active, "active runs on this server", "--max-active")


def _cap(current: int, cap: int, what: str, flag: str) -> None:
    if cap and current >= cap:
        raise TooManyActiveRunsError(
            f"the limit of {cap} {what} is reached; wait for a run to end or stop one "
            f"(operators can raise it with {flag})",
            limit=flag.removeprefix("--"),
            cap=str(cap),
        )


def request_fingerprint(request: StartRequest) -> str:
    """A digest of everything a StartRun request asks for except its idempotency key."""
    asked: dict[str, object] = {
        "agent": request.agent,
        "input": request.input,
        "thread_id": request.thread_id,
        "strategy": request.multitask_strategy.value,
        "labels": dict(request.labels),
        "timeout": request.timeout,
    }
    # Only when asked for: a request without one keeps the digest it had before runs had
    # a retention of their own, so its retry across an upgrade is still a retry.
    if request.retention is not None:
        asked["retention"] = request.retention
    if request.webhook_url:  # likewise
        asked["webhook_url"] = request.webhook_url
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_UNITS = ((86400.0, "d"), (3600.0, "h"), (60.0, "m"))


def duration_text(seconds: float) -> str:
    """`seconds` as the server's flags write durations: 90d, 36h, 5m, 1.5s."""
    for size, unit in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.12g}{unit}"
    return f"{seconds:.12g}s"
