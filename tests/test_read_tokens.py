"""Read tokens (CreateReadToken, `POST /v1/runs/{id}:readToken`): a token minted for run A
reads A (GetRun, Subscribe, its HTTP events, as a bearer header or `?access_token=`) and
nothing else; expired, tampered, wrong-run and write attempts are refused."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import jwt
import pytest

from runservice.v1 import run_service_pb2 as pb
from tests.conftest import Harness, wait_for
from tests.helpers import error_info, read_all
from tests.test_web_api import Http
from tests.test_web_events import Reading, sse_events

MakeServer = Callable[..., Awaitable[Harness]]
MISSING = "0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d"


@pytest.fixture
async def http(make_server: MakeServer) -> Any:
    """A server with the HTTP edge, and a client of it."""
    server = await make_server(http_listen="127.0.0.1:0")
    async with aiohttp.ClientSession() as session:
        yield Http(server, session)


async def finished_run(server: Harness, user: str = "alice") -> str:
    """The id of a run of `user` that has finished (echo)."""
    caller = server.caller(user)
    request = pb.StartRunRequest(agent="echo")
    request.input.update({"text": "a b c"})
    run = (await caller.StartRun(request)).run
    await read_all(caller, run.run_id)
    return str(run.run_id)


async def mint(server: Harness, run_id: str, user: str = "alice", ttl: int = 0) -> str:
    """A read token of `run_id` minted over gRPC by `user`."""
    request = pb.CreateReadTokenRequest(run_id=run_id)
    if ttl:
        request.ttl.seconds = ttl
    response = await server.caller(user).CreateReadToken(request)
    assert response.run_id == run_id and response.token.startswith("rsr_")
    return str(response.token)


async def refusal(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The code and ErrorInfo reason of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    return caught.value.code(), info.reason if info is not None else ""


async def stream_refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    """The code and reason of a streaming call that must fail before its first message."""

    async def first() -> None:
        async for _ in call:
            return

    return await refusal(first())


async def test_owner_mints_a_token_that_reads_its_run_over_grpc(server: Harness) -> None:
    """The owner mints a token valid for --read-token-ttl (15m); with it, GetRun and
    Subscribe of that run answer what the owner's own credentials get."""
    run_id = await finished_run(server)
    before = time.time()
    response = await server.caller("alice").CreateReadToken(
        pb.CreateReadTokenRequest(run_id=run_id)
    )
    lifetime = response.expire_time.seconds - before
    assert 899 <= lifetime <= 901, lifetime
    reader = server.raw(response.token)
    got = (await reader.GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert got == (await server.caller("alice").GetRun(pb.GetRunRequest(run_id=run_id))).run
    assert await read_all(reader, run_id) == await read_all(server.caller("alice"), run_id)


async def test_read_token_reads_its_run_over_http_as_access_token_and_bearer(http: Http) -> None:
    """Minted over HTTP with a ttl, the token reads the run (GET, catch-up, long-poll, SSE)
    as `?access_token=` and as a bearer header."""
    run_id = await finished_run(http.server)
    minted = await http.ok("POST", f"/v1/runs/{run_id}:readToken", body={"ttl": "300s"})
    assert minted["run_id"] == run_id and minted["token"].startswith("rsr_")
    assert "expire_time" in minted
    token = minted["token"]
    as_param = await http.ok(
        "GET", f"/v1/runs/{run_id}", user=None, params=[("access_token", token)]
    )
    as_header = await http.ok(
        "GET", f"/v1/runs/{run_id}", user=None, headers={"Authorization": f"Bearer {token}"}
    )
    assert as_param == as_header == await http.ok("GET", f"/v1/runs/{run_id}")
    events = await http.ok(
        "GET",
        f"/v1/runs/{run_id}/events",
        user=None,
        params=[("offset", "-1"), ("access_token", token)],
    )
    assert [int(e["seq"]) for e in events] == [1, 2, 3, 4, 5]
    reading = Reading()
    url = f"{http.base}/v1/runs/{run_id}/events?offset=-1&live=sse&access_token={token}"
    async with http.session.get(url) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        async for event in sse_events(response, reading):
            reading.events.append(event)
    assert [int(e["seq"]) for e in reading.data] == [1, 2, 3, 4, 5]
    assert reading.controls[-1]["streamClosed"] is True


async def test_read_token_reads_nothing_but_its_run(server: Harness) -> None:
    """Another run (even the owner's own) is NOT_FOUND; every other call, read or write,
    is PERMISSION_DENIED with reason READ_TOKEN_SCOPE; a read token mints no token."""
    run_id, other = await finished_run(server), await finished_run(server)
    reader = server.raw(await mint(server, run_id))
    for rid in (other, MISSING):
        assert await refusal(reader.GetRun(pb.GetRunRequest(run_id=rid))) == (
            grpc.StatusCode.NOT_FOUND,
            "RUN_NOT_FOUND",
        )
        assert await stream_refusal(reader.Subscribe(pb.SubscribeRequest(run_id=rid))) == (
            grpc.StatusCode.NOT_FOUND,
            "RUN_NOT_FOUND",
        )
    denied = (grpc.StatusCode.PERMISSION_DENIED, "READ_TOKEN_SCOPE")
    unary = [
        reader.StartRun(pb.StartRunRequest(agent="echo")),
        reader.StopRun(pb.StopRunRequest(run_id=run_id)),
        reader.DeleteRun(pb.DeleteRunRequest(run_id=run_id)),
        reader.ListRuns(pb.ListRunsRequest()),
        reader.ListAgents(pb.ListAgentsRequest()),
        reader.CreateReadToken(pb.CreateReadTokenRequest(run_id=run_id)),
        reader.GetServerStats(pb.GetServerStatsRequest()),
    ]
    for call in unary:
        assert await refusal(call) == denied
    assert await stream_refusal(reader.WatchRuns(pb.WatchRunsRequest())) == denied
    assert (await server.caller("alice").GetRun(pb.GetRunRequest(run_id=run_id))).run.run_id


async def test_an_admins_read_token_is_no_admin(server: Harness) -> None:
    """A token minted by an admin for another user's run reads it as its owner, and grants
    nothing of the admin's: GetServerStats is refused."""
    run_id = await finished_run(server, "alice")
    reader = server.raw(await mint(server, run_id, user="root"))
    assert (await reader.GetRun(pb.GetRunRequest(run_id=run_id))).run.owner == "alice"
    assert await refusal(reader.GetServerStats(pb.GetServerStatsRequest())) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "READ_TOKEN_SCOPE",
    )


