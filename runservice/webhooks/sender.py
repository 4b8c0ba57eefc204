"""The webhook sender: attempts the stored deliveries until each is answered or too old.

One task per server. It claims the deliveries that are due (at most `concurrency` at a
time in flight), POSTs each with its signed headers on its own task, and records the
attempt with what follows from it: DELIVERED on a 2xx answer; otherwise another attempt
after an exponential backoff with jitter (`first_retry`, doubling, at most `max_retry`),
or FAILED once `max_age` has passed since the delivery was stored (the run's end). A
redirect is not followed: it is a failed attempt that says so. Nothing a receiver sends
back reaches the log or a caller but its status code.

The database holds the whole state (store/webhooks.py): a restart, a crash or another
replica picks up where this one left off, so each delivery is made at least once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import aiohttp

import runservice
from runservice.domain.errors import StoreError
from runservice.domain.webhooks import AttemptOutcome, DueDelivery, WebhookAttempt
from runservice.webhooks.signing import signed_headers

logger = logging.getLogger(__name__)

RECORD_TRIES = 3
"""Tries to record an attempt while the store is unavailable; past them the claim lapses
and the delivery is attempted again (a receiver may then see it twice)."""
CLAIM_SLACK_S = 5.0
"""How long past an attempt's timeout its claim lasts: then another sender may take it."""
RELEASE_TIMEOUT_S = 2.0
"""The most stop() waits to give back the claims of attempts it cut short."""


@dataclass(frozen=True)
class SenderSettings:
    """How the sender works; `secrets` sign every attempt (the first one is the current)."""

    secrets: tuple[bytes, ...]
    max_age: float = 86400.0
    timeout: float = 10.0
    concurrency: int = 16
    first_retry: float = 1.0
    max_retry: float = 300.0
    poll_interval: float = 0.5
    cleanup_interval: float = 60.0
    release_claims_at_start: bool = False
    """True when no other process can hold a claim (a SQLite file): claims left by a
    previous life are due at once, not when they lapse."""


class DeliveryQueue(Protocol):
    """The stored deliveries (store/webhooks.py's SqlWebhookLog)."""

    async def claim(self, now_us: int, limit: int, claim_until_us: int) -> list[DueDelivery]:
        """Claims up to `limit` due deliveries for one attempt each."""
        ...

    async def record(
        self, due: DueDelivery, attempt: WebhookAttempt, outcome: AttemptOutcome, next_us: int
    ) -> None:
        """Stores an attempt and its outcome (`next_us`: when a retry is due)."""
        ...

    async def release(self, claims: Sequence[DueDelivery]) -> None:
        """Gives back claims whose attempts never ran."""
        ...

    async def release_all(self) -> int:
        """Makes every claimed delivery due now."""
        ...

    async def forget_finished(self, limit: int = 500) -> int:
        """Deletes finished deliveries whose run is gone."""
        ...


class WebhookMetrics(Protocol):
    """What the sender counts (runservice/metrics.py)."""

    def webhook_attempt(self, outcome: AttemptOutcome) -> None:
        """An attempt was made and recorded with `outcome`."""
        ...


