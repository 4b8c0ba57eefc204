"""CORS on the HTTP edge (--http-cors-origin): preflights from allowed origins answered,
responses to them readable with the protocol's headers exposed; other origins, and a
server without the option, get no CORS headers at all."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from runservice.config import add_serve_arguments, settings_from_args
from tests.conftest import Harness
from tests.test_web_api import Http

MakeServer = Callable[..., Awaitable[Harness]]
APP = "https://app.example.com"
CORS_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Allow-Credentials",
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client session, closed afterwards."""
    async with aiohttp.ClientSession() as client:
        yield client


async def edge(make_server: MakeServer, session: aiohttp.ClientSession, *origins: str) -> Http:
    """A server with the HTTP edge allowing `origins`."""
    server = await make_server(http_listen="127.0.0.1:0", http_cors_origins=origins)
    return Http(server, session)


def preflight(origin: str) -> dict[str, str]:
    """The headers of a browser's preflight of an authorized GET from `origin`."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, last-event-id",
    }


async def test_a_preflight_from_an_allowed_origin_is_answered(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """OPTIONS from an allowed origin: 204 with the methods, the request headers (the
    credentials, the resume and revalidation headers) and a max age; no credentials mode."""
    http = await edge(make_server, session, APP, "https://other.example.com")
    answer = await http.call(
        "OPTIONS",
        "/v1/runs/0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d/events",
        user=None,
        headers=preflight(APP),
    )
    assert answer.status == 204
    assert answer.headers["Access-Control-Allow-Origin"] == APP
    assert "Origin" in answer.headers.getall("Vary")
    assert "GET" in answer.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in answer.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "last-event-id", "if-none-match"} <= allowed
    assert int(answer.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in answer.headers


async def test_a_disallowed_origin_gets_no_cors_headers(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """A preflight or a request from an origin not on the list gets no CORS header (its
    browser refuses to let the page read the answer)."""
    http = await edge(make_server, session, APP)
    evil = "https://evil.example.com"
    answer = await http.call("OPTIONS", "/v1/runs", user=None, headers=preflight(evil))
    assert answer.status != 204
    got = await http.call("GET", "/v1/agents", headers={"Origin": evil})
    assert got.status == 200
    for response in (answer, got):
        assert not any(h in response.headers for h in CORS_HEADERS)


async def test_reads_from_an_allowed_origin_expose_the_stream_headers(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """GET of a run's events from an allowed origin: Allow-Origin is that origin, and the
    protocol's headers (offsets, cursor, ETag...) are exposed to the page; errors too."""
    http = await edge(make_server, session, APP)
    run = await http.start("echo", input={"text": "a b"})
    await http.finished(run["run_id"])
    got = await http.call(
        "GET",
        f"/v1/runs/{run['run_id']}/events",
        params=[("offset", "-1")],
        headers={"Origin": APP},
    )
    assert got.status == 200
    assert got.headers["Access-Control-Allow-Origin"] == APP
    exposed = {h.strip() for h in got.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Stream-Next-Offset", "Stream-Up-To-Date", "Stream-Closed", "Stream-Cursor"} <= exposed
    assert {"ETag", "WWW-Authenticate"} <= exposed
    assert "Access-Control-Allow-Credentials" not in got.headers
    refused = await http.call("GET", "/v1/runs", user=None, headers={"Origin": APP})
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == APP


async def test_any_origin_with_a_star(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """`*` allows every origin (each answer names the page's own origin)."""
    http = await edge(make_server, session, "*")
    answer = await http.call("OPTIONS", "/v1/runs", user=None, headers=preflight("https://x.test"))
    assert answer.status == 204
    assert answer.headers["Access-Control-Allow-Origin"] == "https://x.test"


async def test_no_cors_headers_without_the_option(
    make_server: MakeServer, session: aiohttp.ClientSession
) -> None:
    """By default the edge grants no origin: no CORS header on any answer."""
    http = await edge(make_server, session)
    answer = await http.call("OPTIONS", "/v1/runs", user=None, headers=preflight(APP))
    got = await http.call("GET", "/v1/agents", headers={"Origin": APP})
    for response in (answer, got):
        assert not any(h in response.headers for h in CORS_HEADERS)


def test_the_option_repeats_and_reads_a_comma_separated_variable() -> None:
    """--http-cors-origin is repeatable; RUNSERVICE_HTTP_CORS_ORIGIN is comma-separated."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--http-cors-origin", APP, "--http-cors-origin", "https://b.test"])
    assert settings_from_args(args, {}).http_cors_origins == (APP, "https://b.test")
    none = parser.parse_args([])
    env = {"RUNSERVICE_HTTP_CORS_ORIGIN": f"{APP}, https://b.test"}
    assert settings_from_args(none, env).http_cors_origins == (APP, "https://b.test")
    assert settings_from_args(none, {}).read_token_ttl == 900.0
