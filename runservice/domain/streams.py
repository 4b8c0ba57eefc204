"""External runs: runs of the built-in agent `external`, whose events come from producers
outside the server (HTTP appends at `/v1/streams/{path}`, gRPC AppendEvents) instead of an
agent task. The rules of the Durable Streams protocol that are not about HTTP live here:
a stream's record, its expiry, idempotent producers and `Stream-Seq`.

Each external run has one StreamRecord beside its run row. A stream's offsets are its
run's seqs: the run's first event (seq 1, `run.state` RUNNING) and its terminal event
(`run.state` SUCCEEDED when closed) take positions but carry no message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from runservice.domain.errors import (
    ProducerEpochStaleError,
    ProducerSeqGapError,
    StreamSeqConflictError,
)

EXTERNAL_AGENT = "external"
EXTERNAL_DESCRIPTION = (
    "An external run: its events come from producers outside the server (AppendEvents, or "
    "HTTP appends at /v1/streams/{path}), not from a task here; it ends SUCCEEDED when "
    "closed (CloseRun)."
)
MESSAGE = "message"
"""The type of an event appended without one: a JSON message, or a byte stream's append."""
JSON_TYPE = "application/json"
BYTES_TYPE = "application/octet-stream"
MAX_SAFE_INTEGER = 2**53 - 1
"""The largest producer epoch or seq taken (JavaScript's, which the protocol's clients use)."""


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type, lower-cased without parameters; absent: bytes."""
    if not content_type:
        return BYTES_TYPE
    return content_type.split(";", 1)[0].strip().lower() or BYTES_TYPE


def is_json(content_type: str) -> bool:
    """True for streams in JSON mode (messages are JSON values)."""
    return media_type(content_type) == JSON_TYPE


def is_text(content_type: str) -> bool:
    """True for streams whose bytes are text (`text/*`): appends are kept as text when
    they are valid UTF-8."""
    return media_type(content_type).startswith("text/")


@dataclass
class StreamRecord:
    """What an external run has beyond its run row (the `streams` table). Times are
    integer microseconds since the epoch."""

    run_id: str
    owner: str
    path: str  # "" for a run started with StartRun: it has no URL
    content_type: str
    created_us: int
    access_us: int
    ttl_s: int | None = None  # Stream-TTL: expires this long after the last access
    expires_us: int | None = None  # Stream-Expires-At: expires then, whatever happens
    stream_seq: str = ""  # the last Stream-Seq accepted
    fork_of: str = ""  # the run this one was forked from
    fork_seq: int = 0  # ... up to this seq
    fork_sub: int = 0  # ... plus this many bytes or messages of the next append
    deleted: bool = False  # deleted while forks of it lived: only its path is kept
    closed_by: str = ""  # the producer tuple whose append closed it (to answer retries)

    def deadline_us(self) -> int | None:
        """When the stream expires, as of its last access; None: never."""
        if self.expires_us is not None:
            return self.expires_us
        if self.ttl_s is not None:
            return self.access_us + self.ttl_s * 1_000_000
        return None

    def expired(self, now_us: int) -> bool:
        """True once the stream's deadline has passed."""
        deadline = self.deadline_us()
        return deadline is not None and now_us >= deadline

    def touched(self, now_us: int) -> StreamRecord:
        """The record after an access (reads and writes renew a sliding TTL)."""
        return dataclasses.replace(self, access_us=max(self.access_us, now_us))

    @property
    def json_mode(self) -> bool:
        """True when the stream's messages are JSON values."""
        return is_json(self.content_type)


@dataclass(frozen=True)
class ProducerClaim:
    """The idempotent-producer fields of an append."""

    producer_id: str
    epoch: int
    seq: int

    def key(self) -> str:
        """The tuple as one string (what StreamRecord.closed_by keeps)."""
        return f"{self.producer_id}\x00{self.epoch}\x00{self.seq}"


@dataclass(frozen=True)
class ProducerState:
    """A producer's epoch and the highest seq accepted in it."""

    epoch: int
    seq: int


def check_producer(
    claim: ProducerClaim, state: ProducerState | None
) -> Literal["accept", "duplicate"]:
    """Whether an append from `claim` is new ("accept") or a retry of one accepted
    ("duplicate"), given the producer's state; raises the protocol's refusals."""
    if state is None:
        if claim.seq != 0:
            raise ProducerSeqGapError(claim.producer_id, 0, claim.seq, new_epoch=False)
        return "accept"
    if claim.epoch < state.epoch:
        raise ProducerEpochStaleError(claim.producer_id, claim.epoch, state.epoch)
    if claim.epoch > state.epoch:
        if claim.seq != 0:
            raise ProducerSeqGapError(claim.producer_id, 0, claim.seq, new_epoch=True)
        return "accept"
    if claim.seq <= state.seq:
        return "duplicate"
    if claim.seq != state.seq + 1:
        raise ProducerSeqGapError(claim.producer_id, state.seq + 1, claim.seq, new_epoch=False)
    return "accept"


def check_stream_seq(record: StreamRecord, stream_seq: str | None) -> None:
    """`Stream-Seq` must grow, bytewise; StreamSeqConflictError otherwise."""
    if stream_seq is None:
        return
    if record.stream_seq and stream_seq.encode() <= record.stream_seq.encode():
        raise StreamSeqConflictError(stream_seq, record.stream_seq)
