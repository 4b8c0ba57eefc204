"""The one checker every fault row ends with: the logs, the runs rows and what subscribers saw.

For every run it verifies:

- the log's seqs are 1..last with no hole;
- it holds exactly one terminal event (`run.state` with a terminal state) and that event
  is the last one;
- the runs row agrees with the log: same `last_seq`, and the row's state is the terminal
  event's state (or, for a run still active, no terminal event at all);
- no run is left PENDING/RUNNING (unless the caller checks a live server mid-flight).

And for every stream a subscriber read (recorded in a `SeenLog`):

- every event it saw is in the log, unchanged (compared by a digest of the event's
  deterministic encoding);
- it saw no seq twice and skipped none: from its first seq on, consecutive.

Logs come from the SQLite file of a stopped server (`records_from_db`, read-only), from
the PostgreSQL database of a stopped server (`records_from_postgres`, one read-only
transaction), or from a live server through the API (`records_from_api`). `verify` turns
them into `Figures`.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from runservice.client import AsyncRunClient
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED", "INTERRUPTED", "TIMED_OUT"})
ACTIVE = frozenset({"PENDING", "RUNNING"})
MAX_PROBLEMS = 20  # listed in a failure message; the counts cover the rest


def digest(event: run_pb2.RunEvent) -> str:
    """A digest of the event's deterministic encoding: equal events, equal digests."""
    return hashlib.sha256(event.SerializeToString(deterministic=True)).hexdigest()[:32]


def wire_digest(wire: bytes) -> str:
    """The digest of an event stored (or sent) in wire form."""
    return digest(run_pb2.RunEvent.FromString(wire))


@dataclass(frozen=True)
class LoggedEvent:
    """One event of a run's log, as the checker needs it."""

    seq: int
    type: str
    state: str | None  # a RunState name without RUN_STATE_, on lifecycle events
    digest: str | None  # None when the row has no wire form to compare against


@dataclass
class RunRecord:
    """A run's row (owner, state, last_seq) and its full log."""

    run_id: str
    owner: str
    state: str
    last_seq: int
    events: list[LoggedEvent] = field(default_factory=list)


@dataclass
class SeenStream:
    """What one subscriber saw of one run: (seq, digest) in the order they arrived."""

    run_id: str
    from_seq: int
    items: list[tuple[int, str]] = field(default_factory=list)
    saw_terminal: bool = False

    def add(self, event: run_pb2.RunEvent) -> None:
        """Records an event the subscriber received."""
        self.items.append((event.seq, digest(event)))
        if event.type == "run.state" and _state_name(event.state) in TERMINAL:
            self.saw_terminal = True

    @property
    def last_seq(self) -> int:
        """The last seq seen, or from_seq - 1."""
        return self.items[-1][0] if self.items else self.from_seq - 1


class SeenLog:
    """Every stream every subscriber of a row read."""

    def __init__(self) -> None:
        self.streams: list[SeenStream] = []

    def stream(self, run_id: str, from_seq: int = 1) -> SeenStream:
        """A new stream of `run_id` starting at `from_seq`, recorded here."""
        stream = SeenStream(run_id, max(from_seq, 1))
        self.streams.append(stream)
        return stream

    @property
    def events(self) -> int:
        """How many events subscribers saw in all."""
        return sum(len(s.items) for s in self.streams)


