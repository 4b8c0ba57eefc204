"""The start gate: whether a new run may start now, must wait its turn, or is refused.

It holds the three rules a StartRun must pass, and what they need to remember: the
idempotency keys of the runs still in memory (a retry gets the same run), each thread's
line of active runs (REJECT, INTERRUPT, ENQUEUE), and the caps on active and queued runs.
Every decision is synchronous, so on one event loop it is atomic: `decide` and `register`
run with no await between them. (Across replicas the same decisions must be taken by the
database; this is the one place that changes.)
"""

from __future__ import annotations

import dataclasses

from runservice.domain.errors import InvalidArgumentError, RequestIdReusedError, ThreadBusyError
from runservice.domain.model import MultitaskStrategy, StartRequest
from runservice.runtime.lifecycle import LiveRun, Predecessor
from runservice.runtime.policies import Admission, Limits, duration_text


class StartGate:
    """Idempotency keys, thread lines and caps of the runs this process holds."""

    def __init__(
        self,
        limits: Limits,
        default_timeout: float,
        max_timeout: float,
        max_retention: float,
    ) -> None:
        self._admission = Admission(limits)
        self._default_timeout = default_timeout
        self._max_timeout = max_timeout
        self._max_retention = max_retention
        self._threads: dict[tuple[str, str], list[LiveRun]] = {}
        self._requests: dict[tuple[str, str], LiveRun] = {}
        self._queued: set[str] = set()  # runs counted as queued by admission, not active

    def with_timeout(self, request: StartRequest) -> StartRequest:
        """The request with its time limit: its own, else the server's default; raises
        InvalidArgumentError above the server's maximum."""
        timeout = request.timeout or self._default_timeout or None
        if timeout is not None and self._max_timeout and timeout > self._max_timeout:
            raise InvalidArgumentError(
                "timeout", f"must be at most {self._max_timeout:g}s on this server (--max-timeout)"
            )
        return dataclasses.replace(request, timeout=timeout)

    def check_retention(self, request: StartRequest) -> None:
        """Raises InvalidArgumentError for a retention above the server's maximum. (A run
        that asks for none has the server's default, which startup checks against it.)"""
        most = self._max_retention
        if request.retention is not None and request.retention > most:
            raise InvalidArgumentError(
                "retention",
                f"must be at most {duration_text(most)} on this server (--max-retention)",
            )

    def twin(self, user: str, request_id: str, fingerprint: str) -> LiveRun | None:
        """The run in memory that `user` started with `request_id`, if any; raises
        RequestIdReusedError when that run was started by a different request."""
        twin = self._requests.get((user, request_id))
        if twin is not None and twin.run.request_hash != fingerprint:
            raise RequestIdReusedError(request_id, twin.run_id)
        return twin

    def decide(self, user: str, request: StartRequest) -> list[Predecessor]:
        """The active runs of the request's thread the new run must wait for (empty: it
        starts now); raises ThreadBusyError under REJECT and TooManyActiveRunsError at a
        cap."""
        line = self._threads.get((user, request.thread_id), []) if request.thread_id else []
        active: list[Predecessor] = [r for r in line if not r.ended.is_set()]
        if active and request.multitask_strategy is MultitaskStrategy.REJECT:
            raise ThreadBusyError(request.thread_id, active[0].run_id)
        self._admission.check(user, queued=bool(active))
        return active

    def register(self, live: LiveRun, predecessors: list[Predecessor]) -> None:
        """Counts the admitted run, lines it up on its thread, indexes its request id."""
        run = live.run
        queued = bool(predecessors)
        live.predecessors = predecessors
        if queued:
            self._queued.add(run.run_id)
        self._admission.add(run.owner, queued=queued)
        if run.thread_id:
            self._threads.setdefault((run.owner, run.thread_id), []).append(live)
        if run.request_id:
            self._requests[(run.owner, run.request_id)] = live

    def started(self, live: LiveRun) -> None:
        """A queued run's turn came: it now counts as active."""
        if live.run_id in self._queued:
            self._queued.discard(live.run_id)
            self._admission.promote(live.run.owner)

    def release(self, live: LiveRun) -> None:
        """The run ended (or was never committed): frees its cap slot and its thread place."""
        self._admission.remove(live.run.owner, queued=live.run_id in self._queued)
        self._queued.discard(live.run_id)
        key = (live.run.owner, live.run.thread_id)
        line = self._threads.get(key)
        if line is not None:
            line[:] = [r for r in line if r is not live]
            if not line:
                del self._threads[key]

    def counts(self) -> tuple[int, int]:
        """The runs this process holds that are active, and those queued on their thread."""
        return self._admission.active(), len(self._queued)

    def forget_request(self, live: LiveRun) -> None:
        """The run left memory: its request id is looked up in the store from now on."""
        if live.run.request_id:
            self._requests.pop((live.run.owner, live.run.request_id), None)
