"""The parts of the Durable Streams protocol that are not about runs: offsets, the
sentinels `-1` and `now`, cursors, header names, and the control event of SSE.

An offset names a position between two messages of a stream. Ours have the protocol's
usual shape, two zero-padded 16-digit decimals `RRRRRRRRRRRRRRRR_PPPPPPPPPPPPPPPP`, so
they sort as strings the way they sort as positions: the first is always 0 here, the
second is the number of messages before the position. For a run's log, that is the seq of
the last event before it: `0000000000000000_0000000000000000` is the start, and
`format_offset(7)` the position after event 7 (resume there: Subscribe from_seq 8).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass

from runservice.domain.errors import InvalidArgumentError

NEXT_OFFSET = "Stream-Next-Offset"
UP_TO_DATE = "Stream-Up-To-Date"
CLOSED = "Stream-Closed"
CURSOR = "Stream-Cursor"

START = "-1"
NOW = "now"
_OFFSET = re.compile(r"(\d{1,16})_(\d{1,16})")
_OFFSET_HELP = (
    "must be -1 (the start), now (the tail), or a Stream-Next-Offset this server returned, "
    "like 0000000000000000_0000000000000042"
)


def format_offset(position: int) -> str:
    """The offset of `position` (the number of messages before it)."""
    return f"{0:016d}_{position:016d}"


@dataclass(frozen=True)
class Offset:
    """Where a read starts: a position, or the tail (`now`)."""

    position: int | None  # None: the tail, whatever it is when the read starts

    def at(self, tail: int) -> int:
        """The position, `now` resolved against the stream's current `tail`."""
        return tail if self.position is None else self.position


def parse_offset(text: str, field: str = "offset") -> Offset:
    """An offset a client sent; InvalidArgumentError (naming `field`) if malformed."""
    if text == START:
        return Offset(0)
    if text == NOW:
        return Offset(None)
    match = _OFFSET.fullmatch(text)
    if match is None or int(match.group(1)) != 0:
        raise InvalidArgumentError(field, _OFFSET_HELP)
    return Offset(int(match.group(2)))


def offset_param(values: list[str], *, required: bool) -> Offset:
    """The `offset` query parameter: at most one, not empty; the start when absent, unless
    `required` (the live modes), then InvalidArgumentError."""
    if len(values) > 1:
        raise InvalidArgumentError("offset", "give it once")
    if not values:
        if required:
            raise InvalidArgumentError("offset", "required with live=long-poll and live=sse")
        return Offset(0)
    return parse_offset(values[0])


CURSOR_EPOCH_S = 1728432000.0  # 2024-10-09T00:00:00Z, the protocol's
CURSOR_INTERVAL_S = 20.0
CURSOR_JITTER_S = (1.0, 3600.0)


def next_cursor(client_cursor: str | None, now: float | None = None) -> str:
    """The `Stream-Cursor` of a live response (protocol §8.1): the current 20 s interval
    since the protocol's epoch, or, when the client's cursor is not behind it, a cursor
    strictly greater than the client's (so a CDN never serves one response forever)."""
    now = time.time() if now is None else now
    interval = int((now - CURSOR_EPOCH_S) // CURSOR_INTERVAL_S)
    try:
        echoed = int(client_cursor) if client_cursor else None
    except ValueError:
        echoed = None
    if echoed is None or echoed < interval:
        return str(interval)
    jitter = random.uniform(*CURSOR_JITTER_S)  # spreads cache keys: not a secret
    return str(echoed + max(1, math.ceil(jitter / CURSOR_INTERVAL_S)))


def control(next_offset: str, cursor: str | None, *, up_to_date: bool, closed: bool) -> str:
    """The JSON of an SSE `control` event: flat and on one line, as the suite parses it.
    The final control of a closed stream carries no cursor."""
    fields: dict[str, object] = {"streamNextOffset": next_offset}
    if closed:
        fields["streamClosed"] = True
    elif cursor is not None:
        fields["streamCursor"] = cursor
    if up_to_date:
        fields["upToDate"] = True
    return json.dumps(fields, separators=(",", ":"))
