"""Completion webhooks: every run's end is POSTed to the deployment's --webhook-url and to
the run's own allowed webhook_url, signed per Standard Webhooks (checked here with the
reference `standardwebhooks` package), retried with backoff until answered 2xx or too old,
stored in the database across restarts, and listed attempt by attempt to the run's owner.

The receiver is a real aiohttp server on 127.0.0.1; the servers are real, on SQLite files
(and, in the last test, two replicas on one PostgreSQL database)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from runservice import jsonmap
from runservice.api.convert import deliveries_to_proto
from runservice.app import ConfigError, build
from runservice.config import Settings
from runservice.domain.errors import (
    InvalidArgumentError,
    StoreError,
    WebhookUrlNotAllowedError,
)
from runservice.domain.model import STATE_EVENT, Run, RunEvent, RunState, StartRequest
from runservice.domain.webhooks import WebhookPolicy
from runservice.runtime.policies import request_fingerprint
from runservice.store import open_store
from runservice.store.webhooks import SqlWebhookLog
from runservice.v1 import run_pb2, webhook_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.webhooks import SenderSettings, WebhookSender, signed_headers
from runservice.webhooks.signing import WebhookSecretError, read_secrets
from tests.conftest import Harness, start_harness, wait_for
from tests.fakes import FakeClock, gate
from tests.helpers import error_info, struct
from tests.pgserver import PgServer
from tests.webhook_receiver import Receiver, new_secret, write_secret

MakeServer = Callable[..., Awaitable[Harness]]
DELIVERED = webhook_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED
FAILED = webhook_pb2.WEBHOOK_DELIVERY_STATE_FAILED


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver that answers 200 unless told otherwise."""
    found = Receiver(new_secret())
    await found.start()
    yield found
    await found.stop()


