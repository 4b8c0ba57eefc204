"""A webhook receiver for tests: a real aiohttp server on 127.0.0.1 that checks every
request's Standard Webhooks signature with the `standardwebhooks` package (not with the
server's own code), records what arrived, and answers what the test scripted."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError


def new_secret() -> str:
    """A fresh secret in the `whsec_` form."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def write_secret(path: Path, secret: str) -> Path:
    """Writes `secret` to `path` (mode 600); returns the path."""
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class Received:
    """One POST as it arrived: its headers, its parsed body, whether its signature held."""

    path: str
    webhook_id: str
    timestamp: int
    body: dict[str, Any]
    valid: bool
    at: float  # time.monotonic() on arrival

    @property
    def run(self) -> dict[str, Any]:
        """The run in the body."""
        run: dict[str, Any] = self.body["data"]["run"]
        return run


class Receiver:
    """Records every POST; answers the scripted statuses in order, then `default`."""

    def __init__(self, secret: str, default: int = 200) -> None:
        self.secret = secret
        self._webhook = Webhook(secret)
        self.default = default
        self.script: deque[int] = deque()
        self.received: list[Received] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    def answer(self, *statuses: int) -> None:
        """The next requests get `statuses`, one each."""
        self.script.extend(statuses)

    def url(self, path: str = "/hook") -> str:
        """The receiver's URL for `path`."""
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def invalid(self) -> list[Received]:
        """The requests whose signature did not verify."""
        return [r for r in self.received if not r.valid]

    def ids(self) -> set[str]:
        """The webhook-id of every request whose signature held."""
        return {r.webhook_id for r in self.received if r.valid}

    def for_run(self, run_id: str) -> list[Received]:
        """The requests about `run_id`."""
        return [r for r in self.received if r.valid and r.run["run_id"] == run_id]

    async def start(self) -> None:
        """Listens (on the port it had before, if it was started already)."""
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stops listening: senders get connection refused."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = dict(request.headers)
        try:
            self._webhook.verify(raw, headers)
            valid = True
        except WebhookVerificationError:
            valid = False
        self.received.append(
            Received(
                path=request.path,
                webhook_id=request.headers.get("webhook-id", ""),
                timestamp=int(request.headers.get("webhook-timestamp", "0")),
                body=json.loads(raw),
                valid=valid,
                at=time.monotonic(),
            )
        )
        status = self.script.popleft() if self.script else self.default
        return web.Response(status=status, text="ok" if status < 300 else "no")