class WebhookSender:
    """Sends the stored deliveries; `start` once, `stop` once."""

    def __init__(
        self,
        queue: DeliveryQueue,
        settings: SenderSettings,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self._queue = queue
        self._settings = settings
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: dict[asyncio.Task[None], DueDelivery] = {}
        self._posted: set[DueDelivery] = set()  # past the POST: recording, never released

    async def start(self) -> None:
        """Starts sending (claims of a previous life first made due, where that is safe)."""
        if self._settings.release_claims_at_start:
            released = await self._queue.release_all()
            if released:
                logger.info(
                    "%d webhook deliveries cut short by the last stop are due again", released
                )
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
            connector=aiohttp.TCPConnector(limit=self._settings.concurrency),
            headers={"User-Agent": f"runservice-webhooks/{runservice.version()}"},
        )
        self._task = asyncio.create_task(self._run(), name="runservice-webhooks")

    async def stop(self) -> None:
        """Stops sending: attempts in flight are cut short and their claims given back, so
        they are made again after the restart (or at once by another replica)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        cut = [due for due in self._inflight.values() if due not in self._posted]
        for task in self._inflight:
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await self._queue.release(cut)
        except (TimeoutError, StoreError):
            logger.warning("%d webhook claims not given back: due again once they lapse", len(cut))
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        next_cleanup = time.monotonic() + self._settings.cleanup_interval
        while True:
            try:
                if await self._claim_and_send():
                    continue  # as many as there was room for: more may be due
                if time.monotonic() >= next_cleanup:
                    next_cleanup = time.monotonic() + self._settings.cleanup_interval
                    await self._cleanup()
            except Exception:  # a bug: logged, and the sender goes on rather than stopping
                logger.exception("the webhook sender failed; it goes on")
            await self._pause()

    async def _claim_and_send(self) -> bool:
        """Claims what is due and room allows, and sends each; True when room was filled."""
        free = self._settings.concurrency - len(self._inflight)
        claimed = await self._claim(free) if free > 0 else []
        for due in claimed:
            task = asyncio.create_task(self._attempt(due), name=f"webhook:{due.run_id}")
            self._inflight[task] = due
            task.add_done_callback(self._done)
        return bool(claimed) and len(claimed) == free

    async def _claim(self, limit: int) -> list[DueDelivery]:
        now = _now_us()
        until = now + int((self._settings.timeout + CLAIM_SLACK_S) * 1_000_000)
        try:
            return await self._queue.claim(now, limit, until)
        except StoreError as exc:
            logger.warning("cannot read the webhook deliveries that are due (%s); will retry", exc)
            return []

    async def _pause(self) -> None:
        """Until an attempt ends (a slot frees) or the poll interval passes."""
        if self._inflight:
            await asyncio.wait(
                list(self._inflight),
                timeout=self._settings.poll_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
        else:
            await asyncio.sleep(self._settings.poll_interval)

    async def _cleanup(self) -> None:
        try:
            forgotten = await self._queue.forget_finished()
        except StoreError as exc:
            logger.warning("cannot delete finished webhook deliveries (%s); will retry", exc)
            return
        if forgotten:
            logger.info("deleted %d finished webhook deliveries of runs that are gone", forgotten)

    def _done(self, task: asyncio.Task[None]) -> None:
        due = self._inflight.pop(task, None)
        if due is not None:
            self._posted.discard(due)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "webhook attempt of run %s failed unexpectedly",
                due.run_id if due else "?",
                exc_info=task.exception(),
            )

    async def _attempt(self, due: DueDelivery) -> None:
        """One POST of `due`, then its record."""
        at = datetime.now(UTC)
        started = time.monotonic()
        status, error = await self._post(due)
        self._posted.add(due)
        ok = status is not None and 200 <= status < 300  # noqa: PLR2004
        outcome, next_us = self._outcome(due, ok)
        attempt = WebhookAttempt(due.attempt, at, time.monotonic() - started, status, error)
        await self._record(due, attempt, outcome, next_us)
        if self._metrics is not None:
            self._metrics.webhook_attempt(outcome)
        self._log(due, outcome, error)

    def _outcome(self, due: DueDelivery, ok: bool) -> tuple[AttemptOutcome, int]:
        """What follows an attempt: done, a retry due when, or given up."""
        if ok:
            return "delivered", 0
        now = _now_us()
        deadline = due.created_us + int(self._settings.max_age * 1_000_000)
        if now >= deadline:
            return "gave_up", 0
        return "retrying", min(now + int(self.backoff(due.attempt) * 1_000_000), deadline)

    def backoff(self, attempt: int) -> float:
        """Seconds before the attempt after attempt number `attempt`: `first_retry`
        doubling each time, ±20% jitter (so a receiver that comes back is not hit by every
        delivery at once), at most `max_retry`."""
        s = self._settings
        doubled = s.first_retry * 2.0 ** min(attempt - 1, 40)
        return min(s.max_retry, doubled * random.uniform(0.8, 1.2))

    async def _post(self, due: DueDelivery) -> tuple[int | None, str]:
        """The receiver's status (None: no answer) and, unless 2xx, why it failed."""
        assert self._session is not None
        headers = signed_headers(
            self._settings.secrets, due.delivery_id, int(time.time()), due.body
        )
        headers["Content-Type"] = "application/json"
        try:
            async with self._session.post(
                due.url, data=due.body, headers=headers, allow_redirects=False
            ) as response:
                return response.status, _status_error(response.status)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return None, f"no answer within {self._settings.timeout:g}s"
        except aiohttp.ClientError as exc:
            return None, _client_error(exc)

    async def _record(
        self, due: DueDelivery, attempt: WebhookAttempt, outcome: AttemptOutcome, next_us: int
    ) -> None:
        for n in range(RECORD_TRIES):
            try:
                await self._queue.record(due, attempt, outcome, next_us)
                return
            except StoreError as exc:
                if n == RECORD_TRIES - 1:
                    logger.warning(
                        "cannot record webhook attempt %d of run %s (%s): it will be made again",
                        due.attempt,
                        due.run_id,
                        exc,
                    )
                    return
                await asyncio.sleep(0.5 * 2**n)

    def _log(self, due: DueDelivery, outcome: AttemptOutcome, error: str) -> None:
        if outcome == "delivered":
            logger.debug("webhook %s of run %s delivered", due.delivery_id, due.run_id)
        elif outcome == "retrying":
            logger.info(
                "webhook attempt %d of run %s failed (%s); will retry",
                due.attempt,
                due.run_id,
                error,
            )
        else:
            logger.warning(
                "webhook of run %s given up after %d attempts over --webhook-max-age (%s)",
                due.run_id,
                due.attempt,
                error,
            )


def _status_error(status: int) -> str:
    if 200 <= status < 300:  # noqa: PLR2004
        return ""
    if 300 <= status < 400:  # noqa: PLR2004
        return f"answered HTTP {status}, a redirect: redirects are not followed"
    return f"answered HTTP {status}"


def _client_error(exc: aiohttp.ClientError) -> str:
    """Why a POST got no answer, in words safe to show (never the receiver's own text)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "cannot resolve the host name"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return "the TLS handshake failed (is the certificate valid for the host?)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "cannot connect (refused or unreachable)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the receiver closed the connection without answering"
    if isinstance(exc, aiohttp.InvalidURL):
        return "the URL is not valid"
    return f"the HTTP exchange failed ({type(exc).__name__})"


def _now_us() -> int:
    return int(time.time() * 1_000_000)
