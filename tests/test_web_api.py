"""The run API over HTTP/JSON (--http-listen), against real servers: each route answers
what grpcurl shows for the same call on the same server; refusals are problem+json with
the gRPC edge's reason and code; the same authentication (tokens, mTLS) and options."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format

from runservice.app import ConfigError, ListenError, build
from runservice.config import Settings
from runservice.tokens import add_token
from tests.conftest import Harness, wait_for
from tests.fakes import gate
from tests.helpers import sh
from tests.pgserver import PgServer
from tests.serverproc import free_port, running_server, serve_until_exit
from tests.test_metrics import metrics_url, parse, scrape, value
from tests.test_security_auth import _CA
from tests.test_workers import UNREACHABLE_DB, complete_log, connections, serving_workers

ROOT = Path(__file__).resolve().parent.parent
GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"
MakeServer = Callable[..., Awaitable[Harness]]
TERMINAL = {
    "RUN_STATE_SUCCEEDED",
    "RUN_STATE_FAILED",
    "RUN_STATE_STOPPED",
    "RUN_STATE_INTERRUPTED",
    "RUN_STATE_TIMED_OUT",
}
PROBLEM = "application/problem+json"


@dataclass
class Answer:
    """An HTTP response, read whole."""

    status: int
    headers: Any
    body: Any  # parsed JSON, or the text when it is not JSON

    @property
    def problem(self) -> dict[str, Any]:
        """The problem+json body (asserting it is one)."""
        assert self.headers["Content-Type"] == PROBLEM, (self.status, self.body)
        assert isinstance(self.body, dict)
        return self.body


class Http:
    """An HTTP client of one server's edge, authenticated as a test user."""

    def __init__(self, server: Harness, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.base = f"http://127.0.0.1:{server.app.http_port}"

    def auth(self, user: str | None) -> dict[str, str]:
        """The Authorization header of `user` (none for None)."""
        return {"Authorization": f"Bearer {self.server.tokens[user]}"} if user else {}

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "alice",
        body: Any = None,
        params: Sequence[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """Sends one request; the answer, read whole."""
        sent = {**self.auth(user), **(headers or {})}
        data = None
        if body is not None:
            data = body if isinstance(body, str | bytes) else json.dumps(body)
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base + path, data=data, params=params, headers=sent
        ) as response:
            text = await response.text()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return Answer(response.status, response.headers, parsed)

    async def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a call that must succeed."""
        answer = await self.call(method, path, **kwargs)
        assert answer.status == 200, (answer.status, answer.body)
        assert answer.headers["Content-Type"] == "application/json"
        return answer.body

    async def start(self, agent: str, user: str = "alice", **fields: Any) -> dict[str, Any]:
        """Starts a run over HTTP; the run."""
        run: dict[str, Any] = (
            await self.ok("POST", "/v1/runs", user=user, body={"agent": agent, **fields})
        )["run"]
        return run

    async def finished(self, run_id: str, user: str = "alice") -> dict[str, Any]:
        """The run once terminal (polled over HTTP)."""

        async def terminal() -> dict[str, Any] | None:
            run: dict[str, Any] = (await self.ok("GET", f"/v1/runs/{run_id}", user=user))["run"]
            return run if run["state"] in TERMINAL else None

        done: dict[str, Any] = await wait_for(terminal, limit=20)
        return done


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client session, closed afterwards."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def http(make_server: MakeServer, session: aiohttp.ClientSession) -> Http:
    """A server with the HTTP edge on a free port, and a client of it."""
    server = await make_server(http_listen="127.0.0.1:0")
    return Http(server, session)


def grpcurl_binary() -> str:
    """grpcurl, from .tools/bin (make grpcurl) or the PATH; skips (fails with CI) without."""
    found = str(GRPCURL) if GRPCURL.exists() else shutil.which("grpcurl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("grpcurl is not installed: `make test` installs it into .tools/bin")
        pytest.skip("grpcurl is not installed (make grpcurl)")
    return found


async def grpcurl(server: Harness, method: str, request: Any, user: str = "alice") -> Any:
    """What grpcurl prints for `method` called with `request` (JSON) as `user`, parsed."""
    proc = await asyncio.create_subprocess_exec(
        grpcurl_binary(),
        "-plaintext",
        "-H",
        f"authorization: Bearer {server.tokens[user]}",
        "-d",
        json.dumps(request),
        server.address,
        f"runservice.v1.RunService/{method}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


# -- the routes, as grpcurl shows them ------------------------------------------------------


async def test_start_get_list_stop_delete_answer_what_grpcurl_shows(http: Http) -> None:
    """Each route's JSON equals grpcurl's for the same call on the same server: StartRun
    (a retry with the same request_id, once the run finished), GetRun, ListRuns, StopRun,
    DeleteRun and ListAgents."""
    start = {"agent": "echo", "input": {"text": "a b c"}, "request_id": "req-1"}
    started = await http.start(**start)
    assert started["owner"] == "alice" and started["agent"] == "echo"
    assert started["state"] in ("RUN_STATE_PENDING", "RUN_STATE_RUNNING")
    run_id = started["run_id"]
    await http.finished(run_id)

    over_http = await http.ok("POST", "/v1/runs", body=start)
    assert over_http == await grpcurl(http.server, "StartRun", start)
    assert over_http["run"]["run_id"] == run_id
    assert over_http["run"]["input"] == {"text": "a b c"}

    got = await http.ok("GET", f"/v1/runs/{run_id}")
    assert got == await grpcurl(http.server, "GetRun", {"run_id": run_id})
    assert got["run"]["state"] == "RUN_STATE_SUCCEEDED" and got["run"]["last_seq"] == "5"

    listed = await http.ok("GET", "/v1/runs", params=[("state", "SUCCEEDED")])
    assert listed == await grpcurl(http.server, "ListRuns", {"states": ["RUN_STATE_SUCCEEDED"]})
    assert [run["run_id"] for run in listed["runs"]] == [run_id]

    ticking = await http.start("ticker", input={"count": 100_000, "interval": 0.01})
    stopped = await http.ok("POST", f"/v1/runs/{ticking['run_id']}:stop", body={"reason": "enough"})
    assert stopped["run"]["state"] == "RUN_STATE_STOPPED"
    assert stopped["run"]["stop_reason"] == "enough"
    again = {"run_id": ticking["run_id"], "reason": "enough"}
    assert stopped == await grpcurl(http.server, "StopRun", again)  # unchanged: it had ended

    assert await http.ok("DELETE", f"/v1/runs/{run_id}") == {}
    assert await grpcurl(http.server, "DeleteRun", {"run_id": ticking["run_id"]}) == {}
    assert (await http.call("GET", f"/v1/runs/{run_id}")).status == 404

    agents = await http.ok("GET", "/v1/agents")
    assert agents == await grpcurl(http.server, "ListAgents", {})
    assert {"echo", "ticker"} <= {agent["name"] for agent in agents["agents"]}


async def test_list_filters_and_pages_like_list_runs(http: Http) -> None:
    """Filters (state by either name, agent, thread_id, labels) and paging: the page_token
    of a page brings the next, and each page equals grpcurl's for the same query."""
    ids = []
    for i in range(3):
        run = await http.start(
            "echo", input={"text": str(i)}, labels={"team": "red", "n": str(i)}, thread_id="t"
        )
        await http.finished(run["run_id"])
        ids.append(run["run_id"])
    other = await http.start("echo", input={"text": "x"}, labels={"team": "blue"})
    await http.finished(other["run_id"])

    query = [
        ("state", "RUN_STATE_SUCCEEDED"),
        ("state", "FAILED"),
        ("agent", "echo"),
        ("thread_id", "t"),
        ("label", "team=red"),
        ("page_size", "2"),
    ]
    first = await http.ok("GET", "/v1/runs", params=query)
    request = {
        "states": ["RUN_STATE_SUCCEEDED", "RUN_STATE_FAILED"],
        "agent": "echo",
        "thread_id": "t",
        "labels": {"team": "red"},
        "page_size": 2,
    }
    assert first == await grpcurl(http.server, "ListRuns", request)
    assert [run["run_id"] for run in first["runs"]] == ids[::-1][:2]
    token = first["next_page_token"]
    second = await http.ok("GET", "/v1/runs", params=[*query, ("page_token", token)])
    assert second == await grpcurl(http.server, "ListRuns", {**request, "page_token": token})
    assert [run["run_id"] for run in second["runs"]] == [ids[0]]
    assert "next_page_token" not in second

    blue = await http.ok("GET", "/v1/runs", params=[("label", "team=blue")])
    assert [run["run_id"] for run in blue["runs"]] == [other["run_id"]]
    everyone = await http.ok("GET", "/v1/runs", user="root", params=[("all_users", "true")])
    assert len(everyone["runs"]) == 4
    assert await http.ok("GET", "/v1/runs", user="bob") == {}  # bob's runs: none


# -- refusals -------------------------------------------------------------------------------


async def test_refusals_are_problems_with_the_grpc_reason_and_code(http: Http) -> None:
    """Bad JSON, an unknown field, an unknown agent, a run that is not there (or is
    another user's), all_users without the admin role, a query parameter the route does
    not take, a run_id in a stop body: problem+json with the status of the gRPC code, and
    the same reason and code the gRPC edge gives."""
    run = await http.start("echo", input={"text": "mine"})
    absent = "0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d"
    deep = '{"agent": "echo", "input": ' + '{"a": ' * 3000 + "1" + "}" * 3001
    cases = [
        (("POST", "/v1/runs"), {"body": "{not json"}, 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (("POST", "/v1/runs"), {"body": [1]}, 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (("POST", "/v1/runs"), {"body": deep}, 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (
            ("POST", "/v1/runs"),
            {"body": {"agent": "echo", "input": {"x": float("nan")}}},
            400,
            "INVALID_ARGUMENT",
            "INVALID_INPUT",
        ),
        (
            ("POST", "/v1/runs"),
            {"body": {"agent": "echo", "colour": "red"}},
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            ("POST", "/v1/runs"),
            {"body": '{"agent": "echo"}', "headers": {"Content-Type": "text/plain"}},
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            ("POST", "/v1/runs"),
            {"body": {"agent": "nope"}},
            400,
            "INVALID_ARGUMENT",
            "UNKNOWN_AGENT",
        ),
        (("GET", f"/v1/runs/{absent}"), {}, 404, "NOT_FOUND", "RUN_NOT_FOUND"),
        (("GET", f"/v1/runs/{run['run_id']}"), {"user": "bob"}, 404, "NOT_FOUND", "RUN_NOT_FOUND"),
        (("GET", "/v1/runs/not-a-uuid"), {}, 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (
            ("GET", "/v1/runs"),
            {"params": [("all_users", "true")]},
            403,
            "PERMISSION_DENIED",
            "ADMIN_ONLY",
        ),
        (
            ("GET", "/v1/runs"),
            {"params": [("status", "RUNNING")]},
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            ("GET", "/v1/runs"),
            {"params": [("state", "SLEEPING")]},
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (
            ("GET", "/v1/runs"),
            {"params": [("page_token", "forged")]},
            400,
            "INVALID_ARGUMENT",
            "INVALID_PAGE_TOKEN",
        ),
        (
            ("POST", f"/v1/runs/{run['run_id']}:stop"),
            {"body": {"run_id": absent}},
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        (("DELETE", f"/v1/runs/{absent}"), {}, 404, "NOT_FOUND", "RUN_NOT_FOUND"),
    ]
    for (method, path), kwargs, status, code, reason in cases:
        answer = await http.call(method, path, **kwargs)
        problem = answer.problem
        assert (answer.status, problem["code"], problem["reason"]) == (status, code, reason), (
            method,
            path,
            kwargs,
            problem,
        )
        assert problem["status"] == status and problem["type"] == "about:blank"
        assert problem["domain"] == "runservice" and problem["detail"]
    mine = await http.call("GET", f"/v1/runs/{run['run_id']}", user="bob")
    missing = await http.call("GET", f"/v1/runs/{absent}", user="bob")
    assert mine.problem["detail"] == missing.problem["detail"].replace(absent, run["run_id"])


async def test_a_run_still_active_cannot_be_deleted(http: Http) -> None:
    """DELETE of a running run: 400 RUN_ACTIVE (FAILED_PRECONDITION); once stopped, 200."""
    run = await http.start("gated", input={"gate": "web-delete"})
    refused = await http.call("DELETE", f"/v1/runs/{run['run_id']}")
    assert (refused.status, refused.problem["reason"]) == (400, "RUN_ACTIVE")
    assert refused.problem["code"] == "FAILED_PRECONDITION"
    gate("web-delete").set()
    await http.finished(run["run_id"])
    assert await http.ok("DELETE", f"/v1/runs/{run['run_id']}") == {}


async def test_no_or_a_bad_token_is_401_with_www_authenticate(http: Http) -> None:
    """No credentials: 401 CREDENTIALS_MISSING; an unknown token or another scheme: 401
    CREDENTIALS_INVALID; both say `WWW-Authenticate: Bearer`. Routes that do not exist
    answer 404 without asking for credentials, as gRPC answers UNIMPLEMENTED."""
    missing = await http.call("GET", "/v1/runs", user=None)
    assert (missing.status, missing.problem["reason"]) == (401, "CREDENTIALS_MISSING")
    assert missing.problem["code"] == "UNAUTHENTICATED"
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="runservice"'
    for header in ("Bearer not-a-token", "Basic YWxpY2U6c2VjcmV0"):
        bad = await http.call("GET", "/v1/agents", user=None, headers={"Authorization": header})
        assert (bad.status, bad.problem["reason"]) == (401, "CREDENTIALS_INVALID")
        assert bad.headers["WWW-Authenticate"].startswith("Bearer ")
        assert 'error="invalid_token"' in bad.headers["WWW-Authenticate"]
    events = await http.call(
        "GET", "/v1/runs/0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d/events", user=None
    )
    assert events.status == 401

    nowhere = await http.call("GET", "/v1/nowhere", user=None)
    assert (nowhere.status, nowhere.problem["code"]) == (404, "NOT_FOUND")
    assert "reason" not in nowhere.problem
    wrong = await http.call("PUT", "/v1/runs", user=None)
    assert (wrong.status, wrong.problem["code"]) == (405, "UNIMPLEMENTED")
    assert set(wrong.headers["Allow"].split(",")) == {"GET", "POST"}


async def test_an_internal_error_is_500_with_an_error_id_and_never_its_text(
    http: Http, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception is a 500 INTERNAL problem quoting an error id; its text is
    in the server log, never in the body."""

    def broken() -> None:
        raise RuntimeError("secret detail: /etc/shadow")

    monkeypatch.setattr(http.server.app.manager, "list_agents", broken)
    answer = await http.call("GET", "/v1/agents")
    problem = answer.problem
    assert (answer.status, problem["code"], problem["reason"]) == (
        500,
        "INTERNAL",
        "INTERNAL_ERROR",
    )
    error_id = problem["metadata"]["error_id"]
    assert error_id in problem["detail"]
    assert "secret" not in json.dumps(problem)
    assert "secret detail" in caplog.text and error_id in caplog.text


async def test_a_body_over_the_receive_limit_is_413(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """The HTTP edge takes bodies up to --max-receive-message-size, as gRPC takes
    messages: beyond it, 413 RESOURCE_EXHAUSTED, and nothing started."""
    server = await make_server(http_listen="127.0.0.1:0", max_receive_message_size=64 * 1024)
    http = Http(server, session)
    body = {"agent": "echo", "input": {"text": "x" * 100_000}}
    answer = await http.call("POST", "/v1/runs", body=body)
    assert (answer.status, answer.problem["code"]) == (413, "RESOURCE_EXHAUSTED")
    assert await http.ok("GET", "/v1/runs") == {}  # no run was started


# -- the same authentication and options ----------------------------------------------------


async def test_a_client_certificate_names_the_user_over_https(
    make_server: MakeServer, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """With --tls-cert/--tls-key/--tls-client-ca, the HTTP edge speaks TLS and a client
    certificate from the CA is the user, as on gRPC (--admin applies too); without a
    certificate the handshake fails."""
    ca = _CA("runservice test CA")
    cert, key = ca.issue("localhost", san="localhost")
    for name, data in (("server.pem", cert), ("server.key", key), ("ca.pem", ca.cert)):
        (tmp_path / name).write_bytes(data)
    server = await make_server(
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
        admins=("ops",),
        http_listen="localhost:0",
    )
    url = f"https://localhost:{server.app.http_port}"
    for cn in ("dora", "ops"):
        client_cert, client_key = ca.issue(cn)
        (tmp_path / f"{cn}.pem").write_bytes(client_cert)
        (tmp_path / f"{cn}.key").write_bytes(client_key)
        context = ssl.create_default_context(cadata=ca.cert.decode())
        context.load_cert_chain(tmp_path / f"{cn}.pem", tmp_path / f"{cn}.key")
        body = json.dumps({"agent": "echo"})
        headers = {"Content-Type": "application/json"}
        async with session.post(f"{url}/v1/runs", data=body, headers=headers, ssl=context) as r:
            assert r.status == 200
            assert (await r.json())["run"]["owner"] == cn
        async with session.get(f"{url}/v1/runs?all_users=true", ssl=context) as r:
            assert r.status == (200 if cn == "ops" else 403)
    bare = ssl.create_default_context(cadata=ca.cert.decode())
    with pytest.raises(aiohttp.ClientError):
        async with session.get(f"{url}/v1/agents", ssl=bare) as r:
            await r.read()


async def test_insecure_no_auth_holds_only_on_loopback_for_http_too(tmp_path: Path) -> None:
    """--insecure-no-auth: anonymous calls over HTTP on loopback; a non-loopback
    --http-listen is refused at startup, as a non-loopback --listen is."""
    settings = Settings(
        listen="127.0.0.1:0", data_dir=tmp_path, insecure_no_auth=True, http_listen="0.0.0.0:0"
    )
    with pytest.raises(ConfigError, match="--http-listen is a loopback address"):
        await build(settings)
    app = await build(
        Settings(
            listen="127.0.0.1:0",
            data_dir=tmp_path,
            insecure_no_auth=True,
            http_listen="127.0.0.1:0",
        )
    )
    try:
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{app.http_port}/v1/runs"
            body = json.dumps({"agent": "echo"})
            headers = {"Content-Type": "application/json"}
            async with client.post(url, data=body, headers=headers) as response:
                assert (await response.json())["run"]["owner"] == "anonymous"
    finally:
        await app.stop()


async def test_a_busy_or_malformed_http_address_is_refused_in_one_line(tmp_path: Path) -> None:
    """A port another process holds: ListenError naming --http-listen; not HOST:PORT:
    ConfigError; either way nothing is left listening."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(
            listen="127.0.0.1:0", data_dir=tmp_path, http_listen=f"127.0.0.1:{port}"
        )
        with pytest.raises(ListenError, match=f"--http-listen 127.0.0.1:{port}") as caught:
            await build(settings)
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="--http-listen must be HOST:PORT"):
        await build(Settings(listen="127.0.0.1:0", data_dir=tmp_path, http_listen="nowhere"))
    app = await build(Settings(listen="127.0.0.1:0", data_dir=tmp_path))  # the lock was let go
    assert app.http_port == 0 and app.web is None
    await app.stop()


async def test_http_requests_are_counted_by_route_and_status(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """runservice_http_requests_total counts by route name (never a path) and status, and
    the request durations are observed per route."""
    server = await make_server(http_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
    http = Http(server, session)
    run = await http.start("echo", input={"text": "a"})
    await http.call("GET", f"/v1/runs/{run['run_id']}")
    await http.call("GET", "/v1/runs/0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d")
    await http.call("GET", "/v1/nowhere")
    await http.call("GET", "/v1/agents", user=None)
    samples = parse(await scrape(metrics_url(server)))
    counted = "runservice_http_requests_total"
    assert value(samples, counted, route="StartRun", status="200") == 1
    assert value(samples, counted, route="GetRun", status="200") == 1
    assert value(samples, counted, route="GetRun", status="404") == 1
    assert value(samples, counted, route="Unmatched", status="404") == 1
    assert value(samples, counted, route="ListAgents", status="401") == 1
    assert value(samples, "runservice_http_request_duration_seconds_count", route="GetRun") == 2
    assert value(samples, "runservice_auth_refusals_total", reason="CREDENTIALS_MISSING") == 1


# -- the documentation, and --workers -------------------------------------------------------


def http_doc_commands() -> list[str]:
    """Every command of docs/http.md's ```sh blocks, continuation lines joined, but those
    of "Turning it on" (the server and the variables: the test sets them up itself)."""
    text = (ROOT / "docs" / "http.md").read_text()
    text = re.sub(r"\n## Turning it on\n.*?(?=\n## )", "\n", text, flags=re.S)
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(blocks))
    return [line.strip() for line in joined.splitlines() if line.strip()]


ASSIGNMENT = re.compile(r"([A-Z_]+)=\$\((.*)\)")
TOKEN_NOT_IN_URLS = re.compile(r"[?&]access_token=\$TOKEN")
"""A user's credentials never appear in a URL of the examples (only read tokens do)."""


async def run_commands(commands: list[str], env: dict[str, str]) -> list[str]:
    """Runs each command in bash, in order; a `NAME=$(...)` line sets NAME in `env` for
    the commands after it. Each must exit 0 (28, curl's "time is up", with --max-time)."""
    outputs: list[str] = []
    for command in commands:
        assigned = ASSIGNMENT.fullmatch(command)
        code, out = await sh(assigned.group(2) if assigned else command, env)
        expected = 28 if "--max-time" in command else 0
        assert code == expected, f"{command}\n{out}"
        if assigned:
            env[assigned.group(1)] = out.strip()
            assert out.strip() and out.strip() != "null", command
        outputs.append(out)
    return outputs


class Printed:
    """What each command printed, found by the command itself or a fragment of it."""

    def __init__(self, commands: list[str], outputs: list[str]) -> None:
        self._by_command = dict(zip(commands, outputs, strict=True))

    def __call__(self, fragment: str) -> str:
        """The output of the command `fragment` is, or else of the one it is part of."""
        if fragment in self._by_command:
            return self._by_command[fragment]
        found = [out for command, out in self._by_command.items() if fragment in command]
        assert len(found) == 1, (fragment, list(self._by_command))
        return found[0]


async def test_every_curl_example_of_the_http_docs_runs(tmp_path: Path) -> None:
    """Each command of docs/http.md runs against a live server (`NAME=$(...)` lines set
    NAME for the commands after them) and prints what the page says it prints."""
    if shutil.which("curl") is None or shutil.which("jq") is None:
        if os.environ.get("CI"):
            pytest.fail("curl and jq are missing (Debian's packages `curl` and `jq`)")
        pytest.skip("curl and jq are needed")
    commands = http_doc_commands()
    assert len(commands) >= 20, commands
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = add_token(data_dir / "tokens.toml", "dev", ["admin"])
    port = free_port()
    args = ["--http-listen", f"127.0.0.1:{port}", "--http-cors-origin", "https://app.example.com"]
    async with running_server(data_dir, args=args) as server:
        env = {**os.environ, "URL": f"http://127.0.0.1:{port}", "TOKEN": token}
        outputs = await run_commands(commands, env)
        assert server.returncode is None
    run_id = env["RUN_ID"]
    output = Printed(commands, outputs)

    got = json.loads(output('"$URL/v1/runs/$RUN_ID" -H'))["run"]
    assert got["run_id"] == run_id and got["labels"] == {"team": "docs"}
    sse = '"$URL/v1/runs/$RUN_ID/events?offset=-1&live=sse"'
    followed = output(f'curl -sN {sse} -H "authorization: Bearer $TOKEN"')
    assert followed.count("event: data") >= 1 and '"streamClosed":true' in followed
    assert followed.count('"type":"tick"') == 5
    listed = json.loads(output("state=SUCCEEDED&label=team=docs"))
    assert [run["run_id"] for run in listed["runs"]] == [run_id]
    page = json.loads(output("page_token=$PAGE"))
    assert [run["run_id"] for run in page["runs"]] == [run_id]
    stopped = json.loads(output(":stop"))["run"]
    assert stopped["state"] == "RUN_STATE_STOPPED" and stopped["stop_reason"] == "enough"
    assert output("-X DELETE").strip() == "{}"
    assert "ticker" in output('/v1/agents" -H')
    catch_up = output('curl -s -i "$URL/v1/runs/$RUN_ID/events?offset=-1"')
    assert "Stream-Closed: true" in catch_up
    assert "Stream-Next-Offset: 0000000000000000_0000000000000007" in catch_up
    after_three = json.loads(output("offset=0000000000000000_0000000000000003"))
    assert [int(e["seq"]) for e in after_three] == [4, 5, 6, 7]
    assert "Stream-Closed: true" in output("curl -s -I")
    resumed = output("Last-Event-ID: 0000000000000000_0000000000000005")
    assert '"seq":"6"' in resumed and '"seq":"5"' not in resumed
    assert output("Last-Event-ID: 0000000000000000_0000000000000007").startswith("HTTP/1.1 204")
    assert "HTTP/1.1 204" in output("$RUN_ID/events?offset=now&live=long-poll")
    slow = output("$SLOW/events?offset=now&live=long-poll")
    assert "HTTP/1.1 200" in slow and '"seq":"3"' in slow and "Stream-Cursor: " in slow
    assert "RUN_CHANGE_SNAPSHOT_END" in output("runs:watch")
    gone = output('curl -s "$URL/v1/runs/$LONG" -H "authorization: Bearer $TOKEN"')
    assert '"reason":"RUN_NOT_FOUND"' in gone
    check_read_token_and_cors_examples(output, env, commands, run_id)
    for check in (
        check_stream_examples,
        check_unauthorized_example,
        check_snapshot_example,
        check_input_example,
    ):
        check(output)


def check_input_example(output: Printed) -> None:
    """The "Input to a running run" example answers the input event it shows."""
    event = json.loads(output(":input"))["event"]
    assert event["type"] == "input" and event["data"] == {"approve": True, "note": "go"}


def check_snapshot_example(output: Printed) -> None:
    """The "Snapshot, then tail" example prints what the page says: the 3 tokens of the
    full read, then the snapshot (covering them) and the terminal event alone."""
    assert output("wc -l").strip() == "3"
    joined = output("snapshot=true")
    assert joined.startswith("id: 0000000000000000_0000000000000004\nevent: snapshot\n")
    assert 'data:{"seq":4,"data":{"text":"snapshotthentail"}}' in joined
    assert joined.count("event: data") == 1 and '"streamClosed":true' in joined
    assert '"type":"token"' not in joined


def check_unauthorized_example(output: Printed) -> None:
    """A request without credentials is refused as the page says."""
    unauthorized = output('curl -s -i "$URL/v1/agents"')
    assert "401 Unauthorized" in unauthorized and "WWW-Authenticate: Bearer" in unauthorized


def check_stream_examples(output: Printed) -> None:
    """The "Streams" examples of docs/http.md print what the page says."""
    created = output("Stream-TTL: 3600")
    assert created.startswith("HTTP/1.1 201") and "Location: http://" in created
    appended = output("Producer-Seq: 0")
    assert appended.startswith("HTTP/1.1 200") and "Producer-Seq: 0" in appended
    read = json.loads(output('curl -s "$URL/v1/streams/chat/42?offset=-1"'))
    assert [m["text"] for m in read] == ["hi", "hello", "!"]
    closed = output("-H 'Stream-Closed: true'")
    assert closed.startswith("HTTP/1.1 204") and "Stream-Closed: true" in closed
    followed = output("chat/42?offset=-1&live=sse")
    assert followed.count("event: data") == 3 and '"streamClosed":true' in followed


def check_read_token_and_cors_examples(
    output: Printed, env: dict[str, str], commands: list[str], run_id: str
) -> None:
    """The "Read tokens" and "CORS" examples of docs/http.md print what the page says, and
    no example puts a user's token in a URL."""
    assert env["READ"].startswith("rsr_")
    assert TOKEN_NOT_IN_URLS.search(" ".join(commands)) is None
    read_sse = output("live=sse&access_token=$READ")
    assert read_sse.count('"type":"tick"') == 5 and '"streamClosed":true' in read_sse
    assert (
        json.loads(output('"$URL/v1/runs/$RUN_ID?access_token=$READ"'))["run"]["run_id"] == run_id
    )
    scope = output('"$URL/v1/runs?access_token=$READ"')
    assert "403 Forbidden" in scope and '"reason":"READ_TOKEN_SCOPE"' in scope
    preflight = output("-X OPTIONS")
    assert "HTTP/1.1 204" in preflight
    assert "Access-Control-Allow-Origin: https://app.example.com" in preflight


async def test_workers_share_the_http_port_and_serve_each_other_s_runs(
    tmp_path: Path, postgres: PgServer
) -> None:
    """--workers 2 with --http-listen: runs started over HTTP, each on a connection of its
    own, are executed by both workers, and each run's events read over other new
    connections (reaching either worker) are its whole log, as gRPC's Subscribe reads it."""
    port = free_port()
    extra = ["--http-listen", f"127.0.0.1:{port}"]
    async with serving_workers(tmp_path, postgres, extra) as w:
        assert w.server.log_text().count("serving HTTP on http://127.0.0.1:") == 2
        auth = {"Authorization": dict(w.md)["authorization"]}
        base = f"http://127.0.0.1:{port}"

        async def fresh(method: str, path: str, **kwargs: Any) -> Any:
            connector = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as client,
                client.request(method, base + path, headers=auth, **kwargs) as response,
            ):
                assert response.status == 200, await response.text()
                return await response.json()

        body = {"agent": "ticker", "input": {"count": 5, "interval": 0.01}}
        started = await asyncio.gather(*(fresh("POST", "/v1/runs", json=body) for _ in range(20)))
        run_ids = [answer["run"]["run_id"] for answer in started]

        async def events(run_id: str) -> list[Any]:
            got: list[Any] = []
            at = "-1"
            while True:
                params = {"offset": at, "live": "long-poll"}
                path = f"/v1/runs/{run_id}/events"
                connector = aiohttp.TCPConnector(force_close=True)
                async with (
                    aiohttp.ClientSession(connector=connector) as client,
                    client.get(base + path, headers=auth, params=params) as response,
                ):
                    if response.status == 200:
                        got += await response.json()
                    at = response.headers["Stream-Next-Offset"]
                    if "Stream-Closed" in response.headers:
                        return got

        logs = await asyncio.gather(*(events(run_id) for run_id in run_ids))
        async with connections(w.server.addr, 1) as (stub,):
            for run_id, log in zip(run_ids, logs, strict=True):
                grpc_log = await complete_log(stub, w.md, run_id)
                assert log == [
                    json_format.MessageToDict(e, preserving_proto_field_name=True) for e in grpc_log
                ]
                assert log[-1]["state"] == "RUN_STATE_SUCCEEDED"
        assert len(w.sql("SELECT DISTINCT executor FROM runs")) == 2
        assert await w.server.terminate() == 0


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "taken"])
async def test_workers_refuse_an_http_port_they_cannot_share_in_one_line(
    tmp_path: Path, listen: str
) -> None:
    """--workers with --http-listen on port 0, or on a port another process holds: one
    line naming --http-listen, status 1, no worker started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}" if listen == "taken" else listen
        args = ["--workers", "2", "--db", UNREACHABLE_DB, "--http-listen", address]
        result = await serve_until_exit(tmp_path / "data", args)
    assert result.code == 1, result.text
    assert [line for line in result.lines if line.strip()] == [result.last], result.text
    expected = (
        "--workers needs a fixed port in --http-listen"
        if listen != "taken"
        else f"cannot listen on --http-listen {address} (is another process using it?)"
    )
    assert expected in result.last
    assert not (tmp_path / "data" / "worker-0").exists()
