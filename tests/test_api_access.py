"""Isolation between users, authentication, and precise refusals of bad input."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import Harness
from tests.fakes import gate
from tests.helpers import error_info, read_all, start, struct


async def _fails(
    call: Any, code: grpc.StatusCode, reason: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    exc = caught.value
    assert exc.code() == code, exc.details()
    if reason is not None:
        info = error_info(exc)
        assert info is not None and info.reason == reason and info.domain == "runservice"
    return exc


async def test_another_users_run_is_indistinguishable_from_a_missing_one(server: Harness) -> None:
    """Bob gets NOT_FOUND, with the same message as for a missing run, on every RPC."""
    alice, bob = server.caller("alice"), server.caller("bob")
    run = await start(alice, "gated", gate="iso", before=1)
    missing = str(uuid.uuid4())
    for run_id in (run.run_id, missing):
        calls = [
            bob.GetRun(pb.GetRunRequest(run_id=run_id)),
            bob.Subscribe(pb.SubscribeRequest(run_id=run_id)),
            bob.StopRun(pb.StopRunRequest(run_id=run_id)),
            bob.DeleteRun(pb.DeleteRunRequest(run_id=run_id)),
        ]
        for call in calls:
            exc = await _fails(call, grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
            assert exc.details() == f"run {run_id!r} not found"
    got = (await alice.GetRun(pb.GetRunRequest(run_id=run.run_id))).run
    assert got.state == run_pb2.RUN_STATE_RUNNING  # bob's StopRun did nothing
    gate("iso").set()


async def test_list_and_watch_show_only_the_callers_runs_and_admins_see_all(
    server: Harness,
) -> None:
    """Bob never sees Alice's runs in ListRuns or WatchRuns; an admin sees both users' runs."""
    alice, bob, root = server.caller("alice"), server.caller("bob"), server.caller("root")
    a_active = await start(alice, "gated", gate="lw")
    bob_watch = bob.WatchRuns(pb.WatchRunsRequest())
    snapshot = []
    async for update in bob_watch:
        if update.change == pb.RUN_CHANGE_SNAPSHOT_END:
            break
        snapshot.append(update.run.run_id)
    assert snapshot == []
    a_new = await start(alice, "echo", text="alice's")
    b_new = await start(bob, "echo", text="bob's")
    seen_by_bob = []
    async for update in bob_watch:
        seen_by_bob.append(update.run.run_id)
        if update.run.state == run_pb2.RUN_STATE_SUCCEEDED:
            break
    bob_watch.cancel()
    assert set(seen_by_bob) == {b_new.run_id}
    await read_all(alice, a_new.run_id)

    bob_list = {r.run_id for r in (await bob.ListRuns(pb.ListRunsRequest())).runs}
    assert bob_list == {b_new.run_id}
    alice_list = {r.run_id for r in (await alice.ListRuns(pb.ListRunsRequest())).runs}
    assert alice_list == {a_active.run_id, a_new.run_id}
    everyone = {r.run_id for r in (await root.ListRuns(pb.ListRunsRequest(all_users=True))).runs}
    assert everyone == {a_active.run_id, a_new.run_id, b_new.run_id}
    assert (await root.GetRun(pb.GetRunRequest(run_id=a_new.run_id))).run.owner == "alice"
    await _fails(
        bob.ListRuns(pb.ListRunsRequest(all_users=True)),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_ONLY",
    )
    gate("lw").set()


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "CREDENTIALS_MISSING"),
        ((("authorization", "Bearer not-a-token"),), "CREDENTIALS_INVALID"),
        ((("authorization", "Basic YWxpY2U6cHc="),), "CREDENTIALS_INVALID"),
        ((("authorization", "Bearer "),), "CREDENTIALS_INVALID"),
    ],
)
async def test_missing_or_bad_credentials_are_unauthenticated(
    server: Harness, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    """Calls without a valid bearer token get UNAUTHENTICATED, unary and streaming alike."""
    stub = pb_grpc.RunServiceStub(server.channel)
    await _fails(
        stub.ListAgents(pb.ListAgentsRequest(), metadata=metadata),
        grpc.StatusCode.UNAUTHENTICATED,
        reason,
    )
    await _fails(
        stub.Subscribe(pb.SubscribeRequest(run_id=str(uuid.uuid4())), metadata=metadata),
        grpc.StatusCode.UNAUTHENTICATED,
        reason,
    )


async def test_health_and_reflection_need_no_token(server: Harness) -> None:
    """Health checking and server reflection answer without credentials."""
    health = health_pb2_grpc.HealthStub(server.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service="runservice.v1.RunService"))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for answer in call:
        names = {s.name for s in answer.list_services_response.service}
        assert "runservice.v1.RunService" in names
        break
    call.cancel()


async def test_each_bad_input_gets_its_status_and_creates_nothing(server: Harness) -> None:
    """Unknown agent, bad ids, cursors past the end, oversize input, bad pages: precise codes."""
    alice, bob = server.caller("alice"), server.caller("bob")
    done = await start(alice, "echo", text="one two")
    await read_all(alice, done.run_id)
    before = len((await alice.ListRuns(pb.ListRunsRequest())).runs)
    bad = grpc.StatusCode.INVALID_ARGUMENT

    exc = await _fails(alice.StartRun(pb.StartRunRequest(agent="nope")), bad, "UNKNOWN_AGENT")
    assert "echo" in exc.details()  # the message lists what exists
    await _fails(alice.StartRun(pb.StartRunRequest(agent="")), bad, "INVALID_ARGUMENT")
    await _fails(alice.StartRun(pb.StartRunRequest(agent="bad name!")), bad, "INVALID_ARGUMENT")
    huge = struct(text="x" * 300_000)
    exc = await _fails(
        alice.StartRun(pb.StartRunRequest(agent="echo", input=huge)), bad, "INVALID_INPUT"
    )
    assert "limit" in exc.details()
    await _fails(
        alice.StartRun(pb.StartRunRequest(agent="echo", input=struct(text="x" * 5_000_000))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    await _fails(
        alice.StartRun(pb.StartRunRequest(agent="echo", labels={"bad key!": "v"})),
        bad,
        "INVALID_ARGUMENT",
    )
    for run_id in ("", "garbage", "../../etc", "x" * 36, str(uuid.uuid4()) + "0"):
        await _fails(alice.GetRun(pb.GetRunRequest(run_id=run_id)), bad, "INVALID_ARGUMENT")
        await _fails(alice.Subscribe(pb.SubscribeRequest(run_id=run_id)), bad, "INVALID_ARGUMENT")
    exc = await _fails(
        alice.Subscribe(pb.SubscribeRequest(run_id=done.run_id, from_seq=done.last_seq + 100)),
        grpc.StatusCode.OUT_OF_RANGE,
        "SEQ_OUT_OF_RANGE",
    )
    await _fails(
        alice.Subscribe(pb.SubscribeRequest(run_id=done.run_id, from_seq=-1)),
        bad,
        "INVALID_ARGUMENT",
    )
    await _fails(alice.ListRuns(pb.ListRunsRequest(page_size=-1)), bad, "INVALID_ARGUMENT")
    await _fails(
        alice.ListRuns(pb.ListRunsRequest(page_token="not-a-token")), bad, "INVALID_PAGE_TOKEN"
    )

    for _ in range(2):
        await start(alice, "echo", text="more")
    page = await alice.ListRuns(pb.ListRunsRequest(page_size=1))
    assert page.next_page_token
    await _fails(
        bob.ListRuns(pb.ListRunsRequest(page_size=1, page_token=page.next_page_token)),
        bad,
        "INVALID_PAGE_TOKEN",
    )
    await _fails(
        alice.ListRuns(
            pb.ListRunsRequest(page_size=1, page_token=page.next_page_token, agent="ticker")
        ),
        bad,
        "INVALID_PAGE_TOKEN",
    )
    tampered = (
        page.next_page_token[:-2]
        + ("A" if page.next_page_token[-2] != "A" else "B")
        + page.next_page_token[-1]
    )
    await _fails(
        alice.ListRuns(pb.ListRunsRequest(page_size=1, page_token=tampered)),
        bad,
        "INVALID_PAGE_TOKEN",
    )
    after = len((await alice.ListRuns(pb.ListRunsRequest())).runs)
    assert after == before + 2  # only the two valid StartRun calls created runs


async def test_page_size_above_the_maximum_is_lowered(server: Harness) -> None:
    """A page_size above 1000 is served as 1000, not refused (AIP-158)."""
    alice = server.caller("alice")
    await start(alice, "echo", text="x")
    page = await alice.ListRuns(pb.ListRunsRequest(page_size=100_000))
    assert len(page.runs) == 1 and page.next_page_token == ""


async def test_undecodable_messages_are_refused_after_authentication(server: Harness) -> None:
    """Garbage bytes, NaN inputs and absurd nesting get INVALID_ARGUMENT, never UNKNOWN."""
    token = server.tokens["alice"]
    get_run = server.channel.unary_unary("/runservice.v1.RunService/GetRun")
    subscribe = server.channel.unary_stream("/runservice.v1.RunService/Subscribe")
    for payload in (b"\xff\xff\xff", b"\x0a\x05\xff\xfe\xfd\xfc\xfb"):  # garbage, bad UTF-8
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await get_run(payload)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # who asks comes first
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await get_run(payload, metadata=(("authorization", f"Bearer {token}"),))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in subscribe(payload, metadata=(("authorization", f"Bearer {token}"),)):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    alice = server.caller("alice")
    nan = pb.StartRunRequest(agent="echo")
    nan.input.fields["x"].number_value = float("nan")
    await _fails(alice.StartRun(nan), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    start_run = server.channel.unary_unary("/runservice.v1.RunService/StartRun")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start_run(_deep_start_request(200), metadata=alice.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    length, out = len(payload), bytearray()
    while length > 0x7F:
        out.append((length & 0x7F) | 0x80)
        length >>= 7
    out.append(length)
    return bytes([number << 3 | 2]) + bytes(out) + payload


def _deep_start_request(depth: int) -> bytes:
    """StartRunRequest{agent: "echo", input: {"n": {"n": ... }}} nested `depth` levels."""
    struct_bytes = b""
    for _ in range(depth):
        value = _field(5, struct_bytes)  # Value.struct_value
        entry = _field(1, b"n") + _field(2, value)  # map entry: key, value
        struct_bytes = _field(1, entry)  # Struct.fields
    return _field(1, b"echo") + _field(2, struct_bytes)
