"""Snapshots of a run's output, made as the run goes (never by folding its log on demand).

A snapshot is the accumulated state of a run's output as of one seq: what a client would
have after applying every event up to it. It is stored beside the log (Writer.put_beside,
in the transaction of the events it covers) and takes no seq of its own; Subscribe with
`snapshot` sends the latest committed one, then the events after its seq.

The state comes from one of two makers:

- the built-in reducer, for agents that emit nothing but `token` events with text (the
  built-in `echo` among them): `{"text": <the text of every token so far, concatenated>}`.
  Its first event of another kind (or a `token` without text) ends it for the run: a
  snapshot stands for every event up to its seq, and `{"text"}` cannot stand for others.
  The last one it made stays valid (it covers only tokens); none is made after it.
- the agent, with `ctx.snapshot(data)`: from its first call on, the agent's latest data is
  the state, as of the agent's last event at the call, and the reducer makes none.

A snapshot is made every `every` events or `max_bytes` bytes of events (encoded) since
the last one, whichever first, when the state changed since; and at the run's end
(`final`). An agent's data that arrives once a snapshot is due is made at once; one that
arrives before waits for the next due point, or the end. A state larger than `max_data`
bytes (as JSON) is never made: the reducer stops there (its text only grows), an agent's
data is refused by ctx.snapshot.

`observe` runs on every event an agent emits, so it costs a few comparisons and, for a
token, one list append: the text is joined and encoded as JSON only when a snapshot is made.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from runservice.domain.model import RunEvent, Snapshot

TOKEN_EVENT = "token"
"""The `type` of the events the built-in reducer concatenates the text of."""

SNAPSHOT_EVERY = 1000
"""The default of --snapshot-every: events between two snapshots of a run, at most."""

SNAPSHOT_BYTES = 256 * 1024
"""Bytes of events (encoded) between two snapshots of a run, at most."""

MAX_DATA_BYTES = 1024 * 1024
"""The default of the largest snapshot made (as JSON): the server's --max-event-size."""


def encode_data(data: Any) -> str:
    """`data` (any JSON value) as compact JSON text; TypeError or ValueError if it is not
    one (a set, an arbitrary Python object, NaN or an infinity)."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Snapshots:
    """One run's snapshot maker: the state of its output, when to make a snapshot of it,
    and the latest snapshot committed."""

    def __init__(
        self,
        run_id: str,
        *,
        every: int = SNAPSHOT_EVERY,
        max_bytes: int = SNAPSHOT_BYTES,
        max_data: int = MAX_DATA_BYTES,
    ) -> None:
        if every < 1 or max_bytes < 1:
            raise ValueError(f"snapshots need every >= 1 and max_bytes >= 1 ({every}, {max_bytes})")
        self._run_id = run_id
        self._every = every
        self._max_bytes = max_bytes
        self._max_data = max_data
        self._reducing = True  # every event so far was a token with text
        self._parts: list[str] = []  # the reducer's texts, joined when a snapshot is made
        self._agent: str | None = None  # the agent's latest data (JSON), once it gave any
        self._seq = 0  # the seq the state covers
        self.seen = 0
        """The seq of the last event observed (0: none yet)."""
        self._fresh = False  # the state changed since the last snapshot made
        self._events = 0  # since the last snapshot made
        self._bytes = 0
        self.latest: Snapshot | None = None
        """The latest snapshot committed (what Subscribe may start from), if any."""

    @property
    def agent_made(self) -> bool:
        """True once the agent has recorded a state of its own (ctx.snapshot)."""
        return self._agent is not None

    def observe(self, event: RunEvent) -> Snapshot | None:
        """Takes in an event the agent emitted (queued for commit, its seq assigned, in
        seq order); returns a snapshot to store when one is due."""
        self.seen = event.seq
        if self._reducing:
            if event.type == TOKEN_EVENT and event.text is not None:
                self._parts.append(event.text)
                self._seq = event.seq
                self._fresh = True
            else:
                self._stop_reducing()
        self._events += 1
        if event.wire is not None:
            self._bytes += len(event.wire)
        if self._events < self._every and self._bytes < self._max_bytes:
            return None
        return self._make()

    def record(self, seq: int, data: str) -> Snapshot | None:
        """Takes in the agent's own state (JSON text, at most `max_data` bytes) as of
        `seq`; from now on the agent's data is the run's state and the reducer makes
        none. Returns a snapshot to store when one is due."""
        self._stop_reducing()
        self._agent, self._seq, self._fresh = data, seq, True
        if self._events < self._every and self._bytes < self._max_bytes:
            return None
        return self._make()

    def final(self) -> Snapshot | None:
        """The snapshot to store at the run's end (before its terminal event), if the state
        changed since the last one made."""
        return self._make()

    def state(self) -> str:
        """The current state as JSON text (the data of the next snapshot), or "" for none."""
        if self._agent is not None:
            return self._agent
        if not self._parts:
            return ""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]  # joined once: the next join starts here
        return encode_data({"text": self._parts[0]})

    def restore(self, seq: int, state: str) -> None:
        """Goes on from `state` (what `state()` returned) as of `seq`, as if a snapshot of
        it had just been made: `{"text": <str>}` is taken as the reducer's, which later
        tokens extend; any other value as the agent's; "" as no state (the reducer starts
        afresh). The committed `latest` is left as it is. ValueError if `state` is not
        JSON."""
        text = _reducer_text(json.loads(state)) if state else None
        self._agent = state if state and text is None else None
        self._reducing = self._agent is None
        self._parts = [text] if text is not None else []
        self._seq = seq
        self._fresh = False
        self._events = self._bytes = 0

    def committed(self, snapshot: Snapshot, done: asyncio.Future[None]) -> None:
        """The done-callback of a snapshot's put_beside: once committed, it is the latest
        (unless a later one already is); a snapshot the store refused is dropped."""
        if done.cancelled() or done.exception() is not None:
            return
        if self.latest is None or snapshot.seq >= self.latest.seq:
            self.latest = snapshot

    def _make(self) -> Snapshot | None:
        """A snapshot of the state if it changed since the last one; else None, and the
        counts go on (an agent's next data is then made at once)."""
        if not self._fresh:
            return None
        data = self.state()
        self._fresh = False
        self._events = self._bytes = 0
        if len(data.encode()) > self._max_data:  # only the reducer's text gets here
            self._stop_reducing()
            return None
        return Snapshot(self._run_id, self._seq, data)

    def _stop_reducing(self) -> None:
        if self._reducing:
            self._reducing = False
            self._parts = []
            self._fresh = self._agent is not None and self._fresh


def _reducer_text(value: Any) -> str | None:
    """The text of a state of the reducer's shape, `{"text": <str>}`; None for another."""
    if isinstance(value, dict) and value.keys() == {"text"} and isinstance(value["text"], str):
        text: str = value["text"]
        return text
    return None
