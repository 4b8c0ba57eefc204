"""What replicas tell each other through the database: plain data, no SQL."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from runservice.domain.model import Checkpoint, Run, RunEvent, RunState, Snapshot

PAYLOAD_LIMIT = 7000  # bytes of one notification's payload; PostgreSQL's limit is 8,000


OrphanFate = Callable[[Run, Checkpoint | None], tuple[RunEvent, Run, Snapshot | None]]
"""What becomes of a run no lease covers, given its latest checkpoint: its event (a
terminal one, or a resumed RUNNING one), its row and the snapshot to store (if any)."""

INPUT_REQUEST = "input"
"""The kind of the request that tells a run's executor inputs wait for it (SendInput)."""


@dataclass
class Notice:
    """What one commit changed, for the other replicas (see the module doc)."""

    seqs: dict[str, int] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    # Runs whose row changed but not their state (live fields: progress, usage, waiting).
    updated: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    # Deleted runs: what WatchRuns tells of them (owner, agent, state, thread, times).
    deleted: dict[str, dict[str, Any]] = field(default_factory=dict)

    def payloads(self, holder: str) -> list[str]:
        """The notice as NOTIFY payloads, each under PAYLOAD_LIMIT bytes."""
        items: list[tuple[str, Any]] = [
            *(("e", kv) for kv in self.seqs.items()),
            *(("n", run_id) for run_id in self.new),
            *(("c", run_id) for run_id in self.changed),
            *(("u", run_id) for run_id in self.updated),
            *(("q", run_id) for run_id in self.requests),
            *(("d", kv) for kv in self.deleted.items()),
        ]
        out: list[str] = []
        part: dict[str, Any] = {}
        size = 0
        for key, item in items:
            cost = len(json.dumps(item)) + 4
            if part and size + cost > PAYLOAD_LIMIT:
                out.append(_dump(holder, part))
                part, size = {}, 0
            if isinstance(item, tuple):
                part.setdefault(key, {})[item[0]] = item[1]
            else:
                part.setdefault(key, []).append(item)
            size += cost
        if part:
            out.append(_dump(holder, part))
        return out

    @classmethod
    def parse(cls, payload: str) -> tuple[str, Notice]:
        """The holder that sent `payload`, and its notice."""
        raw = json.loads(payload)
        return raw.get("h", ""), cls(
            seqs={str(k): int(v) for k, v in raw.get("e", {}).items()},
            new=[str(r) for r in raw.get("n", ())],
            changed=[str(r) for r in raw.get("c", ())],
            updated=[str(r) for r in raw.get("u", ())],
            requests=[str(r) for r in raw.get("q", ())],
            deleted={str(k): dict(v) for k, v in raw.get("d", {}).items()},
        )


def _dump(holder: str, part: dict[str, Any]) -> str:
    return json.dumps({"h": holder, **part}, separators=(",", ":"))


def commit_notice(
    new_runs: Sequence[Run], events: Sequence[RunEvent], updated_runs: Sequence[Run]
) -> Notice:
    """The notice of one group commit: each run's last seq in it and the rows it wrote."""
    seqs: dict[str, int] = {}
    for event in events:
        seqs[event.run_id] = event.seq
    new = [run.run_id for run in new_runs]
    fresh = set(new)
    # A state changes with its run.state event in the same commit; a row written without
    # one changed only its live fields.
    stated = {event.run_id for event in events if event.state is not None}
    rows = list(dict.fromkeys(r.run_id for r in updated_runs if r.run_id not in fresh))
    changed = [run_id for run_id in rows if run_id in stated]
    updated = [run_id for run_id in rows if run_id not in stated]
    return Notice(seqs=seqs, new=new, changed=changed, updated=updated)


@dataclass(frozen=True)
class StartFacts:
    """What a start decision needs to know, read under the owner's lock."""

    same_request: Run | None  # the owner's run with the request's request_id
    thread_active: list[Run]  # the thread's PENDING and RUNNING runs, oldest first
    active: int  # the owner's RUNNING runs
    queued: int  # the owner's PENDING runs
    all_active: int  # everyone's (counted only when a server-wide cap is set)
    all_queued: int


@dataclass(frozen=True)
class StartAsk:
    """One StartRun's question to the database: whose run, its keys, and how to decide."""

    owner: str
    request_id: str
    thread_id: str
    count_all: bool  # a cap counts every user's runs
    decide: Callable[[StartFacts], Run | StartWrite]


@dataclass(frozen=True)
class StartWrite:
    """What a start decision writes: a new run's row, its first events, its row's update."""

    new: Run
    events: Sequence[RunEvent] = ()
    updated: Run | None = None


def deleted_notice(run: Run) -> Notice:
    """The notice of a deleted run: its identity and state, not its input or result."""
    return Notice(
        deleted={
            run.run_id: {
                "owner": run.owner,
                "agent": run.agent,
                "state": run.state.value,
                "thread_id": run.thread_id,
                "created": run.created_at.isoformat(),
                "ended": run.ended_at.isoformat() if run.ended_at else None,
                "last_seq": run.last_seq,
            }
        }
    )


def deleted_run(run_id: str, told: dict[str, Any]) -> Run:
    """A deleted run as its notice tells it."""
    ended = told.get("ended")
    return Run(
        run_id=run_id,
        owner=str(told["owner"]),
        agent=str(told.get("agent", "")),
        state=RunState(told["state"]),
        created_at=datetime.fromisoformat(told["created"]),
        thread_id=str(told.get("thread_id", "")),
        ended_at=datetime.fromisoformat(ended) if ended else None,
        last_seq=int(told.get("last_seq", 0)),
    )
