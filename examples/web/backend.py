"""The web example's backend: it holds the user's runservice token, starts and stops runs
and mints read tokens; the page it serves follows a run straight from runservice.

    python examples/web/backend.py --listen 127.0.0.1:8000 \\
        --runservice http://127.0.0.1:8080 --token-file ~/.local/share/runservice/dev-token

The user's token stays here, in the `Authorization` header of the calls this backend makes
to runservice's HTTP edge (docs/http.md). The page gets only read tokens, one run each,
short-lived and read-only, which it puts in the events URL (`?access_token=`): the one
credential that `EventSource` can send and that runservice accepts in a URL.

A real backend would also sign its users in and check that the run a page names is one of
theirs; this one serves one user, whose token it was given. Every POST must say
`Content-Type: application/json`: a page of another origin cannot send that without a CORS
preflight, which this backend never allows, so no other site can start or stop runs here.
"""

from __future__ import annotations

import argparse
import json
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

logger = logging.getLogger("web-example")

STATIC = Path(__file__).parent / "static"
AGENT = "ticker"  # runservice's built-in agent: `count` tick events, `interval` seconds apart
MAX_TICKS = 10_000
MAX_INTERVAL = 10.0  # seconds
STOP_REASON = "stopped from the page"
JSON = "application/json"
PROBLEM = "application/problem+json"


class Runservice:
    """runservice's HTTP run API, called as the user: the token goes in a header, never in
    a URL, and never to the browser."""

    def __init__(self, base: str, public: str, token: str, ttl: int) -> None:
        self.base = base.rstrip("/")
        self.public = public.rstrip("/")
        self._token = token
        self._ttl = ttl
        self._session: aiohttp.ClientSession | None = None

    async def open(self, _app: web.Application) -> None:
        """Opens the HTTP client (on the server's loop)."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def close(self, _app: web.Application) -> None:
        """Closes the HTTP client."""
        if self._session is not None:
            await self._session.close()

    async def call(self, path: str, body: dict[str, Any]) -> web.Response:
        """POSTs `body` to runservice; its answer, status and JSON kept (a refusal is its
        problem+json), or a 502 problem when it did not answer."""
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            async with self._session.post(self.base + path, json=body, headers=headers) as answer:
                payload = await answer.json(content_type=None)
                content_type = answer.content_type
                status = answer.status
        except (aiohttp.ClientError, ValueError) as exc:
            logger.warning("runservice at %s did not answer POST %s: %s", self.base, path, exc)
            return problem(502, f"runservice at {self.base} did not answer ({type(exc).__name__})")
        return web.json_response(payload, status=status, content_type=content_type)

    async def start(self, count: int, interval: float) -> web.Response:
        """Starts a run of the ticker as the user."""
        body = {"agent": AGENT, "input": {"count": count, "interval": interval}}
        return await self.call("/v1/runs", body)

    async def stop(self, run_id: str) -> web.Response:
        """Stops the run; runservice answers once it is terminal."""
        return await self.call(f"/v1/runs/{run_id}:stop", {"reason": STOP_REASON})

    async def read_token(self, run_id: str) -> web.Response:
        """A read token of the run, and the events URL the page opens with it."""
        answer = await self.call(f"/v1/runs/{run_id}:readToken", {"ttl": f"{self._ttl}s"})
        if answer.status != HTTPStatus.OK:
            return answer
        assert isinstance(answer.body, bytes)
        minted = json.loads(answer.body)
        minted["events_url"] = f"{self.public}/v1/runs/{run_id}/events"
        return web.json_response(minted)


RUNSERVICE = web.AppKey("runservice", Runservice)


def problem(status: int, detail: str) -> web.Response:
    """An error as problem+json (RFC 9457), as runservice's own."""
    body = {"type": "about:blank", "status": status, "detail": detail}
    return web.json_response(body, status=status, content_type=PROBLEM)


@web.middleware
async def api_rules(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuses a POST without `Content-Type: application/json` (see the module's docstring);
    no answer of the API is cached."""
    if request.method == "POST" and request.content_type != JSON:
        return problem(415, "send Content-Type: application/json")
    response: web.StreamResponse = await handler(request)
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"  # read tokens above all
    return response


async def index(_request: web.Request) -> web.FileResponse:
    """The page."""
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def start_run(request: web.Request) -> web.Response:
    """POST /api/runs {"count": int, "interval": seconds}: starts a run; runservice's
    answer ({"run": ...})."""
    try:
        body = await request.json()
        count, interval = int(body.get("count", 20)), float(body.get("interval", 0.5))
    except (ValueError, TypeError, AttributeError):
        return problem(400, 'send {"count": ticks, "interval": seconds}')
    if not (1 <= count <= MAX_TICKS and 0 <= interval <= MAX_INTERVAL):
        return problem(400, f"count must be 1..{MAX_TICKS}, interval 0..{MAX_INTERVAL:g}s")
    return await request.app[RUNSERVICE].start(count, interval)


async def stop_run(request: web.Request) -> web.Response:
    """POST /api/runs/{run_id}/stop: stops the run; runservice's answer once it ended."""
    return await request.app[RUNSERVICE].stop(request.match_info["run_id"])


async def read_token(request: web.Request) -> web.Response:
    """POST /api/runs/{run_id}/token: {"token", "expire_time", "run_id", "events_url"}."""
    return await request.app[RUNSERVICE].read_token(request.match_info["run_id"])


def make_app(runservice: Runservice) -> web.Application:
    """The backend's routes: the page, its script and style, and the three API calls."""
    app = web.Application(middlewares=[api_rules])
    app[RUNSERVICE] = runservice
    app.on_startup.append(runservice.open)
    app.on_cleanup.append(runservice.close)
    run = "/api/runs/{run_id:[A-Za-z0-9-]+}"
    app.add_routes(
        [
            web.get("/", index),
            web.static("/static", STATIC),
            web.post("/api/runs", start_run),
            web.post(run + "/stop", stop_run),
            web.post(run + "/token", read_token),
        ]
    )
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT to serve on")
    parser.add_argument(
        "--runservice", default="http://127.0.0.1:8080", help="runservice's HTTP edge"
    )
    parser.add_argument(
        "--public-runservice",
        help="runservice's HTTP edge as the browser reaches it (default: --runservice)",
    )
    parser.add_argument(
        "--token-file", type=Path, required=True, help="a file holding the user's token"
    )
    parser.add_argument(
        "--read-token-ttl", type=int, default=300, help="seconds a read token lives (default 300)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Serves until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        token = args.token_file.expanduser().read_text().strip()
    except OSError as exc:
        raise SystemExit(f"--token-file {args.token_file}: {exc.strerror}") from None
    host, _, port = args.listen.rpartition(":")
    public = args.public_runservice or args.runservice
    runservice = Runservice(args.runservice, public, token, args.read_token_ttl)
    logger.info("serving the page on http://%s:%s (runservice at %s)", host, port, public)
    web.run_app(make_app(runservice), host=host, port=int(port), print=None)


if __name__ == "__main__":
    main()
