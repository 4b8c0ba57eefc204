"""The run log's window: what a subscriber reads from memory, and what it costs to hold."""

from __future__ import annotations

import gc
import sys
from datetime import UTC, datetime

import pytest

from runservice.api.convert import encode_event
from runservice.domain.model import EncodedEvent, RunEvent, RunState
from runservice.runtime.runlog import RunLog

AT = datetime(2026, 1, 1, tzinfo=UTC)


def _events(log: RunLog, count: int, *, end: bool = False) -> list[RunEvent]:
    """`count` encoded events with the log's next seqs; the last one terminal if `end`."""
    out = []
    for i in range(count):
        seq = log.assign_seq()
        last = end and i == count - 1
        event = RunEvent(
            log.run_id,
            seq,
            AT,
            "run.state" if last else "tick",
            data=None if last else {"i": seq, "pad": "x" * 20},
            state=RunState.SUCCEEDED if last else None,
        )
        event.wire = encode_event(event)
        out.append(event)
    return out


def test_reads_return_each_seq_with_its_wire_form_and_mark_only_the_terminal_event() -> None:
    log = RunLog("r", window_events=100)
    events = _events(log, 10, end=True)
    log.publish(events[:4])
    log.publish(events[4:])
    read = log.read(3, 100, 1 << 20)
    assert read == [EncodedEvent(e.seq, e.wire or b"", e.terminal) for e in events[2:]]
    assert [e.terminal for e in read or []] == [False] * 7 + [True]
    assert log.finished and log.committed_seq == 10
    assert log.read(11, 100, 1 << 20) == []


def test_the_window_drops_the_oldest_events_past_its_bounds() -> None:
    log = RunLog("r", 40, window_events=5)  # a log resumed at seq 40
    log.publish(_events(log, 12))
    assert log.read(47, 100, 1 << 20) is None  # older than the window: read the store
    assert [e.seq for e in log.read(48, 100, 1 << 20) or []] == [48, 49, 50, 51, 52]
    assert [e.seq for e in log.read(50, 2, 1 << 20) or []] == [50, 51]
    one = len(_events(RunLog("x"), 1)[0].wire or b"")
    assert [e.seq for e in log.read(48, 100, 2 * one) or []] == [48, 49]
    assert [e.seq for e in log.read(48, 100, 1) or []] == [48]  # never an empty batch

    by_bytes = RunLog("r", window_bytes=3 * one)
    by_bytes.publish(_events(by_bytes, 6))
    assert by_bytes.read(3, 100, 1 << 20) is None
    assert [e.seq for e in by_bytes.read(4, 100, 1 << 20) or []] == [4, 5, 6]


def test_only_encoded_events_join_the_window() -> None:
    log = RunLog("r")
    with pytest.raises(ValueError, match="encoded"):
        log.publish([RunEvent("r", log.assign_seq(), AT, "tick")])


def test_held_events_are_nothing_the_garbage_collector_visits() -> None:
    """A full window of 4,096 events adds no object the collector tracks: collections
    stay as cheap with thousands of live runs as with none."""
    log = RunLog("r")
    events = _events(log, 4096)
    gc.collect()
    before = len(gc.get_objects())
    log.publish(events)
    del events
    gc.collect()
    assert len(gc.get_objects()) - before < 16
    assert len(log.read(1, 10_000, 1 << 30) or []) == 4096


def test_a_finished_window_keeps_its_events_in_one_buffer_not_one_bytes_object_each() -> None:
    """Once the terminal event is published, the log lets go of every event's own bytes
    object (one buffer stays, freed in one piece) and still reads each wire form exactly."""
    log = RunLog("r", window_events=50)
    events = _events(log, 80, end=True)
    wires = [e.wire or b"" for e in events]
    held = [sys.getrefcount(wire) for wire in wires]
    log.publish(events[:30])
    live = [sys.getrefcount(wire) for wire in wires]
    assert live[:30] == [n + 1 for n in held[:30]]  # the live window holds each one
    log.publish(events[30:])
    finished = [sys.getrefcount(wire) for wire in wires]
    assert finished == held
    assert log.read(30, 100, 1 << 20) is None  # the window's bounds still apply
    read = log.read(31, 100, 1 << 20) or []
    assert read == [EncodedEvent(e.seq, e.wire or b"", e.terminal) for e in events[30:]]
    assert [e.seq for e in log.read(79, 100, 1 << 20) or []] == [79, 80]
    assert [e.seq for e in log.read(40, 3, 1 << 20) or []] == [40, 41, 42]
    assert [e.seq for e in log.read(40, 100, 2 * len(wires[40])) or []] == [40, 41]
    assert [e.seq for e in log.read(40, 100, 1) or []] == [40]  # never an empty batch
    assert log.read(81, 100, 1 << 20) == []
