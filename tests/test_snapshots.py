"""Snapshots, "snapshot, then tail": the state of a run's output stored beside its log as
the run goes, so that a subscriber joining late with `snapshot` gets one message and the
tail rather than the whole history (over gRPC, the Python client, SSE, a read token, after
a restart); and the maker's rules: when a snapshot is made, by whom, what it holds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format

from runservice.client import AsyncRunClient
from runservice.domain.errors import StoreError
from runservice.domain.model import RunEvent, Snapshot
from runservice.runtime.snapshots import Snapshots
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness, wait_for
from tests.fakes import FakeClock, gate
from tests.helpers import TERMINAL, start
from tests.test_read_tokens import mint
from tests.test_web_api import Http
from tests.test_web_events import Event, Reading, offset, sse_events, sse_url

MakeServer = Callable[..., Awaitable[Harness]]


# -- servers and readers --------------------------------------------------------------------


async def subscribe(
    caller: Any, run_id: str, from_seq: int = 0, *, snapshot: bool = False
) -> list[pb.SubscribeResponse]:
    """Every response of a Subscribe, until the stream ends."""
    request = pb.SubscribeRequest(run_id=run_id, from_seq=from_seq, snapshot=snapshot)
    return [response async for response in caller.Subscribe(request)]


async def subscribe_until(
    caller: Any, run_id: str, last: int, from_seq: int = 0, *, snapshot: bool = False
) -> list[pb.SubscribeResponse]:
    """The responses of a Subscribe until one holds an event with seq >= `last` (of a run
    still active); then the stream is cancelled."""
    request = pb.SubscribeRequest(run_id=run_id, from_seq=from_seq, snapshot=snapshot)
    call = caller.Subscribe(request)
    got = []
    async for response in call:
        got.append(response)
        if response.events and response.events[-1].seq >= last:
            break
    call.cancel()
    return got


def events_of(responses: Sequence[pb.SubscribeResponse]) -> list[run_pb2.RunEvent]:
    """The events of `responses`, in order."""
    return [event for response in responses for event in response.events]


def tokens_text(events: Sequence[run_pb2.RunEvent]) -> str:
    """The text of the `token` events among `events`, concatenated (as the reducer does)."""
    return "".join(
        e.text for e in events if e.type == "token" and e.WhichOneof("payload") == "text"
    )


def snapshot_then_tail(
    responses: Sequence[pb.SubscribeResponse],
) -> tuple[run_pb2.RunSnapshot, list[run_pb2.RunEvent]]:
    """The snapshot a Subscribe sent first (asserting it came first, alone, and only
    there), and the events after it (asserting they start right after its seq, gap-free)."""
    first, rest = responses[0], responses[1:]
    assert first.HasField("snapshot") and not first.events
    assert not any(response.HasField("snapshot") for response in rest)
    tail = events_of(rest)
    snapshot = first.snapshot
    assert [e.seq for e in tail] == list(range(snapshot.seq + 1, snapshot.seq + 1 + len(tail)))
    return snapshot, tail


def data_of(snapshot: run_pb2.RunSnapshot) -> Any:
    """A snapshot's data as a Python value."""
    return json_format.MessageToDict(snapshot.data)


async def finished_echo(server: Harness, words: int) -> tuple[str, list[run_pb2.RunEvent]]:
    """Runs echo over `words` words to its end; its id and its whole log."""
    caller = server.caller("alice")
    run = await start(caller, "echo", text=" ".join(f"w{i}" for i in range(words)))
    events = events_of(await subscribe(caller, run.run_id))
    assert events[-1].state == run_pb2.RUN_STATE_SUCCEEDED
    return run.run_id, events


async def paused_talker(server: Harness, before: int, name: str, after: int = 0) -> str:
    """A talker run that has emitted `before` tokens and waits at the gate `name` (then
    emits `after` more)."""
    run = await start(server.caller("alice"), "talker", before=before, gate=name, after=after)

    async def at_gate() -> bool:
        got = await server.caller("alice").GetRun(pb.GetRunRequest(run_id=run.run_id))
        return bool(got.run.last_seq == before + 1)

    await wait_for(at_gate, message=f"the talker did not reach its gate after {before} tokens")
    return str(run.run_id)


# -- gRPC -----------------------------------------------------------------------------------


