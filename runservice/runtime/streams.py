"""External runs: created, appended to, closed, forked, deleted and expired, each
operation one transaction of the store (StreamStore), whichever replica takes it.

Nothing executes an external run, so the rules of agent runs adapt (docs/http.md,
"Streams"): it is RUNNING from its creation until closed (SUCCEEDED), stopped or deleted;
it counts against caps of its own (`--max-open-streams`, `--max-open-streams-per-user`);
it may be deleted while open; it expires by its TTL; and a restart does not interrupt it.

Its log is the stream: seq 1 is its `run.state` RUNNING event, each append adds its
events at the next seqs (one append unit), and a close adds the terminal event. Readers
follow it as they follow a run another replica executes (runtime/cluster.RemoteLog):
woken by this server's own commits at once, and by other replicas' notices.

A fork is a new external run whose log starts as a copy of its source's up to the fork
offset (re-encoded under its own run id), plus, with a sub-offset, a prefix of the next
append unit; from there it is a stream of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from uuid6 import uuid7

from runservice.domain.errors import (
    ContentTypeMismatchError,
    InvalidArgumentError,
    NotExternalError,
    RunNotFoundError,
    StoreUnavailableError,
    StreamClosedError,
    StreamDeletedError,
    StreamExistsError,
    TooManyOpenStreamsError,
)
from runservice.domain.model import (
    STATE_EVENT,
    Principal,
    Run,
    RunChange,
    RunEvent,
    RunState,
    StartRequest,
    WatchUpdate,
)
from runservice.domain.ports import Clock, EventEncoder, StreamStore, StreamTx
from runservice.domain.streams import (
    BYTES_TYPE,
    EXTERNAL_AGENT,
    JSON_TYPE,
    MESSAGE,
    ProducerClaim,
    ProducerState,
    StreamRecord,
    check_producer,
    check_stream_seq,
    is_json,
    media_type,
)
from runservice.runtime.cluster import RemoteLog

logger = logging.getLogger(__name__)
T = TypeVar("T")

FORKED_EVENT = "stream.forked"
"""Takes the place of a closed source's terminal event in a fork's copy of its log."""
SWEEP_BATCH = 200


@dataclass(frozen=True)
class StreamLimits:
    """Caps on open external runs (0: none)."""

    max_open: int = 100_000
    max_open_per_user: int = 10_000


@dataclass(frozen=True)
class Message:
    """One event of an append, before it has a seq."""

    type: str = MESSAGE
    data: Mapping[str, Any] | None = None
    text: str | None = None
    binary: bytes | None = None
    value: str | None = None  # JSON text

    @property
    def size(self) -> int:
        """Bytes of payload (for bounds)."""
        if self.binary is not None:
            return len(self.binary)
        return len(self.text or self.value or "") + (0 if self.data is None else 64)


@dataclass(frozen=True)
class CreateAsk:
    """A stream to create (PUT /v1/streams/{path})."""

    content_type: str | None  # None: not given (the default, or a fork's source's)
    ttl_s: int | None = None
    expires_us: int | None = None
    closed: bool = False
    body: Sequence[Message] = ()  # the initial append unit
    fork_from: str | None = None  # the source's path
    fork_seq: int | None = None  # None: the source's tail
    fork_sub: int = 0


@dataclass(frozen=True)
class AppendAsk:
    """An append, a close, or both (POST /v1/streams/{path}, AppendEvents, CloseRun)."""

    messages: Sequence[Message] = ()
    close: bool = False
    producer: ProducerClaim | None = None
    stream_seq: str | None = None
    content_type: str | None = None  # HTTP: must match the stream's
    result: Mapping[str, Any] | None = None  # the run's result, when this closes it


@dataclass(frozen=True)
class Outcome:
    """What an operation left: the stream's record and run (with its last seq)."""

    record: StreamRecord
    run: Run
    created: bool = False
    duplicate: bool = False
    producer: ProducerState | None = None

    @property
    def closed(self) -> bool:
        """True once the run has ended."""
        return self.run.state.terminal


