"""Replicas: this server's part in a cluster of servers on one PostgreSQL database.

A replica holds one lease (renewed every third of `--lease-ttl`, by the database's clock)
and executes its runs under it; every commit of its writer is fenced by it in the
database (store/cluster.py). Right after a renewal that came in time, and only then, it
sweeps: expired leases are deleted and the runs that were executed under them end
INTERRUPTED. A replica that was cut off (its renewal failed or came late), or that just
started, sweeps nothing for one lease-ttl more: when the database comes back after an
outage, the other replicas get a whole lease to renew theirs (a connection attempt may
take seconds to get through), so nobody interrupts a peer that was only cut off too.

Runs another replica executes are followed through notifications: one LISTEN connection
per replica, each notice fanned out in process to the RemoteLog of each run that someone
here follows. A poll every POLL_S covers a notice lost with its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, Protocol

from runservice.domain.errors import StoreError, StoreUnavailableError
from runservice.domain.model import Run, RunState
from runservice.domain.ports import LeaseRenewal, NoMetrics, OrphanCause, RunMetrics
from runservice.domain.replicas import Notice, OrphanFate, StartAsk
from runservice.runtime.signal import Signal

logger = logging.getLogger(__name__)

POLL_S = 2.0
"""How often a replica checks the database for what a lost notification would have said."""
RETRY_S = 1.0
SWEEP_BATCH = 500
STOP = "stop"
"""The kind of a stop request."""


class ClusterStore(Protocol):
    """The store's part for replicas (store/cluster.py's ClusterSql)."""

    def fence_by(self, holder: str) -> None: ...
    async def begin_lease(self, replica: str, holder: str, ttl: float) -> None: ...
    async def renew(self, holder: str, ttl: float) -> bool | None: ...
    async def end_lease(self, holder: str) -> None: ...
    async def expire_leases(self) -> list[str]: ...
    async def end_orphans(self, holder: str, end: OrphanFate, limit: int = ...) -> list[Run]: ...
    async def request(self, holder: str, run_id: str, kind: str, body: str, at_us: int) -> bool: ...
    async def requests_for(self, holder: str) -> list[tuple[str, str, str]]: ...
    async def wake(self, holder: str, run_id: str) -> None: ...
    async def reached(self, run_ids: list[str]) -> dict[str, int]: ...
    async def decide_starts(
        self, holder: str, asks: Sequence[StartAsk]
    ) -> list[Run | Exception]: ...
    def listening(
        self, on_notice: Callable[[str], None], on_lost: Callable[[], None]
    ) -> contextlib.AbstractAsyncContextManager[None]: ...


class RemoteLog:
    """The head of a log another replica writes, as far as this replica has heard."""

    def __init__(self, run_id: str, committed_seq: int = 0) -> None:
        self.run_id = run_id
        self.committed_seq = committed_seq
        self.followers = 0
        self._signal = Signal()

    def advance(self, seq: int) -> None:
        """Heard that the log reached `seq`."""
        self.committed_seq = max(self.committed_seq, seq)
        self.wake()

    def wake(self) -> None:
        """Wakes every waiter (to look at the database again)."""
        self._signal.fire()

    async def wait_beyond(self, seq: int, patience: float = POLL_S) -> None:
        """Returns once the log is heard to pass `seq`, or after `patience` seconds (to
        look at the database anyway)."""
        if self.committed_seq > seq:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._signal.wait(), patience)


class Replica:
    """This server's lease, its notifications and its view of other replicas' runs."""

    def __init__(
        self,
        sql: ClusterStore,
        replica: str,
        lease_ttl: float,
        *,
        end_orphan: OrphanFate,
        on_notice: Callable[[Notice], None],
        on_requests: Callable[[list[tuple[str, str, str]]], None],
        on_fenced: Callable[[str], None],
        on_swept: Callable[[list[Run]], None],
        on_deaf: Callable[[], None] = lambda: None,
        metrics: RunMetrics | None = None,
    ) -> None:
        self.sql = sql
        self._metrics = metrics or NoMetrics()
        self.replica = replica
        self.holder = _new_holder()
        self._ttl = lease_ttl
        self._end_orphan = end_orphan
        self._on_notice = on_notice
        self._on_requests = on_requests
        self._on_fenced = on_fenced
        self._on_swept = on_swept
        self._on_deaf = on_deaf  # notifications may have been missed
        self._remote: dict[str, RemoteLog] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = False
        self._lost = asyncio.Event()
        self.notices = 0  # notifications received (for tests and metrics)

    async def start(self) -> None:
        """Takes a lease (ending this replica's earlier life's), ends the runs no lease
        covers, and starts renewing, listening and polling."""
        await self.sql.begin_lease(self.replica, self.holder, self._ttl)
        self.sql.fence_by(self.holder)
        await self._end_orphans("startup")
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="runservice-lease"),
            asyncio.create_task(self._listen_loop(), name="runservice-listen"),
            asyncio.create_task(self._poll_loop(), name="runservice-poll"),
        ]

    async def close(self) -> None:
        """Stops the loops and gives the lease up (what it has not ended, the next sweep
        of any replica ends)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.sql.end_lease(self.holder)
        except StoreError as exc:
            logger.warning("could not give the lease up (%s); it expires on its own", exc)

    # -- following other replicas' runs ---------------------------------------------------

    @contextlib.contextmanager
    def follow(self, run_id: str) -> Iterator[RemoteLog]:
        """The run's RemoteLog while inside (shared by every follower of the run here)."""
        log = self._remote.get(run_id)
        if log is None:
            log = self._remote[run_id] = RemoteLog(run_id)
        log.followers += 1
        try:
            yield log
        finally:
            log.followers -= 1
            if log.followers == 0:
                self._remote.pop(run_id, None)

    async def request_stop(self, run_id: str, reason: str, at_us: int) -> None:
        """Asks the run's executor, wherever it is, to stop it (the first request wins)."""
        await self.sql.request(self.holder, run_id, STOP, reason, at_us)

    async def wake_executor(self, run_id: str) -> None:
        """Tells the run's executor, wherever it is, that inputs wait for it."""
        await self.sql.wake(self.holder, run_id)

    # -- notifications ---------------------------------------------------------------------

    def _received(self, payload: str) -> None:
        self.notices += 1
        try:
            holder, notice = Notice.parse(payload)
        except (ValueError, TypeError, AttributeError):
            logger.warning("ignored a notification that is not runservice's: %.80r", payload)
            return
        for run_id, seq in notice.seqs.items():
            log = self._remote.get(run_id)
            if log is not None:
                log.advance(seq)
        for run_id in (*notice.new, *notice.changed):
            log = self._remote.get(run_id)
            if log is not None:
                log.wake()
        if holder != self.holder:
            self._on_notice(notice)
        if notice.requests:
            self._spawn_requests()

    def _spawn_requests(self) -> None:
        task = asyncio.create_task(self._take_requests(), name="runservice-requests")
        self._tasks.append(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _take_requests(self) -> None:
        try:
            requests = await self.sql.requests_for(self.holder)
        except StoreError as exc:
            logger.debug("reading requests failed (%s); the poll retries", exc)
            return
        if requests:
            self._on_requests(requests)

    async def _listen_loop(self) -> None:
        while True:
            self._lost.clear()
            try:
                async with self.sql.listening(self._received, self._lost.set):
                    if not self._listening:
                        logger.info("listening for other replicas' notifications")
                    self._listening = True
                    self._wake_all()  # whatever was missed while not listening
                    await self._lost.wait()
            except (StoreError, OSError) as exc:
                logger.debug("cannot listen for notifications (%s)", exc)
            except Exception:  # the driver's own errors while connecting
                logger.exception("listening for notifications failed")
            if self._listening:
                logger.warning("lost the notification connection; polling until it is back")
                self._on_deaf()
            self._listening = False
            await asyncio.sleep(RETRY_S)

    def _wake_all(self) -> None:
        for log in self._remote.values():
            log.wake()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                followed = list(self._remote)
                for run_id, seq in (await self.sql.reached(followed)).items():
                    log = self._remote.get(run_id)
                    if log is not None:
                        log.advance(seq)
                self._wake_all()  # a row may have changed (a run ended with no new event)
                await self._take_requests()
            except StoreError as exc:
                logger.debug("poll failed (%s)", exc)

    # -- the lease --------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        loop = asyncio.get_running_loop()
        calm_until = loop.time() + self._ttl  # no sweep yet: peers may be catching up
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            try:
                on_time = await self.sql.renew(self.holder, self._ttl)
            except StoreUnavailableError as exc:
                self._metrics.lease_renewal("failed")
                logger.warning("could not renew the lease (%s); retrying", exc.cause)
                interval = min(RETRY_S, self._ttl / 3)
                calm_until = loop.time() + self._ttl
                continue
            except StoreError:
                self._metrics.lease_renewal("failed")
                logger.exception("renewing the lease failed; retrying")
                interval = min(RETRY_S, self._ttl / 3)
                calm_until = loop.time() + self._ttl
                continue
            interval = self._ttl / 3
            self._metrics.lease_renewal(_RENEWALS[on_time])
            if on_time is None:
                await self._fenced()
                calm_until = loop.time() + self._ttl
            elif not on_time:
                logger.warning("the lease was renewed late; no sweep for %gs", self._ttl)
                calm_until = loop.time() + self._ttl
            elif loop.time() >= calm_until:
                await self._sweep()

    async def _fenced(self) -> None:
        old = self.holder
        logger.error(
            "this server's lease %s was ended by another replica (it was silent for longer "
            "than --lease-ttl): its runs there were interrupted; taking a new lease",
            old,
        )
        self.holder = _new_holder()
        self._metrics.lease_lost()
        self._on_fenced(old)
        try:
            await self.sql.begin_lease(self.replica, self.holder, self._ttl)
        except StoreError:
            logger.exception("taking a new lease failed; retrying")
            return
        self.sql.fence_by(self.holder)

    async def _sweep(self) -> None:
        try:
            gone = await self.sql.expire_leases()
            if gone:
                self._metrics.leases_taken_over(len(gone))
                logger.warning(
                    "leases %s expired: interrupting the runs executed under them", ", ".join(gone)
                )
            await self._end_orphans("lease_expired")
        except StoreError as exc:
            logger.warning("the sweep failed (%s); the next one retries", exc)

    async def _end_orphans(self, cause: OrphanCause) -> None:
        while True:
            ended = await self.sql.end_orphans(self.holder, self._end_orphan, SWEEP_BATCH)
            interrupted = sum(1 for run in ended if run.state.terminal)
            if interrupted:
                logger.warning("interrupted %d runs no replica holds", interrupted)
                self._metrics.orphans_interrupted(cause, interrupted)
            if len(ended) > interrupted:
                logger.warning(
                    "took over %d runs no replica holds, to resume them from their checkpoints",
                    len(ended) - interrupted,
                )
            if ended:
                self._on_swept(ended)
            if len(ended) < SWEEP_BATCH:
                return


def _new_holder() -> str:
    return uuid.uuid4().hex


_RENEWALS: dict[bool | None, LeaseRenewal] = {True: "on_time", False: "late", None: "lost"}
"""The outcome of a renewal by what the database answered (None: a peer ended the lease)."""


class RemoteRun:
    """A run of the same thread that another replica executes, as a Predecessor: `ended`
    is set once its row is terminal; `request_end` asks its executor to stop it."""

    def __init__(
        self,
        run_id: str,
        replica: Replica,
        finished: Callable[[str], Awaitable[bool]],
        spawn: Callable[[Coroutine[Any, Any, Any], str], object],
        now_us: Callable[[], int],
    ) -> None:
        self.run_id = run_id
        self.ended = asyncio.Event()
        self._replica = replica
        self._finished = finished
        self._spawn = spawn
        self._now_us = now_us
        spawn(self._watch(), f"predecessor:{run_id}")

    async def _watch(self) -> None:
        with self._replica.follow(self.run_id) as heard:
            while True:
                try:
                    if await self._finished(self.run_id):
                        self.ended.set()
                        return
                except StoreError as exc:
                    logger.debug("cannot read run %s (%s); retrying", self.run_id, exc)
                await heard.wait_beyond(heard.committed_seq)

    def request_end(self, state: RunState, reason: str) -> bool:
        """Asks the run's executor to stop it (an INTERRUPT of its thread)."""
        del state  # a stop request always ends a run STOPPED
        self._spawn(
            self._replica.request_stop(self.run_id, reason, self._now_us()), f"stop:{self.run_id}"
        )
        return True


Settle = Callable[["Run | Exception"], None]
"""Told an ask's outcome right after its transaction, whether or not its caller still waits."""


class StartDecisions:
    """StartRun decisions taken in the database in batches, as commits are grouped: while
    one transaction decides, new asks gather, and the next takes them all (one lock per
    owner, one count, one commit)."""

    def __init__(self, replica: Replica, max_batch: int = 256) -> None:
        self._replica = replica
        self._max_batch = max_batch
        self._pending: list[tuple[StartAsk, Settle, asyncio.Future[Run]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Starts deciding."""
        self._task = asyncio.create_task(self._loop(), name="runservice-start-decisions")

    async def close(self) -> None:
        """Stops deciding; asks still waiting fail."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, _, future in self._pending:
            if not future.done():
                future.set_exception(StoreUnavailableError("shutting down", "not decided"))
        self._pending.clear()

    async def decide(self, ask: StartAsk, settle: Settle) -> Run:
        """The run `ask` made or found; raises its refusal. `settle` is called with the
        outcome as soon as it is committed, even if this call is cancelled meanwhile."""
        future: asyncio.Future[Run] = asyncio.get_running_loop().create_future()
        self._pending.append((ask, settle, future))
        self._wake.set()
        return await asyncio.shield(future)

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await asyncio.sleep(0)  # let ready callers join this batch
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                await self._decide(batch)

    async def _decide(self, batch: list[tuple[StartAsk, Settle, asyncio.Future[Run]]]) -> None:
        asks = [ask for ask, _, _ in batch]
        try:
            outcomes = await self._replica.sql.decide_starts(self._replica.holder, asks)
        except Exception as exc:  # the transaction failed: no ask was decided
            outcomes = [exc] * len(batch)
        for (_, settle, future), outcome in zip(batch, outcomes, strict=True):
            try:
                settle(outcome)
            except Exception:
                logger.exception("settling a start decision failed")
            if future.done():
                continue
            if isinstance(outcome, Run):
                future.set_result(outcome)
            else:
                future.set_exception(outcome)
