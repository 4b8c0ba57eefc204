"""Per-user caps on open streams (Subscribe, WatchRuns)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from runservice.domain.errors import TooManyStreamsError


class StreamLimiter:
    """Counts each user's open streams; refuses one past `per_user` (0: no cap)."""

    def __init__(self, per_user: int) -> None:
        self._per_user = per_user
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, user: str) -> Iterator[None]:
        """Holds one of `user`'s stream slots for the duration of the block."""
        if self._per_user and self._open[user] >= self._per_user:
            raise TooManyStreamsError(
                f"you have {self._open[user]} open streams, the most this server allows per "
                "user; close some (operators can raise --max-streams-per-user)",
                limit="max-streams-per-user",
                cap=str(self._per_user),
            )
        self._open[user] += 1
        try:
            yield
        finally:
            self._open[user] -= 1
            if self._open[user] <= 0:
                del self._open[user]