async def test_a_late_subscriber_gets_one_snapshot_and_the_tail_of_a_20000_token_run(
    make_server: MakeServer,
) -> None:
    """A finished 20,000-token echo run: Subscribe with snapshot sends one snapshot
    ({"text": every token so far}) and then the events after it, in a small fraction of
    the messages of a full replay, and the text rebuilt from them equals the replay's."""
    server = await make_server()
    run_id, replay = await finished_echo(server, 20_000)
    full = await subscribe(server.caller("alice"), run_id)
    joined = await subscribe(server.caller("alice"), run_id, snapshot=True)
    snapshot, tail = snapshot_then_tail(joined)
    assert tail[-1].seq == replay[-1].seq and tail[-1].state in TERMINAL
    assert len(tail) < 10 and len(joined) <= 3 and len(full) >= 10 * len(joined)
    rebuilt = data_of(snapshot)["text"] + tokens_text(tail)
    assert rebuilt == tokens_text(replay) == "".join(f"w{i}" for i in range(20_000))


async def test_the_python_client_and_a_read_token_start_from_the_snapshot_too(
    make_server: MakeServer,
) -> None:
    """AsyncRunClient.subscribe(snapshot=True) yields the RunSnapshot first, then the
    events after it; the bearer of a read token of the run gets the same stream; without
    snapshot the client yields events only, as before."""
    server = await make_server(snapshot_every=100)
    run_id, replay = await finished_echo(server, 450)
    expected = await subscribe(server.caller("alice"), run_id, snapshot=True)
    snapshot, tail = snapshot_then_tail(expected)
    async with AsyncRunClient(server.address, token=server.tokens["alice"]) as client:
        items = [item async for item in client.subscribe(run_id, snapshot=True)]
        plain = [event async for event in client.subscribe(run_id)]
    assert isinstance(items[0], run_pb2.RunSnapshot) and items[0] == snapshot
    assert items[1:] == tail
    assert plain == replay
    reader = server.raw(await mint(server, run_id))
    assert await subscribe(reader, run_id, snapshot=True) == expected


async def test_a_subscriber_joining_mid_run_with_snapshot_follows_live_gap_free_to_the_end(
    make_server: MakeServer,
) -> None:
    """A run paused after 1,050 tokens (snapshots every 100): a subscriber with snapshot
    gets the one of token 1,000 and the 50 after it, then follows the run live as it
    emits 2,000 more (snapshots being made meanwhile) to its terminal event, without a
    gap; the text it rebuilds equals the full replay's."""
    server = await make_server(snapshot_every=100)
    caller = server.caller("alice")
    run_id = await paused_talker(server, 1050, "mid-run", after=2000)
    stream = aiter(caller.Subscribe(pb.SubscribeRequest(run_id=run_id, snapshot=True)))
    responses = [await anext(stream)]
    while not responses[-1].events or responses[-1].events[-1].seq < 1051:
        responses.append(await anext(stream))
    assert responses[0].snapshot.seq == 1001  # token 1,000: the RUNNING event is seq 1
    gate("mid-run").set()
    responses.extend([response async for response in stream])
    snapshot, tail = snapshot_then_tail(responses)
    assert tail[-1].state == run_pb2.RUN_STATE_SUCCEEDED and len(tail) == 2050 + 1
    replay = events_of(await subscribe(caller, run_id))
    assert data_of(snapshot)["text"] + tokens_text(tail) == tokens_text(replay)
    assert tokens_text(replay) == "".join(f"t{i} " for i in range(3050))


async def test_an_agent_s_own_snapshots_replace_the_reducer_s(make_server: MakeServer) -> None:
    """An agent that calls ctx.snapshot after its 25th token (snapshots every 10
    events): its data is the run's snapshot from then on, written at the next due point
    as of the seq of its call, and the reducer makes none after it; ctx.snapshot refuses
    data that is not JSON and data over --max-event-size, naming the limit."""
    server = await make_server(snapshot_every=10, max_event_size=2048)
    caller = server.caller("alice")
    run = await start(caller, "noting", count=35, at=25, too_large=3000)
    replay = events_of(await subscribe(caller, run.run_id))
    terminal = replay[-1]
    assert terminal.state == run_pb2.RUN_STATE_SUCCEEDED
    refused = json_format.MessageToDict(terminal.data)["refused"]
    assert refused[0].startswith("TypeError: ctx.snapshot takes a JSON value")
    assert refused[1].startswith("EventTooLargeError: a snapshot of 3002 bytes")
    assert "limit of 2048 bytes (--max-event-size)" in refused[1]
    snapshot, tail = snapshot_then_tail(await subscribe(caller, run.run_id, snapshot=True))
    assert (snapshot.seq, data_of(snapshot)) == (26, {"tokens": 25})  # token 25 is seq 26
    assert tokens_text(tail) == "".join(f"n{i} " for i in range(26, 36))
    stored = await server.app.store.latest_snapshot(run.run_id)
    assert stored is not None and json.loads(stored.data) == {"tokens": 25}