def hooks(tmp_path: Path, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    """Server settings that send every run's end to `receiver`, signed with its secret."""
    secret_file = write_secret(tmp_path / "webhook-secret", receiver.secret)
    return {"webhook_url": receiver.url(), "webhook_secret_file": secret_file, **extra}


async def start(server: Harness, agent: str, user: str = "alice", **fields: Any) -> run_pb2.Run:
    """StartRun of `agent` with the request fields `fields` (`input` a dict)."""
    request = pb.StartRunRequest(agent=agent, input=struct(**fields.pop("input", {})), **fields)
    return (await server.caller(user).StartRun(request)).run


async def deliveries(server: Harness, run_id: str, user: str = "alice") -> list[Any]:
    """ListWebhookDeliveries of the run, as `user`."""
    request = pb.ListWebhookDeliveriesRequest(run_id=run_id)
    return list((await server.caller(user).ListWebhookDeliveries(request)).deliveries)


async def settled(server: Harness, run_id: str, count: int = 1) -> list[Any]:
    """The run's `count` deliveries once none is pending."""

    async def done() -> list[Any] | None:
        found = await deliveries(server, run_id)
        finished = len(found) == count and all(d.state in (DELIVERED, FAILED) for d in found)
        return found if finished else None

    result: list[Any] = await wait_for(done, limit=20, interval=0.05)
    return result


def attempts(server: Harness, outcome: str) -> float:
    """The server's count of webhook attempts with `outcome`."""
    assert server.app.metrics is not None
    registry = server.app.metrics.registry
    value = registry.get_sample_value("runservice_webhook_attempts_total", {"outcome": outcome})
    return value or 0.0


async def test_every_end_is_posted_signed_with_the_run_as_get_run_shows_it(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver
) -> None:
    """A run that succeeds, one that fails and one that is stopped each reach the receiver
    once, with a valid signature, `type` run.completed and the run exactly as GetRun shows
    it; the webhook-id is the delivery's id, and the delivery is DELIVERED after one 200."""
    server = await make_server(**hooks(tmp_path, receiver))
    succeeded = await start(server, "echo", input={"text": "a b"})
    failed = await start(server, "refusing")
    stopped = await start(server, "gated", input={"gate": "never"})
    await server.caller("alice").StopRun(pb.StopRunRequest(run_id=stopped.run_id))
    runs = {r.run_id: r for r in (succeeded, failed, stopped)}
    await wait_for(lambda: all(receiver.for_run(i) for i in runs), message="not all arrived")
    assert not receiver.invalid
    states = {}
    for run_id in runs:
        [got] = receiver.for_run(run_id)
        shown = (await server.caller("alice").GetRun(pb.GetRunRequest(run_id=run_id))).run
        assert got.body["type"] == "run.completed"
        assert got.run == jsonmap.to_dict(shown)
        assert got.body["timestamp"] == got.run["end_time"]
        [delivery] = await settled(server, run_id)
        assert delivery.delivery_id == got.webhook_id
        assert delivery.target == webhook_pb2.WEBHOOK_TARGET_DEPLOYMENT
        assert delivery.state == DELIVERED
        assert [(a.attempt, a.http_status, a.error) for a in delivery.attempts] == [(1, 200, "")]
        states[run_id] = got.run["state"]
    assert states == {
        succeeded.run_id: "RUN_STATE_SUCCEEDED",
        failed.run_id: "RUN_STATE_FAILED",
        stopped.run_id: "RUN_STATE_STOPPED",
    }
    assert attempts(server, "delivered") == len(runs)


async def test_a_run_names_its_own_webhook_under_an_allowed_prefix(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver
) -> None:
    """A run's webhook_url under a --webhook-allow prefix gets the run's end too (target
    RUN, its URL shown to the owner), beside the deployment's; GetRun shows the URL."""
    settings = hooks(tmp_path, receiver, webhook_allow=(receiver.url("/runs/"),))
    server = await make_server(**settings)
    own = receiver.url("/runs/42?token=t")
    run = await start(server, "echo", input={"text": "x"}, webhook_url=own)
    assert run.webhook_url == own
    found = await settled(server, run.run_id, count=2)
    assert [d.target for d in found] == [
        webhook_pb2.WEBHOOK_TARGET_DEPLOYMENT,
        webhook_pb2.WEBHOOK_TARGET_RUN,
    ]
    assert [d.url for d in found] == ["", own]  # the deployment's URL is the operator's
    assert {r.path for r in receiver.for_run(run.run_id)} == {"/hook", "/runs/42"}
    assert len(receiver.ids()) == 2 and not receiver.invalid


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/other",
        "http://127.0.0.1:{other}/runs/x",
        "https://127.0.0.1:{port}/runs/x",
        "http://127.0.0.1.attacker.test:{port}/runs/x",
        "http://127.0.0.1:{port}/runsx",
    ],
)
async def test_a_webhook_url_outside_the_prefixes_is_refused_and_nothing_is_written(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver, url: str
) -> None:
    """A webhook_url outside every allowed prefix (another path, port, scheme or host, a
    host that merely starts like the allowed one) is INVALID_ARGUMENT with reason
    WEBHOOK_URL_NOT_ALLOWED and field webhook_url; no run is created."""
    server = await make_server(**hooks(tmp_path, receiver, webhook_allow=(receiver.url("/runs"),)))
    bad = url.format(port=receiver.port, other=receiver.port + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start(server, "echo", input={"text": "x"}, webhook_url=bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info is not None and info.reason == "WEBHOOK_URL_NOT_ALLOWED"
    assert info.metadata["field"] == "webhook_url"
    assert receiver.url("/runs") in (caught.value.details() or "")  # what is allowed
    listed = await server.caller("alice").ListRuns(pb.ListRunsRequest())
    assert not listed.runs


async def test_without_allowed_prefixes_no_run_may_name_a_webhook(
    make_server: MakeServer, receiver: Receiver
) -> None:
    """A server with no --webhook-allow (here none of the webhook options) refuses every
    webhook_url, saying why, and a malformed one as INVALID_ARGUMENT."""
    server = await make_server()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start(server, "echo", webhook_url=receiver.url())
    info = error_info(caught.value)
    assert info is not None and info.reason == "WEBHOOK_URL_NOT_ALLOWED"
    assert "allows no webhook URLs" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await start(server, "echo", webhook_url="not a url")
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_failed_attempt_is_retried_after_a_backoff_until_answered(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver
) -> None:
    """An attempt answered 500 is retried about a second later (the first backoff step)
    with the same webhook-id and body; the second, answered 200, delivers it. Both
    attempts are listed with their outcomes and counted."""
    server = await make_server(**hooks(tmp_path, receiver))
    receiver.answer(500)
    run = await start(server, "echo", input={"text": "x"})
    [delivery] = await settled(server, run.run_id)
    assert delivery.state == DELIVERED
    assert [(a.attempt, a.http_status, a.error) for a in delivery.attempts] == [
        (1, 500, "answered HTTP 500"),
        (2, 200, ""),
    ]
    first, second = receiver.for_run(run.run_id)
    assert first.webhook_id == second.webhook_id == delivery.delivery_id
    assert first.body == second.body
    assert second.at - first.at >= 0.8  # 1 s, less its jitter
    assert (attempts(server, "retrying"), attempts(server, "delivered")) == (1, 1)


async def test_a_delivery_is_given_up_once_older_than_the_max_age(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver
) -> None:
    """A receiver that keeps answering 500 gets attempts until --webhook-max-age has
    passed since the run's end (the last one at that moment); then the delivery is
    FAILED, with its end time, and no more attempts are made."""
    receiver.default = 500
    server = await make_server(**hooks(tmp_path, receiver, webhook_max_age=1.5))
    run = await start(server, "echo", input={"text": "x"})
    [delivery] = await settled(server, run.run_id)
    assert delivery.state == FAILED
    assert delivery.HasField("end_time") and not delivery.HasField("next_attempt_time")
    assert len(delivery.attempts) >= 2
    assert {a.http_status for a in delivery.attempts} == {500}
    assert attempts(server, "gave_up") == 1
    made = len(receiver.for_run(run.run_id))
    assert made == len(delivery.attempts)


async def test_another_users_run_has_no_deliveries_to_show(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver
) -> None:
    """ListWebhookDeliveries of another user's run is NOT_FOUND with GetRun's message; an
    admin sees the run's deliveries, the deployment's URL included."""
    server = await make_server(**hooks(tmp_path, receiver))
    run = await start(server, "echo", input={"text": "x"})
    await settled(server, run.run_id)
    with pytest.raises(grpc.aio.AioRpcError) as listed:
        await deliveries(server, run.run_id, "bob")
    with pytest.raises(grpc.aio.AioRpcError) as got:
        await server.caller("bob").GetRun(pb.GetRunRequest(run_id=run.run_id))
    assert listed.value.code() == grpc.StatusCode.NOT_FOUND
    assert listed.value.details() == got.value.details()
    [seen] = await deliveries(server, run.run_id, "root")
    assert seen.url == receiver.url()


async def test_an_active_run_and_a_run_without_webhooks_list_none(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver
) -> None:
    """A run still active has no deliveries yet, and on a server without webhooks a run
    that ended has none either."""
    server = await make_server(**hooks(tmp_path, receiver))
    active = await start(server, "gated", input={"gate": "later"})
    assert await deliveries(server, active.run_id) == []
    gate("later").set()
    plain = await make_server()
    run = await start(plain, "echo", input={"text": "x"})
    await wait_for(lambda: _ended(plain, run.run_id))
    assert await deliveries(plain, run.run_id) == []


async def _ended(server: Harness, run_id: str) -> bool:
    run = (await server.caller("alice").GetRun(pb.GetRunRequest(run_id=run_id))).run
    return run.state not in (run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING)


async def test_a_pending_delivery_survives_a_restart(
    tmp_path: Path, clock: FakeClock, receiver: Receiver
) -> None:
    """With the receiver down, a run's end is stored as a pending delivery whose attempt
    failed; a new server on the same database sends it once the receiver is back, and
    lists both attempts."""
    await receiver.stop()
    settings = hooks(tmp_path, receiver, stop_grace=1.0, drain_timeout=0.5)
    first = await start_harness(tmp_path / "node", clock, **settings)
    try:
        run = await start(first, "echo", input={"text": "x"})

        async def failed_once() -> bool:
            found = await deliveries(first, run.run_id)
            return bool(found and found[0].attempts)

        await wait_for(failed_once, limit=10)
    finally:
        await first.channel.close()
        await first.app.stop()
    [before] = await deliveries_offline(tmp_path / "node", run.run_id)
    assert before.attempts[0].error == "cannot connect (refused or unreachable)"
    await receiver.start()
    second = await start_harness(tmp_path / "node", clock, **settings)
    try:
        [delivery] = await settled(second, run.run_id)
        assert delivery.state == DELIVERED
        assert [a.http_status for a in delivery.attempts] == [0, 200]
        assert len(receiver.for_run(run.run_id)) == 1 and not receiver.invalid
    finally:
        await second.channel.close()
        await second.app.stop()


async def deliveries_offline(data_dir: Path, run_id: str) -> list[Any]:
    """The run's deliveries read from the database file of a stopped server."""

    store = await open_store(f"sqlite+aiosqlite:///{data_dir / 'runservice.db'}")
    try:
        found = await SqlWebhookLog(store).deliveries(run_id)
    finally:
        await store.close()
    return list(deliveries_to_proto(found, show_deployment_url=True).deliveries)


async def test_the_http_edge_lists_deliveries(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver
) -> None:
    """GET /v1/runs/{id}/webhookDeliveries answers the ListWebhookDeliveriesResponse in
    the proto's JSON mapping; another user's run is 404."""
    server = await make_server(http_listen="127.0.0.1:0", **hooks(tmp_path, receiver))
    run = await start(server, "echo", input={"text": "x"})
    await settled(server, run.run_id)
    url = f"http://127.0.0.1:{server.app.http_port}/v1/runs/{run.run_id}/webhookDeliveries"
    async with aiohttp.ClientSession() as session:
        auth = {"Authorization": f"Bearer {server.tokens['alice']}"}
        async with session.get(url, headers=auth) as response:
            assert response.status == 200
            body = await response.json()
        bob = {"Authorization": f"Bearer {server.tokens['bob']}"}
        async with session.get(url, headers=bob) as response:
            assert response.status == 404
    [delivery] = body["deliveries"]
    assert delivery["state"] == "WEBHOOK_DELIVERY_STATE_DELIVERED"
    assert delivery["attempts"][0]["http_status"] == 200


async def test_a_retried_start_with_another_webhook_url_is_a_reused_request_id(
    make_server: MakeServer, tmp_path: Path, receiver: Receiver
) -> None:
    """The webhook_url is part of what a request_id stands for: the same key with another
    URL is ALREADY_EXISTS (REQUEST_ID_REUSED), with the same URL the same run."""
    server = await make_server(**hooks(tmp_path, receiver, webhook_allow=(receiver.url("/"),)))
    fields = {"input": {"text": "x"}, "request_id": "k1"}
    first = await start(server, "echo", webhook_url=receiver.url("/a"), **dict(fields))
    again = await start(server, "echo", webhook_url=receiver.url("/a"), **dict(fields))
    assert again.run_id == first.run_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start(server, "echo", webhook_url=receiver.url("/b"), **dict(fields))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_request_without_a_webhook_keeps_its_fingerprint() -> None:
    """A request without webhook_url digests as it did before runs had webhooks, so its
    retry across an upgrade is still a retry."""
    plain = StartRequest(agent="echo", input={})
    assert request_fingerprint(plain) == request_fingerprint(plain)
    hooked = StartRequest(agent="echo", input={}, webhook_url="https://h.test/x")
    assert request_fingerprint(hooked) != request_fingerprint(plain)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"webhook_url": "https://hooks.test/x"}, "need --webhook-secret-file"),
        ({"webhook_allow": ("https://hooks.test/",)}, "need --webhook-secret-file"),
        ({"webhook_allow": ("hooks.test",)}, "--webhook-allow: must be an http or https URL"),
        ({"webhook_secret": "not-a-secret"}, "does not start with whsec_"),
        ({"webhook_secret": "whsec_c2hvcnQ="}, "is 5 bytes"),
        ({"webhook_secret": "whsec_!!!"}, "is not base64"),
        ({"webhook_secret": "# only a comment"}, "holds no secret"),
    ],
)
async def test_webhook_options_that_do_not_fit_are_refused_at_start(
    tmp_path: Path, settings: dict[str, Any], says: str
) -> None:
    """Webhooks without a secret file, a prefix that is not a URL, and a secret file that
    is not `whsec_` and 24 to 64 bytes of base64 stop the server before it opens its
    store, with a message naming the option."""
    text = settings.pop("webhook_secret", None)
    if text is not None:
        path = tmp_path / "secret"
        path.write_text(text + "\n")
        settings["webhook_secret_file"] = path
    with pytest.raises(ConfigError) as caught:
        await build(Settings(listen="127.0.0.1:0", data_dir=tmp_path / "data", **settings))
    assert says in str(caught.value)
    assert not (tmp_path / "data" / "runservice.db").exists()


