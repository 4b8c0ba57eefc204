"""What the runtime needs from the world: a store for runs and events, and a clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Literal, Protocol, TypeVar

from runservice.domain.model import (
    Beside,
    Checkpoint,
    EncodedEvent,
    PendingInput,
    Run,
    RunEvent,
    RunFilter,
    Scope,
    Snapshot,
)
from runservice.domain.streams import ProducerState, StreamRecord

T = TypeVar("T")

EventEncoder = Callable[[RunEvent], bytes]
"""Encodes an event for the wire (the API layer supplies it; the rest treat it as bytes)."""

EventDecoder = Callable[[bytes], RunEvent]
"""Decodes what an EventEncoder made back into the event (with `wire` set to the bytes)."""


class Clock(Protocol):
    """Tells the time; tests move a fake one instead of sleeping."""

    def now(self) -> datetime:
        """The current time, an aware UTC datetime."""
        ...


class RunStore(Protocol):
    """Durable runs and event logs. Every run query is scoped to an owner."""

    async def migrate(self) -> None:
        """Brings the schema up to date; safe to call on every start."""
        ...

    async def commit(
        self,
        new_runs: Sequence[Run],
        events: Sequence[RunEvent],
        updated_runs: Sequence[Run],
        beside: Sequence[Beside] = (),
    ) -> frozenset[str] | None:
        """Commits new runs, appended events, updated run rows and what is stored beside
        their logs (input receipts, snapshots, checkpoints) in one transaction.

        Returns the runs it left out because this server's lease on them is gone (fenced
        by another replica, see runtime/cluster.py): nothing of them was written. A store
        with no replicas returns an empty set (or None).

        One attempt: StoreUnavailableError when the store cannot take it now (the caller
        retries), StoreError when it refuses this data for good.

        A run row's `last_seq` is stored as the row gives it: the runtime sets it with each
        state change, so the stored value is exact for finished runs and, for a live
        run, as of its last state change (live runs are served from memory, and
        `unfinished_runs` reads the true end of each log).
        """
        ...

    async def shared_secret(self, name: str, proposed: bytes) -> bytes:
        """The secret `name` shared by every server of the database: the one stored, or
        `proposed`, stored now, when there is none."""
        ...

    async def probe(self) -> None:
        """Writes and commits a little, as a check that the store takes writes again.

        Raises StoreUnavailableError while it does not.
        """
        ...

    async def get_run(self, scope: Scope, run_id: str) -> Run | None:
        """The run, or None when it does not exist or `scope` may not see it."""
        ...

    async def list_runs(
        self, scope: Scope, run_filter: RunFilter, before_run_id: str | None, limit: int
    ) -> list[Run]:
        """Up to `limit` runs newest first, with ids below `before_run_id` when given."""
        ...

    async def read_events(self, run_id: str, from_seq: int, limit: int) -> list[RunEvent]:
        """Up to `limit` events of the run with `seq >= from_seq`, in order.

        Callers have checked the run's visibility already.
        """
        ...

    async def read_encoded(self, run_id: str, from_seq: int, limit: int) -> list[EncodedEvent]:
        """Like read_events, but only each event's seq, wire form and terminal flag."""
        ...

    async def delete_run(self, scope: Scope, run_id: str) -> bool:
        """Deletes a run and its events; False when it is not there for `scope`."""
        ...

    async def find_by_request_id(self, scope: Scope, request_id: str) -> Run | None:
        """The scope's user's run started with `request_id`, if any."""
        ...

    async def purge_expired(self, now: datetime, default_retention: float, limit: int) -> list[str]:
        """Deletes up to `limit` finished runs whose retention ended by `now` (their own,
        else `default_retention` seconds after their end), with their logs; returns their
        ids."""
        ...

    async def offer_input(
        self, run_id: str, request_id: str, digest: str, body: str, at_us: int
    ) -> tuple[str, int | None] | None:
        """Records SendInput's input for an active run unless `request_id` is there:
        the request's (digest, seq of its `input` event or None while not appended), or
        None when the run is not active and never took `request_id`."""
        ...

    async def input_receipt(self, run_id: str, request_id: str) -> tuple[str, int | None]:
        """(digest, seq or None) of an offered input; KeyError if there is none."""
        ...

    async def pending_inputs(self, run_id: str) -> list[PendingInput]:
        """The run's offered inputs not yet appended, in the order they were offered."""
        ...

    async def input_events(self, run_id: str) -> list[RunEvent]:
        """The run's `input` events, in log order."""
        ...

    async def latest_snapshot(self, run_id: str) -> Snapshot | None:
        """The run's latest snapshot, if any."""
        ...

    async def latest_checkpoint(self, run_id: str) -> Checkpoint | None:
        """The run's latest checkpoint, if any."""
        ...

    async def unfinished_runs(self) -> list[Run]:
        """Every run not in a terminal state, for reconciliation at start (all owners)."""
        ...

    async def close(self) -> None:
        """Releases connections."""
        ...


StoreRetryKind = Literal["locked", "unavailable"]
"""Why a commit is retried: another process's lock, or a store unreachable, full or failing."""
StoreErrorKind = Literal["refused", "abandoned"]
"""Work given up: refused for good, or left uncommitted by a shutdown."""
LeaseRenewal = Literal["on_time", "late", "lost", "failed"]
"""How a lease renewal went (lost: a peer had ended the lease; failed: no answer)."""
OrphanCause = Literal["startup", "lease_expired"]
"""Why runs with nobody executing them were ended INTERRUPTED."""