async def test_without_a_snapshot_subscribe_with_snapshot_is_a_plain_subscribe(
    make_server: MakeServer,
) -> None:
    """Runs that have no snapshot (a ticker's events are not tokens; an echo of nothing
    emits none): Subscribe with snapshot answers exactly what a plain Subscribe does."""
    server = await make_server(snapshot_every=2)
    caller = server.caller("alice")
    ticking = await start(caller, "ticker", count=5)
    silent = await start(caller, "echo", text="")
    for run in (ticking, silent):
        plain = await subscribe(caller, run.run_id)
        assert events_of(plain)[-1].state == run_pb2.RUN_STATE_SUCCEEDED
        assert await subscribe(caller, run.run_id, snapshot=True) == plain
        assert await server.app.store.latest_snapshot(run.run_id) is None


async def test_a_from_seq_beyond_the_snapshot_gets_plain_events_from_from_seq(
    make_server: MakeServer,
) -> None:
    """A snapshot is used only if it covers from_seq - 1 or later: on a live run (its
    snapshot in memory) and on a finished one read from the store, from_seq past it
    gives the events from from_seq, and from_seq at or before it the snapshot first."""
    server = await make_server(snapshot_every=10)
    caller = server.caller("alice")
    run_id = await paused_talker(server, 25, "beyond")  # snapshots at seq 11 and 21
    beyond = await subscribe_until(caller, run_id, 26, 24, snapshot=True)
    assert not beyond[0].HasField("snapshot") and [e.seq for e in events_of(beyond)] == [24, 25, 26]
    for from_seq in (0, 10, 22):
        joined = await subscribe_until(caller, run_id, 26, from_seq, snapshot=True)
        snapshot, tail = snapshot_then_tail(joined)
        assert snapshot.seq == 21 and [e.seq for e in tail] == [22, 23, 24, 25, 26]
    gate("beyond").set()
    await wait_for(lambda: ended(server, run_id))
    server.clock.advance(3600)
    await wait_for(lambda: evicted(server, run_id))  # from here on, read from the store
    assert await subscribe(caller, run_id, 28, snapshot=True) == []  # its end: nothing
    for from_seq in (0, 27):  # the last snapshot covers the last token, seq 26
        joined = await subscribe(caller, run_id, from_seq, snapshot=True)
        snapshot, tail = snapshot_then_tail(joined)
        assert snapshot.seq == 26 and [e.seq for e in tail] == [27]


async def ended(server: Harness, run_id: str) -> bool:
    """Whether the run is terminal."""
    got = await server.caller("alice").GetRun(pb.GetRunRequest(run_id=run_id))
    return got.run.state in TERMINAL


def evicted(server: Harness, run_id: str) -> bool:
    """Sweeps the server's memory; whether the run has left it (once its last subscriber
    has, and the memory grace period is over)."""
    server.app.manager.sweep()
    return not server.app.manager.in_memory(run_id)


async def test_snapshots_survive_a_restart(make_server: MakeServer) -> None:
    """Snapshots are stored: after the server stops (a finished run; a run interrupted
    by the shutdown, whose snapshot covers its last token) another server on the same
    SQLite file starts both from their snapshots, and the texts rebuilt equal the logs'."""
    first = await make_server("restarted", snapshot_every=100)
    finished, _ = await finished_echo(first, 1000)
    interrupted = await paused_talker(first, 250, "never")
    await first.channel.close()
    await first.app.stop()
    second = await make_server("restarted", snapshot_every=100)
    caller = second.caller("alice")
    for run_id, last_token in ((finished, 1001), (interrupted, 251)):
        replay = events_of(await subscribe(caller, run_id))
        snapshot, tail = snapshot_then_tail(await subscribe(caller, run_id, snapshot=True))
        assert snapshot.seq == last_token and tail == replay[last_token:]
        assert data_of(snapshot)["text"] + tokens_text(tail) == tokens_text(replay)
    assert replay[-1].state == run_pb2.RUN_STATE_INTERRUPTED


# -- SSE ------------------------------------------------------------------------------------