async def test_read_tokens_refused_over_http_beyond_their_run(http: Http) -> None:
    """Over HTTP: another run 404, a write or a listing 403 READ_TOKEN_SCOPE, whichever way
    the token is sent."""
    run_id, other = await finished_run(http.server), await finished_run(http.server)
    token = await mint(http.server, run_id)
    param = [("access_token", token)]
    bearer = {"Authorization": f"Bearer {token}"}
    missing = await http.call("GET", f"/v1/runs/{other}/events", user=None, params=param)
    assert (missing.status, missing.problem["reason"]) == (404, "RUN_NOT_FOUND")
    for method, path in (
        ("DELETE", f"/v1/runs/{run_id}"),
        ("POST", f"/v1/runs/{run_id}:stop"),
        ("POST", f"/v1/runs/{run_id}:readToken"),
        ("GET", "/v1/runs"),
        ("GET", "/v1/runs:watch"),
        ("POST", "/v1/runs"),
    ):
        for how in ({"params": param}, {"headers": bearer}):
            answer = await http.call(method, path, user=None, **how)  # type: ignore[arg-type]
            assert (answer.status, answer.problem["reason"]) == (403, "READ_TOKEN_SCOPE"), path
    assert (await http.ok("GET", f"/v1/runs/{run_id}"))["run"]["state"] == "RUN_STATE_SUCCEEDED"


async def test_an_expired_read_token_is_refused(http: Http) -> None:
    """A token minted for 1s works, then is UNAUTHENTICATED (TOKEN_EXPIRED) on both edges."""
    run_id = await finished_run(http.server)
    token = await mint(http.server, run_id, ttl=1)
    request = pb.GetRunRequest(run_id=run_id)
    reader = http.server.raw(token)

    async def expired() -> bool:
        try:
            await reader.GetRun(request)
        except grpc.aio.AioRpcError as exc:
            return error_info(exc).reason == "TOKEN_EXPIRED"  # type: ignore[union-attr]
        return False

    await wait_for(expired, limit=10)
    assert await refusal(reader.GetRun(request)) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_EXPIRED",
    )
    answer = await http.call(
        "GET", f"/v1/runs/{run_id}/events", user=None, params=[("access_token", token)]
    )
    assert (answer.status, answer.problem["reason"]) == (401, "TOKEN_EXPIRED")