def test_the_signature_is_what_the_reference_implementation_checks(tmp_path: Path) -> None:
    """Headers signed with each secret of a rotation (a file of two) verify with either
    secret in the reference implementation, and not with a third."""

    old, new, other = new_secret(), new_secret(), new_secret()
    path = tmp_path / "secrets"
    path.write_text(f"# current first\n{new}\n{old}\n")
    keys = read_secrets(path)
    body = b'{"type":"run.completed"}'
    headers = signed_headers(keys, "msg_1", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "run.completed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


def test_a_secret_file_that_cannot_be_read_says_so(tmp_path: Path) -> None:
    """A missing secret file is a WebhookSecretError naming it."""
    with pytest.raises(WebhookSecretError, match="cannot read the webhook secret file"):
        read_secrets(tmp_path / "missing")


@pytest.mark.parametrize(
    ("prefix", "url", "allowed"),
    [
        ("https://hooks.test", "https://hooks.test/any/path", True),
        ("https://hooks.test/", "https://HOOKS.test:443/x?y=1", True),
        ("https://hooks.test/runs", "https://hooks.test/runs", True),
        ("https://hooks.test/runs", "https://hooks.test/runs/1", True),
        ("https://hooks.test/runs", "https://hooks.test/runsx", False),
        ("https://hooks.test/runs/", "https://hooks.test/runs", False),
        ("https://hooks.test", "https://hooks.test.attacker.test/", False),
        ("https://hooks.test", "http://hooks.test/", False),
        ("https://hooks.test", "https://hooks.test:8443/", False),
        ("https://hooks.test", "https://user@hooks.test/", None),
        ("https://hooks.test", "https://hooks.test/#frag", None),
        ("https://hooks.test", "ftp://hooks.test/", None),
    ],
)
def test_prefixes_match_scheme_host_port_and_whole_path_segments(
    prefix: str, url: str, allowed: bool | None
) -> None:
    """A prefix allows URLs of its scheme, host (in any case) and port (the default one
    named or not) under its path, by whole segments; URLs with credentials, a fragment
    or another scheme are malformed (None)."""
    policy = WebhookPolicy((prefix,))
    if allowed:
        policy.check(url)
        return
    expected = WebhookUrlNotAllowedError if allowed is False else InvalidArgumentError
    with pytest.raises(expected) as caught:
        policy.check(url)
    assert (type(caught.value) is WebhookUrlNotAllowedError) == (allowed is False)


def test_the_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    """Retries wait about 1, 2, 4, 8... seconds (±20%), never more than the cap."""
    sender = WebhookSender(_NoQueue(), SenderSettings((b"k" * 32,), max_retry=300.0))
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0)):
        for _ in range(50):
            assert 0.8 * base <= sender.backoff(attempt) <= 1.2 * base
    assert max(sender.backoff(30) for _ in range(50)) == 300.0