@dataclass
class Figures:
    """What a check found. A clean row has every count but `runs`, `events`, `seen` at 0."""

    runs: int = 0
    events: int = 0
    seen: int = 0
    lost: int = 0
    changed: int = 0
    gaps: int = 0
    duplicates: int = 0
    unfinished: int = 0
    bad_terminal: int = 0
    row_mismatch: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No count that must be zero is above zero."""
        return not self.problems

    def as_dict(self) -> dict[str, int]:
        """The counts, for the report."""
        return {
            "runs": self.runs,
            "events_in_logs": self.events,
            "events_seen": self.seen,
            "lost": self.lost,
            "changed": self.changed,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "unfinished": self.unfinished,
            "bad_terminal": self.bad_terminal,
            "row_mismatch": self.row_mismatch,
        }

    def _problem(self, text: str) -> None:
        self.problems.append(text)

    def assert_clean(self) -> None:
        """Raises AssertionError listing the first problems when any count is above zero."""
        if self.problems:
            shown = "\n  ".join(self.problems[:MAX_PROBLEMS])
            more = len(self.problems) - MAX_PROBLEMS
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise AssertionError(f"checker: {self.as_dict()}\n  {shown}{tail}")


def verify(
    records: Iterable[RunRecord],
    seen: SeenLog | None = None,
    *,
    allow_active: bool = False,
    owners: Mapping[str, str] | None = None,
) -> Figures:
    """Checks every run's log and row, then every seen stream against the logs.

    `allow_active` accepts runs still PENDING/RUNNING (a live server mid-load); they are
    counted in `unfinished` either way. `owners` (run_id -> user who started it) also
    checks each row's owner.
    """
    figures = Figures()
    by_id = {record.run_id: record for record in records}
    for record in by_id.values():
        _check_run(record, figures, allow_active)
        if owners and record.run_id in owners and owners[record.run_id] != record.owner:
            figures._problem(f"{record.run_id}: owner {record.owner}, started by another user")
    for stream in seen.streams if seen else ():
        _check_stream(stream, by_id.get(stream.run_id), figures)
    return figures


def _check_run(record: RunRecord, figures: Figures, allow_active: bool) -> None:
    figures.runs += 1
    figures.events += len(record.events)
    seqs = [e.seq for e in record.events]
    last = seqs[-1] if seqs else 0
    holes = last - len(seqs)
    if holes or (seqs and seqs[0] != 1):
        figures.gaps += max(holes, 1)
        figures._problem(f"{record.run_id}: log has {holes} holes in 1..{last}")
    terminals = [e for e in record.events if e.type == "run.state" and e.state in TERMINAL]
    if record.state in ACTIVE:
        figures.unfinished += 1
        if not allow_active:
            figures._problem(f"{record.run_id}: left {record.state} (last_seq {last})")
        if terminals:
            figures.bad_terminal += 1
            figures._problem(f"{record.run_id}: row {record.state} but the log has ended")
    elif len(terminals) != 1 or terminals[0].seq != last:
        figures.bad_terminal += 1
        where = [e.seq for e in terminals]
        figures._problem(f"{record.run_id}: terminal events at {where}, last seq {last}")
    elif terminals[0].state != record.state:
        figures.row_mismatch += 1
        figures._problem(f"{record.run_id}: row says {record.state}, log ends {terminals[0].state}")
    if record.last_seq != last and not (allow_active and record.state in ACTIVE):
        figures.row_mismatch += 1
        figures._problem(f"{record.run_id}: row last_seq {record.last_seq}, log ends at {last}")


def _check_stream(stream: SeenStream, record: RunRecord | None, figures: Figures) -> None:
    figures.seen += len(stream.items)
    logged = {e.seq: e.digest for e in record.events} if record else {}
    expected = stream.from_seq
    seen_seqs: set[int] = set()
    for seq, seen_digest in stream.items:
        if seq in seen_seqs:
            figures.duplicates += 1
            figures._problem(f"{stream.run_id}: a subscriber saw seq {seq} twice")
            continue
        seen_seqs.add(seq)
        if seq != expected:
            figures.gaps += 1
            figures._problem(f"{stream.run_id}: a subscriber saw seq {seq} after {expected - 1}")
        expected = seq + 1
        if seq not in logged:
            figures.lost += 1
            figures._problem(f"{stream.run_id}: seq {seq} was seen but is not in the log")
        elif logged[seq] is not None and logged[seq] != seen_digest:
            figures.changed += 1
            figures._problem(f"{stream.run_id}: seq {seq} differs from what was seen")


# -- sources -------------------------------------------------------------------------------


@contextlib.contextmanager
def _readonly(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a copy of the database (and its WAL), never the file itself.

    A copy, because opening a WAL database even read-only may need to write its -shm file,
    and a check must leave the data directory exactly as the server left it.
    """
    with tempfile.TemporaryDirectory(prefix="faults-check-") as tmp:
        copy = Path(tmp) / db_path.name
        shutil.copyfile(db_path, copy)
        wal = db_path.with_name(db_path.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
        try:
            yield conn
        finally:
            conn.close()


_RUNS_SQL = "SELECT run_id, owner, state, last_seq FROM runs"
_EVENTS_SQL = "SELECT run_id, seq, type, state, wire FROM run_events ORDER BY run_id, seq"


def records_from_db(db_path: Path) -> list[RunRecord]:
    """Every run and its log, read from a SQLite file of a server that is not running."""
    with _readonly(Path(db_path)) as conn:
        return _records(conn.execute(_RUNS_SQL), conn.execute(_EVENTS_SQL))


async def records_from_postgres(url: str) -> list[RunRecord]:
    """Every run and its log, read from the PostgreSQL database of `url` (a runservice --db
    URL) in one read-only transaction, so runs and logs are of one moment."""
    engine = create_async_engine(url, poolclass=NullPool)
    snapshot = engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    try:
        async with snapshot.connect() as conn, conn.begin():
            runs = [tuple(row) for row in await conn.exec_driver_sql(_RUNS_SQL)]
            events = [tuple(row) for row in await conn.exec_driver_sql(_EVENTS_SQL)]
    finally:
        await engine.dispose()
    return _records(runs, events)


def _records(
    runs_rows: Iterable[tuple[Any, ...]], event_rows: Iterable[tuple[Any, ...]]
) -> list[RunRecord]:
    """Records from rows of _RUNS_SQL and _EVENTS_SQL (events in order of run and seq)."""
    runs = {
        run_id: RunRecord(run_id, owner, state, int(last_seq))
        for run_id, owner, state, last_seq in runs_rows
    }
    orphans: dict[str, RunRecord] = {}
    for run_id, seq, type_, state, wire in event_rows:
        record = runs.get(run_id)
        if record is None:  # events with no run row: reported as a run with no state
            record = orphans.setdefault(run_id, RunRecord(run_id, "?", "NO_ROW", 0))
        wire_hash = wire_digest(bytes(wire)) if wire is not None else None
        record.events.append(LoggedEvent(int(seq), type_, state, wire_hash))
    return [*runs.values(), *orphans.values()]


async def records_from_api(
    address: str, tokens: Mapping[str, str], *, deadline: float = 60.0
) -> list[RunRecord]:
    """Every run of every user in `tokens` and its full log, read through a live server.

    Logs of active runs are read up to their current end (no following).
    """
    records: list[RunRecord] = []
    for token in tokens.values():
        async with AsyncRunClient(address, token=token) as client:
            async for run in client.list_runs(page_size=1000):
                records.append(await _record_via_api(address, token, run, deadline))
    return records


async def _record_via_api(address: str, token: str, run: run_pb2.Run, deadline: float) -> RunRecord:
    state = _state_name(run.state)
    record = RunRecord(run.run_id, run.owner, state, run.last_seq)
    if run.last_seq == 0:
        return record
    md = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RunServiceStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Subscribe(
            pb.SubscribeRequest(run_id=run.run_id, from_seq=1), metadata=md, timeout=deadline
        )
        async for response in call:
            for event in response.events:
                record.events.append(_logged(event))
                if event.seq >= run.last_seq and state in ACTIVE:
                    call.cancel()
                    return record
    return record


def _logged(event: run_pb2.RunEvent) -> LoggedEvent:
    state = _state_name(event.state) if event.state else None
    return LoggedEvent(event.seq, event.type, state, digest(event))


def _state_name(state: Any) -> str:
    return str(run_pb2.RunState.Name(state)).removeprefix("RUN_STATE_")
