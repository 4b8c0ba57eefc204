"""Webhooks through a receiver outage and a server restart: every completion arrives."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from faults.harness import Load, Node, load_on, state_name, wait_all_terminal
from faults.report import Row
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import webhook_pb2
from tests.serverproc import wait_for
from tests.webhook_receiver import Receiver, new_secret, write_secret

RUNS = 100
LONG_SHARE = 0.4  # of the runs: still running when the server goes down
OUTAGE_S = 20.0
ARRIVAL_LIMIT_S = 90.0  # after the receiver is back: the longest backoff step is 16 s here


async def start_runs(load: Load) -> list[str]:
    """RUNS ticker runs for alice and bob: most end within a second, the rest take 5-15 s."""
    ids = []
    for i in range(RUNS):
        user = ("alice", "bob")[i % 2]
        if random.random() < LONG_SHARE:
            run = await load.start("ticker", user, count=random.randint(100, 300), interval=0.05)
        else:
            run = await load.start("ticker", user, count=random.randint(1, 20), interval=0.02)
        ids.append(run.run_id)
    return ids


def delivery_id(run_id: str) -> str:
    """The webhook-id of a run's delivery to the deployment's webhook."""
    return f"msg_{run_id}_deployment"


async def any_ended(load: Load, ids: list[str]) -> bool:
    """True once one of the runs has ended (its delivery is stored, not yet sent)."""
    for run_id in ids:
        run = await load.get(run_id, load.owners[run_id])
        if state_name(run.state) not in ("PENDING", "RUNNING"):
            return True
    return False


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_webhooks_survive_a_receiver_outage_and_a_restart(
    node: Node, row: Row, tmp_path: Path, stop: str
) -> None:
    """100 runs, short and long, each POSTed to a local receiver that checks every
    signature with the reference Standard Webhooks library. The receiver goes down for
    20 s; in between, once runs have ended into pending deliveries, the server is stopped
    (SIGTERM: drained, long runs interrupted; or SIGKILL: runs in flight ended INTERRUPTED
    by the restart) and restarted. Once the receiver is back, every run's completion
    arrives at least once, every signature valid, each with the run's final state, and
    ListWebhookDeliveries shows every delivery DELIVERED."""
    receiver = Receiver(new_secret())
    await receiver.start()
    secret = write_secret(tmp_path / "webhook.secret", receiver.secret)
    node.args = [
        *("--webhook-url", receiver.url("/hook")),
        *("--webhook-secret-file", str(secret)),
        *("--drain-timeout", "2s", "--stop-grace", "1s"),
    ]
    await node.start()
    try:
        async with load_on(node) as load:
            ids = await start_runs(load)
            await wait_for(lambda: len(receiver.ids()) >= RUNS // 4, limit=30)
            await receiver.stop()
            down = time.monotonic()
            before_outage = len(receiver.ids())
            await wait_for(lambda: _pending_ended(load, ids, receiver), limit=30, interval=0.1)
            await (node.terminate() if stop == "sigterm" else node.kill())
            await node.start()
            await asyncio.sleep(max(0.0, down + OUTAGE_S - time.monotonic()))  # the outage
            await receiver.start()
            back = time.monotonic()
            wanted = {delivery_id(run_id) for run_id in ids}
            await wait_for(
                lambda: wanted <= receiver.ids(),
                limit=ARRIVAL_LIMIT_S,
                interval=0.2,
                message=f"{len(wanted - receiver.ids())} completions never arrived",
            )
            all_in_s = time.monotonic() - back
            await wait_all_terminal(load, ids)
            finals = {r: state_name((await load.get(r, load.owners[r])).state) for r in ids}
            listed = [await _delivery(load, run_id) for run_id in ids]
    finally:
        await receiver.stop()
    exit_code = await node.terminate()
    arrived = Counter(r.webhook_id for r in receiver.received if r.valid)
    wrong_state = [
        r.run["run_id"]
        for r in receiver.received
        if r.valid and r.run["state"].removeprefix("RUN_STATE_") != finals[r.run["run_id"]]
    ]
    row.set(
        runs=RUNS,
        delivered_before_outage=before_outage,
        posts_received=len(receiver.received),
        completions_arrived=len(wanted & set(arrived)),
        repeats=sum(n - 1 for n in arrived.values()),
        invalid_signatures=len(receiver.invalid),
        wrong_state=len(wrong_state),
        final_states=dict(Counter(finals.values())),
        seconds_to_all_after_receiver_back=round(all_in_s, 1),
        most_attempts=max(len(d.attempts) for d in listed),
        not_delivered_in_listing=sum(
            d.state != webhook_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED for d in listed
        ),
        exit_code=exit_code,
    )
    assert not receiver.invalid
    assert wanted <= set(arrived)
    assert not wrong_state, wrong_state[:5]
    assert all(d.state == webhook_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED for d in listed)
    assert exit_code == 0


async def _pending_ended(load: Load, ids: list[str], receiver: Receiver) -> bool:
    """True once a run whose completion has not arrived has ended: a pending delivery."""
    arrived = receiver.ids()
    waiting = [run_id for run_id in ids if delivery_id(run_id) not in arrived]
    return await any_ended(load, waiting[:20])


async def _delivery(load: Load, run_id: str) -> webhook_pb2.WebhookDelivery:
    """The run's one delivery, as its owner lists it."""
    response = await load.stub.ListWebhookDeliveries(
        pb.ListWebhookDeliveriesRequest(run_id=run_id),
        metadata=load.node.md(load.owners[run_id]),
        timeout=10,
    )
    assert len(response.deliveries) == 1, response
    delivery: webhook_pb2.WebhookDelivery = response.deliveries[0]
    return delivery