class ExternalRuns:
    """The use cases of external runs; the RemoteRuns their subscriptions follow."""

    def __init__(
        self,
        store: StreamStore,
        clock: Clock,
        encoder: EventEncoder,
        *,
        limits: StreamLimits | None = None,
        publish: Callable[[WatchUpdate], None] = lambda update: None,
        on_started: Callable[[Run], None] = lambda run: None,
        on_finished: Callable[[Run], None] = lambda run: None,
        remote: Any = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._encode = encoder
        self._limits = limits or StreamLimits()
        self._publish = publish
        self._on_started = on_started
        self._on_finished = on_finished
        self._remote = remote  # with replicas: their notices advance what is followed
        self._followed: dict[str, set[RemoteLog]] = {}
        self._running: set[asyncio.Task[Any]] = set()  # transactions under way
        self._closing = False

    async def _whole(self, work: Callable[[StreamTx], Awaitable[T]]) -> T:
        """Runs `work` in one transaction that goes to its end even if the caller is
        cancelled (a client that left): a write it does not hear of is still whole (a
        producer's retry is then answered as a duplicate), and no connection is dropped
        mid-transaction."""
        task = asyncio.ensure_future(self._store.transaction(work))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    # -- reading ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def follow(self, run_id: str) -> Iterator[RemoteLog]:
        """The run's log as far as this server has heard (RemoteRuns)."""
        with contextlib.ExitStack() as stack:
            heard = (
                stack.enter_context(self._remote.follow(run_id))
                if self._remote is not None
                else RemoteLog(run_id)
            )
            logs = self._followed.setdefault(run_id, set())
            logs.add(heard)
            try:
                yield heard
            finally:
                logs.discard(heard)
                if not logs:
                    self._followed.pop(run_id, None)

    async def finished(self, run_id: str) -> bool:
        """True once the run's row is terminal, or gone (RemoteRuns); and for every run
        once the server shuts down (close)."""
        if self._closing:
            return True
        return await self._store.finished(run_id)

    async def settle(self, limit: float) -> None:
        """Waits (up to `limit` seconds) for the transactions under way to end."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=limit)

    def close(self) -> None:
        """The server shuts down: readers of external runs, which stay open, end here
        (their clients resume elsewhere, by seq or offset) before the store closes."""
        self._closing = True
        for logs in self._followed.values():
            for log in logs:
                log.wake()

    def _heard(self, run_id: str, seq: int) -> None:
        for log in self._followed.get(run_id, ()):
            log.advance(seq)

    async def open(self, principal: Principal, path: str, *, touch: bool) -> Outcome:
        """The stream at `path` (a read: with `touch`, it renews a sliding TTL).
        RunNotFoundError if there is none (or it expired), StreamDeletedError for a
        tombstone."""
        now_us = self._now_us()

        async def work(tx: StreamTx) -> Outcome:
            record = await self._live_record(tx, principal.user, path, now_us)
            run = await tx.run(record.run_id)
            if run is None or principal.read_only_run not in (None, record.run_id):
                raise RunNotFoundError(path)  # a read token reads its own run alone
            if touch and record.ttl_s is not None:
                record = record.touched(now_us)
                await tx.put_stream(record)
            return Outcome(record, run)

        return await self._whole(work)

    async def record_of(self, run_id: str) -> StreamRecord | None:
        """The stream record of an external run (None for any other run)."""

        async def work(tx: StreamTx) -> StreamRecord | None:
            return await tx.stream_of(run_id)

        return await self._whole(work)

    # -- creating --------------------------------------------------------------------------

    async def create(self, principal: Principal, path: str, ask: CreateAsk) -> Outcome:
        """PUT: creates the stream, or returns the one there with the same configuration
        (`created` False); StreamExistsError for another configuration."""
        now_us = self._now_us()

        async def work(tx: StreamTx) -> Outcome:
            existing = await tx.stream(principal.user, path)
            if existing is not None and existing.deleted:
                raise StreamExistsError(path, "forks still reading it (it was deleted)")
            if existing is not None and existing.expired(now_us):
                await self._delete(tx, existing)
                existing = None
            if existing is not None:
                return await self._same_stream(tx, existing, path, ask)
            return await self._create(tx, principal.user, path, ask, now_us)

        outcome = await self._retry_race(work)
        if outcome.created:
            self._created(outcome)
        return outcome

    async def start(self, principal: Principal, request: StartRequest, fingerprint: str) -> Run:
        """StartRun of the agent `external`: a stream with no path, in JSON mode
        (`fingerprint`: the request's, kept with its request_id)."""
        if request.thread_id:
            raise InvalidArgumentError(
                "thread_id", "external runs take no thread (nothing executes them in turn)"
            )
        now_us = self._now_us()

        async def work(tx: StreamTx) -> Outcome:
            return await self._create(
                tx, principal.user, "", CreateAsk(JSON_TYPE), now_us, request=(request, fingerprint)
            )

        outcome = await self._whole(work)
        self._created(outcome)
        return outcome.run

    async def _same_stream(
        self, tx: StreamTx, existing: StreamRecord, path: str, ask: CreateAsk
    ) -> Outcome:
        run = await tx.run(existing.run_id)
        if run is None:
            raise RunNotFoundError(path)
        why = _difference(existing, run, ask, await self._fork_source_id(tx, existing, ask))
        if why:
            raise StreamExistsError(path, why)
        return Outcome(existing, run)

    async def _fork_source_id(
        self, tx: StreamTx, existing: StreamRecord, ask: CreateAsk
    ) -> str | None:
        if ask.fork_from is None:
            return None
        source = await tx.stream(existing.owner, ask.fork_from)
        return None if source is None else source.run_id

    async def _create(
        self,
        tx: StreamTx,
        owner: str,
        path: str,
        ask: CreateAsk,
        now_us: int,
        *,
        request: tuple[StartRequest, str] | None = None,
    ) -> Outcome:
        await self._check_caps(tx, owner)
        run_id = str(uuid7())
        now = self._clock.now()
        events: list[RunEvent] = []
        units: list[tuple[int, int]] = []
        record = StreamRecord(
            run_id=run_id,
            owner=owner,
            path=path,
            content_type=ask.content_type or BYTES_TYPE,
            created_us=now_us,
            access_us=now_us,
            ttl_s=ask.ttl_s,
            expires_us=ask.expires_us,
        )
        if ask.fork_from is not None:
            record = await self._fork(tx, record, ask, events, units)
        if not events:
            events.append(
                RunEvent(run_id=run_id, seq=1, at=now, type=STATE_EVENT, state=RunState.RUNNING)
            )
        _check_payloads(record, ask.body)
        if len(ask.body) > 1:
            units.append((events[-1].seq + 1, events[-1].seq + len(ask.body)))
        events.extend(self._events(run_id, events[-1].seq, ask.body))
        state = RunState.SUCCEEDED if ask.closed else RunState.RUNNING
        if ask.closed:
            events.append(self._state_event(run_id, events[-1].seq + 1, state))
        run = Run(
            run_id=run_id,
            owner=owner,
            agent=EXTERNAL_AGENT,
            state=state,
            created_at=now,
            started_at=now,
            ended_at=now if ask.closed else None,
            input=_input(record),
            last_seq=events[-1].seq,
        )
        if request is not None:
            asked, fingerprint = request
            run = run.replace(
                input=dict(asked.input),
                labels=dict(asked.labels),
                request_id=asked.request_id,
                request_hash=fingerprint if asked.request_id else "",
                retention=asked.retention,
                webhook_url=asked.webhook_url,
            )
        for event in events:
            event.wire = self._encode(event)
        await tx.write([run], events, [])
        await tx.put_stream(record)
        for first, last in units:
            await tx.put_unit(run_id, first, last)
        return Outcome(record, run, created=True)

    async def _fork(
        self,
        tx: StreamTx,
        record: StreamRecord,
        ask: CreateAsk,
        events: list[RunEvent],
        units: list[tuple[int, int]],
    ) -> StreamRecord:
        """Fills `events` with the fork's copy of its source's log (and the sub-offset's
        prefix); returns the record with what it inherits."""
        assert ask.fork_from is not None
        source = await tx.stream(record.owner, ask.fork_from)
        if source is None or source.expired(self._now_us()):
            raise RunNotFoundError(ask.fork_from)
        if source.deleted:
            raise StreamExistsError(ask.fork_from, "been deleted: it cannot be forked")
        source_run = await tx.run(source.run_id)
        if source_run is None:
            raise RunNotFoundError(ask.fork_from)
        if ask.content_type is not None and media_type(ask.content_type) != media_type(
            source.content_type
        ):
            raise ContentTypeMismatchError(
                f"a fork has its source's content type, {source.content_type!r}"
            )
        tail = source_run.last_seq
        at = tail if ask.fork_seq is None else ask.fork_seq
        if not 0 <= at <= tail:
            raise InvalidArgumentError(
                "Stream-Fork-Offset", f"must be within the source, at most its tail ({tail})"
            )
        run_id = record.run_id
        events.extend(await self._copy(tx, source.run_id, run_id, at))
        if ask.fork_sub:
            prefix = await self._prefix(tx, source, at, ask.fork_sub)
            if len(prefix) > 1:
                units.append((events[-1].seq + 1, events[-1].seq + len(prefix)))
            events.extend(self._events(run_id, events[-1].seq, prefix))
        ttl_s, expires_us = ask.ttl_s, ask.expires_us
        if ttl_s is None and expires_us is None:
            ttl_s, expires_us = source.ttl_s, source.expires_us
        return dataclasses.replace(
            record,
            content_type=ask.content_type or source.content_type,
            ttl_s=ttl_s,
            expires_us=expires_us,
            fork_of=source.run_id,
            fork_seq=at,
            fork_sub=ask.fork_sub,
        )

    async def _copy(self, tx: StreamTx, source_id: str, run_id: str, at: int) -> list[RunEvent]:
        """A fork's log up to the fork offset: its source's, under its own run id, with a
        RUNNING event of its own first and no terminal event."""
        now = self._clock.now()
        copies = [RunEvent(run_id, 1, now, STATE_EVENT, state=RunState.RUNNING)]
        for event in await tx.events(source_id, 2, at):
            if event.terminal:
                copies.append(RunEvent(run_id, event.seq, now, FORKED_EVENT))
            else:
                copies.append(dataclasses.replace(event, run_id=run_id, wire=None))
        return copies

    async def _prefix(self, tx: StreamTx, source: StreamRecord, at: int, sub: int) -> list[Message]:
        """The first `sub` bytes (or JSON messages) of the source's first append unit
        after `at`."""
        field = "Stream-Fork-Sub-Offset"
        # The first event with data after `at` (past seq 1, RUNNING, and a fork marker).
        following = [e for e in await tx.events(source.run_id, at + 1, at + 3) if _has_data(e)]
        if not following or following[0].terminal:
            raise InvalidArgumentError(field, "there is no append after the fork offset")
        first = following[0].seq
        last = await tx.unit_end(source.run_id, first)
        unit = await tx.events(source.run_id, first, last)
        if source.json_mode:
            if sub > len(unit):
                raise InvalidArgumentError(field, f"the append has {len(unit)} messages")
            return [_message(event) for event in unit[:sub]]
        data = _bytes(unit[0])
        if sub > len(data):
            raise InvalidArgumentError(field, f"the append has {len(data)} bytes")
        return [bytes_message(source.content_type, data[:sub])]

    async def _check_caps(self, tx: StreamTx, owner: str) -> None:
        limits = self._limits
        per_user = limits.max_open_per_user
        if per_user and await tx.open_streams(owner) >= per_user:
            raise TooManyOpenStreamsError(per_user, "you", "--max-open-streams-per-user")
        if limits.max_open and await tx.open_streams(None) >= limits.max_open:
            raise TooManyOpenStreamsError(
                limits.max_open, "this server's users", "--max-open-streams"
            )

    def _created(self, outcome: Outcome) -> None:
        run = outcome.run
        self._on_started(run)
        self._publish(WatchUpdate(RunChange.CREATED, run))
        if run.state.terminal:
            self._on_finished(run)
        self._heard(run.run_id, run.last_seq)

    # -- appending -------------------------------------------------------------------------

    async def append(
        self,
        principal: Principal,
        ask: AppendAsk,
        *,
        path: str | None = None,
        run_id: str | None = None,
    ) -> Outcome:
        """Appends (and/or closes) by path or run id; the protocol's refusals as errors."""
        now_us = self._now_us()

        async def work(tx: StreamTx) -> tuple[Outcome, bool]:
            record, run = await self._stream_and_run(tx, principal, path, run_id, now_us)
            return await self._append(tx, record, run, ask, now_us)

        outcome, ended = await self._whole(work)
        self._heard(outcome.run.run_id, outcome.run.last_seq)
        if ended:
            self._ended(outcome.run)
        return outcome

    async def _append(
        self, tx: StreamTx, record: StreamRecord, run: Run, ask: AppendAsk, now_us: int
    ) -> tuple[Outcome, bool]:
        claim = ask.producer
        if run.state.terminal:
            if claim is not None and record.closed_by == claim.key():
                state = await tx.producer(record.run_id, claim.producer_id)
                return Outcome(record, run, duplicate=True, producer=state), False
            if not ask.messages and claim is None:
                return Outcome(record, run), False  # closing again
            raise StreamClosedError(run.run_id, run.last_seq)
        _check_content_type(record, ask)
        producer: ProducerState | None = None
        if claim is not None:
            state = await tx.producer(record.run_id, claim.producer_id)
            if check_producer(claim, state) == "duplicate":
                return Outcome(record, run, duplicate=True, producer=state), False
            producer = ProducerState(claim.epoch, claim.seq)
        check_stream_seq(record, ask.stream_seq)
        _check_payloads(record, ask.messages)
        events = self._events(run.run_id, run.last_seq, ask.messages)
        last = events[-1].seq if events else run.last_seq
        updated: list[Run] = []
        if ask.close:
            now = self._clock.now()
            events.append(self._state_event(run.run_id, last + 1, RunState.SUCCEEDED))
            run = run.replace(
                state=RunState.SUCCEEDED,
                ended_at=now,
                result=dict(ask.result) if ask.result is not None else None,
                last_seq=last + 1,
            )
            updated.append(run)
        else:
            run = run.replace(last_seq=last)
            await tx.set_last_seq(run.run_id, last)
        for event in events:
            event.wire = self._encode(event)
        await tx.write([], events, updated)
        if len(ask.messages) > 1:
            await tx.put_unit(run.run_id, events[0].seq, events[len(ask.messages) - 1].seq)
        if producer is not None and claim is not None:
            await tx.put_producer(run.run_id, claim.producer_id, producer)
        record = record.touched(now_us)
        if ask.stream_seq is not None:
            record = dataclasses.replace(record, stream_seq=ask.stream_seq)
        if ask.close and claim is not None:
            record = dataclasses.replace(record, closed_by=claim.key())
        await tx.put_stream(record)
        return Outcome(record, run, producer=producer), ask.close

    async def stop(self, principal: Principal, run_id: str, reason: str) -> Run:
        """StopRun of an external run: it ends STOPPED (a finished one is returned)."""

        async def work(tx: StreamTx) -> tuple[Run, bool]:
            record = await self._record_by_run(tx, principal, run_id)
            run = await tx.run(record.run_id)
            if run is None:
                raise RunNotFoundError(run_id)
            if run.state.terminal:
                return run, False
            now = self._clock.now()
            event = self._state_event(run_id, run.last_seq + 1, RunState.STOPPED)
            event.wire = self._encode(event)
            stopped = run.replace(
                state=RunState.STOPPED, ended_at=now, stop_reason=reason, last_seq=event.seq
            )
            await tx.write([], [event], [stopped])
            return stopped, True

        run, ended = await self._whole(work)
        if ended:
            self._heard(run_id, run.last_seq)
            self._ended(run)
        return run

    def _ended(self, run: Run) -> None:
        self._on_finished(run)
        self._publish(WatchUpdate(RunChange.STATE_CHANGED, run))

    # -- deleting and expiring ------------------------------------------------------------

    async def delete(
        self, principal: Principal, *, path: str | None = None, run_id: str | None = None
    ) -> Run:
        """Deletes the stream (by path or run id), open or not; with live forks, its path
        stays taken (a tombstone) until they are gone."""
        now_us = self._now_us()

        async def work(tx: StreamTx) -> Run:
            record, run = await self._stream_and_run(tx, principal, path, run_id, now_us)
            await self._delete(tx, record)
            return run

        run = await self._whole(work)
        self._gone(run)
        return run

    async def _delete(self, tx: StreamTx, record: StreamRecord) -> None:
        """Deletes the stream, keeping a tombstone while forks of it live, and then the
        tombstones of its sources that no fork needs any more."""
        await tx.delete(record, keep_tombstone=await tx.forks(record.run_id) > 0)
        source_id = record.fork_of
        while source_id:
            source = await tx.stream_of(source_id)
            if source is None or not source.deleted or await tx.forks(source_id) > 0:
                return
            await tx.delete(source, keep_tombstone=False)
            source_id = source.fork_of

    def _gone(self, run: Run) -> None:
        self._heard(run.run_id, run.last_seq + 1)  # wakes its readers: they find it gone
        self._publish(WatchUpdate(RunChange.DELETED, run))
        if not run.state.terminal:
            self._on_finished(run.replace(state=RunState.STOPPED))

    async def sweep(self) -> int:
        """Deletes the streams whose TTL or expiry time has passed; returns how many."""
        now_us = self._now_us()
        gone = 0
        for candidate in await self._store.expired(now_us, SWEEP_BATCH):

            async def work(tx: StreamTx, run_id: str = candidate.run_id) -> Run | None:
                record = await tx.stream_of(run_id)
                if record is None or record.deleted or not record.expired(now_us):
                    return None  # renewed (or deleted) meanwhile
                run = await tx.run(run_id)
                await self._delete(tx, record)
                return run

            run = await self._whole(work)
            if run is not None:
                gone += 1
                self._gone(run)
        return gone

    async def sweep_loop(self, interval: float) -> None:
        """Sweeps every `interval` seconds."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except StoreUnavailableError:
                logger.warning("expiring streams failed; will retry", exc_info=True)

    # -- helpers ---------------------------------------------------------------------------

    async def _live_record(self, tx: StreamTx, owner: str, path: str, now_us: int) -> StreamRecord:
        record = await tx.stream(owner, path)
        if record is None or (not record.deleted and record.expired(now_us)):
            raise RunNotFoundError(path)
        if record.deleted:
            raise StreamDeletedError(path)
        return record

    async def _stream_and_run(
        self,
        tx: StreamTx,
        principal: Principal,
        path: str | None,
        run_id: str | None,
        now_us: int,
    ) -> tuple[StreamRecord, Run]:
        """The caller's live stream at `path` (else of `run_id`) and its run."""
        if path is not None:
            record = await self._live_record(tx, principal.user, path, now_us)
        else:
            assert run_id is not None
            record = await self._record_by_run(tx, principal, run_id)
        run = await tx.run(record.run_id)
        if run is None:
            raise RunNotFoundError(path or run_id or "")
        return record, run

    async def _record_by_run(self, tx: StreamTx, principal: Principal, run_id: str) -> StreamRecord:
        record = await tx.stream_of(run_id)
        if record is None or record.deleted:
            run = await tx.run(run_id)
            if run is None or not principal.own_scope().allows(run.owner):
                raise RunNotFoundError(run_id)
            raise NotExternalError(run_id, run.agent)
        if not principal.own_scope().allows(record.owner):
            raise RunNotFoundError(run_id)
        return record

    async def _retry_race(self, work: Callable[[StreamTx], Any]) -> Outcome:
        """Runs a create; once more if a concurrent create took the path first."""
        try:
            result: Outcome = await self._whole(work)
        except Exception as exc:
            if "unique" not in str(exc).lower() and "duplicate" not in str(exc).lower():
                raise
            result = await self._whole(work)
        return result

    def _events(self, run_id: str, after: int, messages: Sequence[Message]) -> list[RunEvent]:
        now = self._clock.now()
        return [
            RunEvent(
                run_id=run_id,
                seq=after + i,
                at=now,
                type=m.type,
                data=m.data,
                text=m.text,
                binary=m.binary,
                value=m.value,
            )
            for i, m in enumerate(messages, 1)
        ]

    def _state_event(self, run_id: str, seq: int, state: RunState) -> RunEvent:
        return RunEvent(run_id=run_id, seq=seq, at=self._clock.now(), type=STATE_EVENT, state=state)

    def _now_us(self) -> int:
        return int(self._clock.now().timestamp() * 1_000_000)


def _input(record: StreamRecord) -> dict[str, Any]:
    return {"stream": record.path, "content_type": record.content_type}


def _difference(  # noqa: PLR0911 (one return per way two streams may differ)
    existing: StreamRecord, run: Run, ask: CreateAsk, source_id: str | None
) -> str:
    """How an existing stream differs from what a PUT asks; "" when it is the same."""
    wanted_type = ask.content_type
    if wanted_type is None and ask.fork_from is None:
        wanted_type = BYTES_TYPE
    if wanted_type is not None and media_type(wanted_type) != media_type(existing.content_type):
        return f"content type {existing.content_type!r}"
    if ask.ttl_s is not None or ask.expires_us is not None or ask.fork_from is None:
        if ask.ttl_s != existing.ttl_s:
            return f"TTL {existing.ttl_s}"
        if ask.expires_us != existing.expires_us:
            return "another expiry time"
    if ask.closed != run.state.terminal:
        return "closed" if run.state.terminal else "open"
    if (source_id or "") != existing.fork_of:
        return "another fork source"
    if ask.fork_from is not None:
        if ask.fork_seq is not None and ask.fork_seq != existing.fork_seq:
            return "another fork offset"
        if ask.fork_sub != existing.fork_sub:
            return "another fork sub-offset"
    return ""


def _check_content_type(record: StreamRecord, ask: AppendAsk) -> None:
    """An HTTP append's Content-Type must be the stream's."""
    if not ask.messages or ask.content_type is None:
        return
    if media_type(ask.content_type) != media_type(record.content_type):
        raise ContentTypeMismatchError(
            f"the stream's content type is {record.content_type!r}, not {ask.content_type!r}"
        )


def _check_payloads(record: StreamRecord, messages: Sequence[Message]) -> None:
    """JSON streams take JSON (objects, values, text); byte streams take bytes or text."""
    json_mode = is_json(record.content_type)
    for m in messages:
        if m.type.startswith("run."):
            raise InvalidArgumentError("type", "types starting with 'run.' are the server's")
        if json_mode and m.binary is not None:
            raise ContentTypeMismatchError("a JSON stream takes JSON values, not bytes")
        if not json_mode and (m.data is not None or m.value is not None):
            raise ContentTypeMismatchError(
                f"a stream of {record.content_type!r} takes bytes or text, not JSON values"
            )


def _has_data(event: RunEvent) -> bool:
    """True for an append's event, and for the terminal event (where appends end)."""
    return event.terminal or event.type not in (STATE_EVENT, FORKED_EVENT)


def _message(event: RunEvent) -> Message:
    return Message(event.type, event.data, event.text, event.binary, event.value)


def _bytes(event: RunEvent) -> bytes:
    if event.binary is not None:
        return event.binary
    return (event.text or "").encode()


def bytes_message(content_type: str, data: bytes) -> Message:
    """The Message of a byte stream's append of `data`: text when the stream is text and
    the bytes are UTF-8."""
    if media_type(content_type).startswith("text/"):
        try:
            return Message(text=data.decode())
        except UnicodeDecodeError:
            pass
    return Message(binary=data)
