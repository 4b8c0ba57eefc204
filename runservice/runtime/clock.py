"""The system clock (tests use a fake one they move)."""

from __future__ import annotations

from datetime import UTC, datetime


class SystemClock:
    """Wall-clock time in UTC."""

    def now(self) -> datetime:
        """The current time."""
        return datetime.now(UTC)