class _NoQueue:
    """A queue that is never used (only the backoff is under test)."""

    async def claim(self, now_us: int, limit: int, claim_until_us: int) -> list[Any]:
        """Nothing is due."""
        return []

    async def record(self, *args: Any) -> None:
        """Records nothing."""

    async def release(self, claims: Any) -> None:
        """Releases nothing."""

    async def release_all(self) -> int:
        """Nothing was claimed."""
        return 0

    async def forget_finished(self, limit: int = 500) -> int:
        """Nothing to forget."""
        return 0


async def test_replicas_on_postgresql_share_the_deliveries(
    tmp_path: Path, clock: FakeClock, receiver: Receiver, postgres: PgServer
) -> None:
    """Two replicas on one PostgreSQL database: runs ended on either are each delivered
    once (the replicas claim due deliveries with SKIP LOCKED), signatures valid, and
    either replica lists every run's delivery."""
    db = postgres.create_database()
    settings = hooks(tmp_path, receiver, db=postgres.url(db), stop_grace=1.0, drain_timeout=0.5)
    servers: list[Harness] = []
    try:
        for i in range(2):
            servers.append(await start_harness(tmp_path / f"replica-{i}", clock, **settings))
        runs = [await start(s, "echo", input={"text": "x"}) for s in servers * 5]
        ids = {r.run_id for r in runs}
        await wait_for(lambda: {r.run["run_id"] for r in receiver.received} >= ids, limit=20)
        for run in runs:
            [delivery] = await settled(servers[0], run.run_id)
            assert delivery.state == DELIVERED
        assert len(receiver.received) == len(runs) and not receiver.invalid
    finally:
        for server in servers:
            await server.channel.close()
            await server.app.stop()
        postgres.drop_database(db)