async def test_tampered_or_foreign_read_tokens_are_refused(http: Http) -> None:
    """A flipped character, another key, `alg: none`, another audience: UNAUTHENTICATED
    CREDENTIALS_INVALID."""
    run_id = await finished_run(http.server)
    token = await mint(http.server, run_id)
    i = len(token) - 5
    flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
    claims = {"sub": "alice", "run_id": run_id, "aud": "runservice:read", "exp": time.time() + 60}
    forged = [
        flipped,
        "rsr_" + jwt.encode(claims, b"another-secret-of-32-bytes-00000", algorithm="HS256"),
        "rsr_" + jwt.encode(claims, None, algorithm="none"),
        "rsr_" + token.removeprefix("rsr_").split(".")[0] + ".e30.",
        "rsr_",
    ]
    for bad in forged:
        assert await refusal(http.server.raw(bad).GetRun(pb.GetRunRequest(run_id=run_id))) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_INVALID",
        ), bad
        answer = await http.call(
            "GET", f"/v1/runs/{run_id}", user=None, params=[("access_token", bad)]
        )
        assert (answer.status, answer.problem["reason"]) == (401, "CREDENTIALS_INVALID")


async def test_a_user_token_in_the_url_is_refused(http: Http) -> None:
    """A user's own token as access_token is 401 with a message naming the Authorization
    header, even where it would be valid; so is a read token sent both ways."""
    run_id = await finished_run(http.server)
    user_token = http.server.tokens["alice"]
    answer = await http.call(
        "GET", f"/v1/runs/{run_id}", user=None, params=[("access_token", user_token)]
    )
    assert (answer.status, answer.problem["reason"]) == (401, "CREDENTIALS_INVALID")
    assert "Authorization header" in answer.problem["detail"]
    assert user_token not in str(answer.body)
    token = await mint(http.server, run_id)
    both = await http.call("GET", f"/v1/runs/{run_id}", params=[("access_token", token)])
    assert both.status == 401


async def test_only_the_owner_or_an_admin_mints(http: Http) -> None:
    """Another user minting for my run gets NOT_FOUND, as for a missing run; a ttl above
    --read-token-ttl or negative is INVALID_ARGUMENT."""
    run_id = await finished_run(http.server)
    bob = http.server.caller("bob")
    for rid in (run_id, MISSING):
        assert await refusal(bob.CreateReadToken(pb.CreateReadTokenRequest(run_id=rid))) == (
            grpc.StatusCode.NOT_FOUND,
            "RUN_NOT_FOUND",
        )
    answer = await http.call("POST", f"/v1/runs/{run_id}:readToken", user="bob")
    assert (answer.status, answer.problem["reason"]) == (404, "RUN_NOT_FOUND")
    for ttl in ("901s", "-5s", "0.5s"):
        too = await http.call("POST", f"/v1/runs/{run_id}:readToken", body={"ttl": ttl})
        assert (too.status, too.problem["reason"]) == (400, "INVALID_ARGUMENT"), ttl
        assert too.problem["metadata"]["field"] == "ttl"


async def test_the_token_of_a_deleted_run_finds_nothing(server: Harness) -> None:
    """Once its run is deleted, a read token answers NOT_FOUND."""
    run_id = await finished_run(server)
    reader = server.raw(await mint(server, run_id))
    await server.caller("alice").DeleteRun(pb.DeleteRunRequest(run_id=run_id))
    assert await refusal(reader.GetRun(pb.GetRunRequest(run_id=run_id))) == (
        grpc.StatusCode.NOT_FOUND,
        "RUN_NOT_FOUND",
    )


async def test_read_tokens_never_reach_the_log(
    http: Http, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests that carry a read token in their URL, answered or refused, leave no trace
    of it in the server's log, at any level."""
    caplog.set_level(logging.DEBUG)
    run_id = await finished_run(http.server)
    token = await mint(http.server, run_id)
    params = [("offset", "-1"), ("access_token", token)]
    await http.ok("GET", f"/v1/runs/{run_id}/events", user=None, params=params)
    await http.call("DELETE", f"/v1/runs/{run_id}", user=None, params=[("access_token", token)])
    await http.call("GET", f"/v1/runs/{run_id}", user=None, params=[("access_token", token + "x")])
    await http.call(
        "GET", f"/v1/runs/{run_id}/events", user=None, params=[("live", "bad"), *params]
    )
    assert caplog.records
    assert token.removeprefix("rsr_") not in caplog.text
    assert token.split(".")[-1] not in caplog.text