async def read_sse_url(http: Http, url: str, headers: dict[str, str] | None = None) -> list[Event]:
    """Every event of an SSE response, until the server ends it."""
    reading = Reading()
    sent = {**http.auth("alice"), **(headers or {})}
    async with http.session.get(url, headers=sent) as response:
        assert response.status == 200, await response.text()
        return [event async for event in sse_events(response, reading)]


def sse_data(events: Sequence[Event]) -> list[dict[str, Any]]:
    """The run events of the `data` events, in order (as JSON)."""
    return [message for event in events if event.kind == "data" for message in event.json]


def sse_text(messages: Sequence[dict[str, Any]]) -> str:
    """The text of the token events among `messages`, concatenated."""
    return "".join(m["text"] for m in messages if m["type"] == "token" and "text" in m)


async def test_over_sse_a_late_reader_gets_a_snapshot_event_then_the_tail(
    make_server: MakeServer,
) -> None:
    """The same 20,000-token run read over SSE with snapshot=true: an `event: snapshot`
    first ({"seq", "data"}, its id the offset after its seq), then the events after it,
    in a small fraction of the data events of a full read; the text rebuilt is the full
    read's. A reconnect with that id as Last-Event-ID resumes right after it (no snapshot
    again), and the reads that answer JSON arrays refuse snapshot=true."""
    server = await make_server(http_listen="127.0.0.1:0")
    run_id, _ = await finished_echo(server, 20_000)
    async with aiohttp.ClientSession() as session:
        http = Http(server, session)
        full = await read_sse_url(http, sse_url(http, run_id))
        joined = await read_sse_url(http, sse_url(http, run_id, snapshot="true"))
        first = joined[0]
        assert first.kind == "snapshot" and joined[1].kind == "control"
        seq = first.json["seq"]
        assert first.id == offset(seq) and joined[1].json["streamNextOffset"] == offset(seq)
        tail = sse_data(joined[2:])
        assert [int(m["seq"]) for m in tail] == [seq + 1] and "state" in tail[-1]
        data_events = sum(e.kind == "data" for e in full)
        assert sum(e.kind == "data" for e in joined) * 10 <= data_events
        assert first.json["data"]["text"] + sse_text(tail) == sse_text(sse_data(full))
        resumed = await read_sse_url(
            http, sse_url(http, run_id, snapshot="true"), {"Last-Event-ID": first.id}
        )
        assert [e.kind for e in resumed] == ["data", "control"] and sse_data(resumed) == tail
        for query in ([("snapshot", "true")], [("snapshot", "yes"), ("live", "sse")]):
            refused = await http.call("GET", f"/v1/runs/{run_id}/events", params=query)
            assert refused.status == 400 and "snapshot" in refused.problem["detail"]


# -- the maker ------------------------------------------------------------------------------


def token(seq: int, text: str | None, type: str = "token", size: int = 10) -> RunEvent:
    """An event as the maker sees it: its seq assigned, its wire form `size` bytes."""
    event = RunEvent("run", seq, FakeClock().now(), type, text=text)
    event.wire = b"x" * size
    return event


def made(snapshots: Snapshots, events: Sequence[RunEvent]) -> list[tuple[int, Any]]:
    """(seq, data) of each snapshot the maker made while observing `events`."""
    out = []
    for event in events:
        snapshot = snapshots.observe(event)
        if snapshot is not None:
            out.append((snapshot.seq, json.loads(snapshot.data)))
    return out


def test_the_reducer_makes_a_snapshot_every_n_events_and_at_the_end() -> None:
    """every=3: snapshots at the 3rd and 6th token, each with all the text so far and the
    seq of its last token; the end makes one of the rest, and nothing when nothing
    changed since the last one."""
    snapshots = Snapshots("run", every=3, max_bytes=10**6)
    events = [token(seq, f"{seq} ") for seq in range(2, 9)]
    assert made(snapshots, events) == [(4, {"text": "2 3 4 "}), (7, {"text": "2 3 4 5 6 7 "})]
    last = snapshots.final()
    assert last is not None and (last.seq, json.loads(last.data)) == (8, {"text": "2 3 4 5 6 7 8 "})
    assert snapshots.final() is None


def test_the_reducer_makes_a_snapshot_every_max_bytes_of_events() -> None:
    """max_bytes=100 with events of 40 bytes: a snapshot at the 3rd (120 bytes), the
    count starting over after each."""
    snapshots = Snapshots("run", every=1000, max_bytes=100)
    events = [token(seq, "a", size=40) for seq in range(1, 8)]
    assert [seq for seq, _ in made(snapshots, events)] == [3, 6]


