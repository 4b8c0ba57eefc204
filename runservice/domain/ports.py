"""What the runtime needs from the world: a store for runs and events, and a clock."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Literal, Protocol

from runservice.domain.model import EncodedEvent, Run, RunEvent, RunFilter, Scope

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
        self, new_runs: Sequence[Run], events: Sequence[RunEvent], updated_runs: Sequence[Run]
    ) -> frozenset[str] | None:
        """Commits new runs, appended events and updated run rows in one transaction.

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

    async def purge_ended_before(self, cutoff: datetime, limit: int) -> list[str]:
        """Deletes up to `limit` finished runs that ended before `cutoff`; returns their ids."""
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