async def test_a_runs_end_and_its_deliveries_are_committed_together(tmp_path: Path) -> None:
    """The deliveries of a run's end are written by the commit of that end: one per
    target, once however often the end is committed, and none when the commit fails."""
    store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'runs.db'}")
    try:
        store.webhook_rows.enable("https://hooks.test/all", lambda run: run.run_id.encode())
        log = SqlWebhookLog(store)
        at = datetime.now(UTC)
        run = Run("r1", "alice", "echo", RunState.RUNNING, at, webhook_url="https://own.test/")
        await store.commit([run], [], [])
        assert await log.deliveries("r1") == []
        ended = run.replace(state=RunState.SUCCEEDED, ended_at=at, last_seq=1)
        end = RunEvent("r1", 1, at, STATE_EVENT, state=RunState.SUCCEEDED)
        await store.commit([], [end], [ended])
        await store.commit([], [], [ended])  # the same end again
        found = await log.deliveries("r1")
        assert [(d.target.value, d.url, d.state.value) for d in found] == [
            ("DEPLOYMENT", "https://hooks.test/all", "PENDING"),
            ("RUN", "https://own.test/", "PENDING"),
        ]
        other = Run("r2", "alice", "echo", RunState.RUNNING, at)
        await store.commit([other], [], [])
        with pytest.raises(StoreError):  # seq 1 of r1 again: the whole commit is refused
            await store.commit([], [end], [other.replace(state=RunState.FAILED, ended_at=at)])
        assert await log.deliveries("r2") == []
    finally:
        await store.close()