def test_an_event_that_is_not_a_token_with_text_ends_the_reducer() -> None:
    """The reducer stands only for runs of token text events: after a `tick` (or a token
    without text) it makes no snapshot, not even at the end, and has no state; a run that
    never emitted a token text event has none either."""
    for other in (token(3, None, type="tick"), token(3, None)):
        snapshots = Snapshots("run", every=2)
        assert made(snapshots, [token(1, "a"), token(2, "b")]) == [(2, {"text": "ab"})]
        assert made(snapshots, [other, *(token(s, "c") for s in range(4, 9))]) == []
        assert snapshots.final() is None and snapshots.state() == ""
    assert Snapshots("run").final() is None and Snapshots("run").state() == ""


def test_an_agent_s_data_replaces_the_reducer_and_is_made_when_due() -> None:
    """After record(), tokens no longer change the state; the agent's data is made at the
    next due point (as of the seq it was recorded at), at once when one is already due,
    and at the end when it changed since the last one made."""
    snapshots = Snapshots("run", every=3)
    assert snapshots.record(1, '{"step":1}') is None and snapshots.agent_made
    assert made(snapshots, [token(2, "a"), token(3, "b"), token(4, "c")]) == [(1, {"step": 1})]
    assert made(snapshots, [token(s, "d") for s in range(5, 9)]) == []  # due, nothing new
    now = snapshots.record(8, '{"step":2}')  # already due: made at once
    assert now is not None and (now.seq, now.data) == (8, '{"step":2}')
    assert snapshots.record(8, '{"step":3}') is None
    last = snapshots.final()
    assert last is not None and (last.seq, last.data) == (8, '{"step":3}')
    assert snapshots.state() == '{"step":3}'


def test_state_and_restore_go_on_from_a_checkpointed_state() -> None:
    """state() is the data of the next snapshot; restore() goes on from such a state: the
    reducer's ({"text"}) is extended by later tokens, another is the agent's, and ""
    starts afresh; none of them is made again until something changes."""
    snapshots = Snapshots("run", every=100)
    made(snapshots, [token(2, "ab"), token(3, "cd")])
    state = snapshots.state()
    assert json.loads(state) == {"text": "abcd"}

    restored = Snapshots("run", every=100)
    restored.restore(3, state)
    assert restored.final() is None and restored.state() == state
    made(restored, [token(4, "ef")])
    last = restored.final()
    assert last is not None and (last.seq, json.loads(last.data)) == (4, {"text": "abcdef"})

    restored.restore(9, '{"plan":[1,2]}')
    assert restored.agent_made and restored.state() == '{"plan":[1,2]}'
    assert made(restored, [token(s, "x") for s in range(10, 12)]) == []
    assert restored.final() is None and restored.state() == '{"plan":[1,2]}'

    restored.restore(12, "")
    assert not restored.agent_made and restored.state() == "" and restored.final() is None
    made(restored, [token(13, "z")])
    last = restored.final()
    assert last is not None and (last.seq, json.loads(last.data)) == (13, {"text": "z"})
    with pytest.raises(ValueError):
        restored.restore(1, "{not json")


def test_a_reducer_state_over_max_data_is_never_made() -> None:
    """The reducer's text only grows: once its snapshot would exceed max_data bytes (as
    JSON, UTF-8), it makes none from then on."""
    snapshots = Snapshots("run", every=1, max_data=20)
    assert made(snapshots, [token(1, "é" * 3)]) == [(1, {"text": "é" * 3})]  # 17 bytes
    assert made(snapshots, [token(2, "éé"), token(3, "a")]) == []  # 21 bytes
    assert snapshots.final() is None and snapshots.state() == ""


async def test_only_a_committed_snapshot_becomes_the_latest() -> None:
    """committed() (put_beside's done-callback) keeps a snapshot whose future resolved,
    never one the store refused or that was cancelled, nor one older than the latest."""
    snapshots = Snapshots("run")
    loop = asyncio.get_running_loop()
    done, refused, cancelled = (loop.create_future() for _ in range(3))
    done.set_result(None)
    refused.set_exception(StoreError("the run could not be stored"))
    cancelled.cancel()
    snapshots.committed(Snapshot("run", 12, "{}"), refused)
    snapshots.committed(Snapshot("run", 13, "{}"), cancelled)
    assert snapshots.latest is None
    newer = Snapshot("run", 9, '{"n":9}')
    snapshots.committed(newer, done)
    snapshots.committed(Snapshot("run", 4, '{"n":4}'), done)
    assert snapshots.latest == newer
