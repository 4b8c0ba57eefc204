"""Resume from a checkpoint across real server processes: a resumable agent's run that
its server stopped executing (SIGKILL, a drain that had to interrupt it) goes on from its
last checkpoint when a server starts again; --max-resumes bounds crash loops; agents
that are not resumable are interrupted as before."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from tests import test_process_restart as restart
from tests.serverproc import assert_gap_free, running_server, start_server, wait_for
from tests.test_process_restart import Client, connect

TEST_AGENTS = ["--agent", "crasher=tests.fakes:crasher", "--agent", "fragile=tests.fakes:fragile"]


# The process tests' fixtures: a data directory, alice's token in it, clients closed after.
data_dir = restart.data_dir
token = restart.token
clients = restart.clients


def data(event: run_pb2.RunEvent) -> dict[str, Any]:
    """An event's data."""
    return json_format.MessageToDict(event.data)


async def reached_tick(client: Client, run_id: str, i: int) -> bool:
    """True once the run's log holds a tick with data i >= `i`."""
    run = await client.get(run_id)
    if run.last_seq < i + 1:
        return False
    call = client.stub.Subscribe(pb.SubscribeRequest(run_id=run_id), metadata=client.md)
    try:
        async for response in call:
            for event in response.events:
                if event.type == "tick" and data(event).get("i", 0) >= i:
                    return True
            if response.events and response.events[-1].seq >= run.last_seq:
                return False
    finally:
        call.cancel()
    return False


async def test_a_counter_killed_mid_run_resumes_from_its_checkpoint(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """SIGKILL mid-run, then a new server: the run goes on from its last checkpoint, its
    log gap-free with the resume visible, and ends SUCCEEDED with every tick from 1 to
    count: those up to the checkpoint, then those after the resumed event."""
    count, every = 60, 5
    server = await start_server(data_dir)
    client = connect(clients, server, token)
    run = await client.start("counter", count=count, interval=0.05, checkpoint_every=every)
    await wait_for(lambda: reached_tick(client, run.run_id, 13), limit=30)
    await server.kill()
    async with running_server(data_dir, port=server.port) as again:
        client = connect(clients, again, token)
        done = await client.wait_terminal(run.run_id)
        events = await client.log(run.run_id)
    assert done.state == run_pb2.RUN_STATE_SUCCEEDED, done
    assert done.resume_count == 1
    assert json_format.MessageToDict(done.result) == {"count": count}
    assert done.progress.done == count
    assert_gap_free(events)
    resumes = [e for e in events if e.type == "run.state" and e.resumed_from_seq]
    assert len(resumes) == 1 and resumes[0].state == run_pb2.RUN_STATE_RUNNING
    resumed = resumes[0]
    before = [
        data(e)["i"] for e in events if e.type == "tick" and e.seq <= resumed.resumed_from_seq
    ]
    after = [data(e)["i"] for e in events if e.type == "tick" and e.seq > resumed.seq]
    assert before and before[-1] % every == 0, before  # the checkpoint's tick
    assert before + after == list(range(1, count + 1))
    superseded = [e for e in events if resumed.resumed_from_seq < e.seq < resumed.seq]
    assert all(e.type == "tick" for e in superseded)


async def test_an_agent_that_crashes_every_attempt_ends_interrupted_after_max_resumes(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """A resumable agent that kills its server on every attempt is resumed --max-resumes
    times, then ends INTERRUPTED with a message naming the limit."""
    args = [*TEST_AGENTS, "--max-resumes", "2"]
    server = await start_server(data_dir, args=args)
    client = connect(clients, server, token)
    run = await client.start("crasher")
    await server.wait_exit()
    port = server.port
    for _ in range(2):  # each start resumes it, and it kills that server too (maybe
        # before the server answers its health check)
        with contextlib.suppress(RuntimeError):
            server = await start_server(data_dir, args=args, port=port)
            await server.wait_exit()
    async with running_server(data_dir, args=args, port=port) as last:
        client = connect(clients, last, token)
        done = await client.wait_terminal(run.run_id)
        events = await client.log(run.run_id)
    assert done.state == run_pb2.RUN_STATE_INTERRUPTED and done.resume_count == 2
    assert "--max-resumes" in done.error.message
    assert_gap_free(events)
    ticks = [data(e)["attempt"] for e in events if e.type == "tick"]
    assert ticks == [0, 1, 2]
    resumed = [e.resumed_from_seq for e in events if e.resumed_from_seq]
    assert len(resumed) == 2


async def test_an_agent_that_is_not_resumable_is_interrupted_as_before(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """A checkpoint alone does not make a run resumable: its agent must be declared so."""
    server = await start_server(data_dir, args=TEST_AGENTS)
    client = connect(clients, server, token)
    run = await client.start("fragile")
    await wait_for(lambda: reached_tick(client, run.run_id, 1), limit=30)
    await server.kill()
    async with running_server(data_dir, args=TEST_AGENTS, port=server.port) as again:
        client = connect(clients, again, token)
        done = await client.wait_terminal(run.run_id)
    assert done.state == run_pb2.RUN_STATE_INTERRUPTED and done.resume_count == 0


async def test_a_drain_that_interrupts_a_resumable_run_leaves_it_to_resume(
    data_dir: Path, token: str, clients: list[Client]
) -> None:
    """SIGTERM with a short drain: the counter cannot finish in time, so it is left
    unfinished, and the next server resumes it to the end."""
    args = ["--drain-timeout", "0.2s", "--stop-grace", "0.5s"]
    server = await start_server(data_dir, args=args)
    client = connect(clients, server, token)
    run = await client.start("counter", count=40, interval=0.05, checkpoint_every=4)
    await wait_for(lambda: reached_tick(client, run.run_id, 6), limit=30)
    await server.terminate()
    async with running_server(data_dir, args=args, port=server.port) as again:
        client = connect(clients, again, token)
        done = await client.wait_terminal(run.run_id)
        events = await client.log(run.run_id)
    assert done.state == run_pb2.RUN_STATE_SUCCEEDED and done.resume_count == 1
    assert_gap_free(events)
    text = json.dumps([e.type for e in events])
    assert "SUCCEEDED" not in text  # types only: no terminal event before the resume
    assert sum(1 for e in events if e.type == "run.state" and e.state > 2) == 1