class RunMetrics(Protocol):
    """What the runtime counts as it goes (runservice/metrics.py exports it to Prometheus)."""

    def run_started(self, agent: str) -> None:
        """A run's row was committed (a StartRun that created a run)."""
        ...

    def run_finished(self, agent: str, state: str) -> None:
        """A run executed here committed its terminal state."""
        ...

    def orphans_interrupted(self, cause: OrphanCause, runs: int) -> None:
        """`runs` orphaned runs were ended INTERRUPTED, each with its terminal event."""
        ...

    def events_committed(self, events: int) -> None:
        """Events committed outside the writer (a start decided in the database)."""
        ...

    def committed(self, events: int, seconds: float) -> None:
        """The writer committed a transaction of `events` events in `seconds`."""
        ...

    def store_retry(self, kind: StoreRetryKind) -> None:
        """A commit failed as unavailable and will be retried."""
        ...

    def store_error(self, kind: StoreErrorKind) -> None:
        """Work the store did not take was given up."""
        ...

    def fenced(self, runs: int) -> None:
        """A commit left out `runs` runs whose lease is gone."""
        ...

    def lease_renewal(self, outcome: LeaseRenewal) -> None:
        """This replica tried to renew its lease."""
        ...

    def lease_lost(self) -> None:
        """Another replica ended this replica's lease."""
        ...

    def leases_taken_over(self, leases: int) -> None:
        """This replica ended `leases` expired leases of silent peers."""
        ...


class NoMetrics:
    """Counts nothing: the runtime's parts when no metrics are asked for."""

    def run_started(self, agent: str) -> None:
        """Counts nothing."""

    def run_finished(self, agent: str, state: str) -> None:
        """Counts nothing."""

    def orphans_interrupted(self, cause: OrphanCause, runs: int) -> None:
        """Counts nothing."""

    def events_committed(self, events: int) -> None:
        """Counts nothing."""

    def committed(self, events: int, seconds: float) -> None:
        """Counts nothing."""

    def store_retry(self, kind: StoreRetryKind) -> None:
        """Counts nothing."""

    def store_error(self, kind: StoreErrorKind) -> None:
        """Counts nothing."""

    def fenced(self, runs: int) -> None:
        """Counts nothing."""

    def lease_renewal(self, outcome: LeaseRenewal) -> None:
        """Counts nothing."""

    def lease_lost(self) -> None:
        """Counts nothing."""

    def leases_taken_over(self, leases: int) -> None:
        """Counts nothing."""


class StreamTx(Protocol):
    """One transaction over external runs (store.streams): reads lock what they read on
    PostgreSQL (`FOR UPDATE`), so that appends to one stream are serialised across
    replicas; SQLite serialises every write anyway."""

    async def stream(self, owner: str, path: str) -> StreamRecord | None:
        """The record at (owner, path), tombstones included."""
        ...

    async def stream_of(self, run_id: str) -> StreamRecord | None:
        """The record of an external run."""
        ...

    async def run(self, run_id: str) -> Run | None:
        """The run row, with the last seq its log reached."""
        ...

    async def producer(self, run_id: str, producer_id: str) -> ProducerState | None:
        """A producer's state on the run."""
        ...

    async def events(self, run_id: str, first: int, last: int) -> list[RunEvent]:
        """The run's events with first <= seq <= last, in order."""
        ...

    async def unit_end(self, run_id: str, first: int) -> int:
        """The last seq of the append unit that starts at `first` (`first` itself for a
        unit of one event)."""
        ...

    async def forks(self, run_id: str) -> int:
        """How many streams were forked from the run and still exist."""
        ...

    async def open_streams(self, owner: str | None) -> int:
        """Open external runs, of `owner` or (None) of everyone."""
        ...

    async def set_last_seq(self, run_id: str, seq: int) -> None:
        """Sets the run row's last seq (an append that changes nothing else of it)."""
        ...

    async def put_stream(self, record: StreamRecord) -> None:
        """Inserts or replaces the record."""
        ...

    async def put_producer(self, run_id: str, producer_id: str, state: ProducerState) -> None:
        """Inserts or replaces a producer's state."""
        ...

    async def put_unit(self, run_id: str, first: int, last: int) -> None:
        """Records an append unit of more than one event."""
        ...

    async def write(
        self, new_runs: Sequence[Run], events: Sequence[RunEvent], updated_runs: Sequence[Run]
    ) -> None:
        """Writes runs and events as a commit does (telling other replicas)."""
        ...

    async def delete(self, record: StreamRecord, *, keep_tombstone: bool) -> None:
        """Deletes the external run and everything of it; with `keep_tombstone`, the
        record stays, marked deleted."""
        ...


class StreamStore(Protocol):
    """Durable external runs."""

    async def transaction(self, work: Callable[[StreamTx], Awaitable[T]]) -> T:
        """Runs `work` in one transaction (retried whole while the database is locked, so
        `work` must not act outside it)."""
        ...

    async def finished(self, run_id: str) -> bool:
        """True once the run's row is terminal, or gone (a plain read)."""
        ...

    async def expired(self, now_us: int, limit: int) -> list[StreamRecord]:
        """Records past their deadline (tombstones with no forks left included)."""
        ...
