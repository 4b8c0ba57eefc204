"""AsyncRunClient: every RunService call, pagination, and a Subscribe that resumes itself.

`subscribe()` is the promise of gap-free resume made for the caller: when the stream
breaks for a transient reason (the server restarts, a proxy cuts the connection, a
per-attempt deadline passes) it reconnects from `last_seen + 1` with jittered
exponential backoff, and drops anything it has already delivered, so the caller sees
each seq exactly once, in order, until the run's terminal event.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar, overload

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2

from runservice.client.errors import (
    RunServiceError,
    UnavailableError,
    error_info,
    from_rpc_error,
    is_transient,
)
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

T = TypeVar("T")

TokenProvider = Callable[[], "str | Awaitable[str]"]
"""Returns the bearer token to send; called before every call and every reconnect."""

TERMINAL_STATES = frozenset(
    {
        run_pb2.RUN_STATE_SUCCEEDED,
        run_pb2.RUN_STATE_FAILED,
        run_pb2.RUN_STATE_STOPPED,
        run_pb2.RUN_STATE_INTERRUPTED,
        run_pb2.RUN_STATE_TIMED_OUT,
    }
)

# Reconnect quickly after a server restart: grpc's default backoff grows to 120 s.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: jittered exponential backoff, bounded.

    A resumed stream gives up when `give_up_after` seconds pass without progress (an
    event received) or after `max_attempts` consecutive failures (0: no count limit).
    """

    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    give_up_after: float = 60.0
    max_attempts: int = 0

    def backoff(self, attempt: int) -> float:
        """The delay before retry number `attempt` (1-based): full jitter."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the channel; with `private_key` and `certificate_chain`, a client certificate."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None


class AsyncRunClient:
    """A connection to a runservice server.

    Credentials are a fixed `token` or a `token_provider` (sync or async) called before
    every call and every reconnect, so a refreshed JWT is picked up. `call_timeout` is the
    deadline of unary calls; `stream_timeout`, if set, of each attempt of a stream.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        tls: TLSConfig | None = None,
        retry: RetryPolicy | None = None,
        call_timeout: float | None = 30.0,
        stream_timeout: float | None = None,
        channel_options: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        self.address = address
        options = [*CHANNEL_OPTIONS, *channel_options]
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            creds = grpc.ssl_channel_credentials(
                tls.root_certificates, tls.private_key, tls.certificate_chain
            )
            self._channel = grpc.aio.secure_channel(address, creds, options=options)
        self._stub = pb_grpc.RunServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._token = token
        self._token_provider = token_provider
        self.retry = retry or RetryPolicy()
        self._call_timeout = call_timeout
        self._stream_timeout = stream_timeout

    async def __aenter__(self) -> AsyncRunClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def wait_connected(
        self,
        timeout: float,  # noqa: ASYNC109 - how long to wait is this call's whole point
    ) -> None:
        """Returns once the channel is connected to the server; UnavailableError naming the
        address if it is not within `timeout` seconds (the channel keeps its backoff)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise UnavailableError(
                f"cannot reach the server at {self.address} (not connected within {timeout:g}s)",
                metadata={"address": self.address},
            ) from None

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token
        if self._token_provider is not None:
            value = self._token_provider()
            token = await value if inspect.isawaitable(value) else value
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def _unary(self, method: Any, request: Any, *, retry: bool = False) -> Any:
        attempt = 0
        while True:
            try:
                return await method(
                    request, metadata=await self._metadata(), timeout=self._call_timeout
                )
            except grpc.aio.AioRpcError as exc:
                attempt += 1
                if not (retry and exc.code() == grpc.StatusCode.UNAVAILABLE) or (
                    attempt >= max(self.retry.max_attempts, 10)
                ):
                    raise from_rpc_error(exc) from None
                await asyncio.sleep(self.retry.backoff(attempt))

    # -- calls ---------------------------------------------------------------------------

    async def start_run(
        self,
        agent: str,
        input: Mapping[str, Any] | None = None,
        *,
        thread_id: str = "",
        request_id: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the run's time limit, not this call's
        multitask_strategy: int = run_pb2.MULTITASK_STRATEGY_UNSPECIFIED,
        retention: float | timedelta | None = None,
    ) -> run_pb2.Run:
        """Starts a run and returns it; retried on UNAVAILABLE only when `request_id` is set.

        `timeout` is the run's time limit in seconds; `retention` how long the run and its
        log are kept after it ends (seconds or a timedelta; None: the server's default).
        """
        struct = struct_pb2.Struct()
        struct.update(dict(input or {}))
        request = pb.StartRunRequest(
            agent=agent,
            input=struct,
            thread_id=thread_id,
            request_id=request_id,
            labels=dict(labels or {}),
            multitask_strategy=multitask_strategy,  # type: ignore[arg-type]
        )
        if timeout is not None:
            request.timeout.CopyFrom(_duration(timeout))
        if retention is not None:
            request.retention.CopyFrom(_duration(retention))
        response = await self._unary(self._stub.StartRun, request, retry=bool(request_id))
        return response.run  # type: ignore[no-any-return]

    async def get_run(self, run_id: str) -> run_pb2.Run:
        """The run (retried on UNAVAILABLE)."""
        response = await self._unary(self._stub.GetRun, pb.GetRunRequest(run_id=run_id), retry=True)
        return response.run  # type: ignore[no-any-return]

    async def list_runs(
        self, *, page_size: int = 100, limit: int | None = None, **filters: Any
    ) -> AsyncIterator[run_pb2.Run]:
        """Every matching run, newest first, fetching pages as needed.

        `filters` are ListRunsRequest fields: states, agent, thread_id, labels, all_users,
        waiting_for_input.
        """
        token, seen = "", 0
        while True:
            request = pb.ListRunsRequest(page_size=page_size, page_token=token, **filters)
            page = await self._unary(self._stub.ListRuns, request, retry=True)
            for run in page.runs:
                yield run
                seen += 1
                if limit is not None and seen >= limit:
                    return
            token = page.next_page_token
            if not token:
                return

    async def stop_run(self, run_id: str, reason: str = "") -> run_pb2.Run:
        """Stops the run; returns it terminal (idempotent, so retried on UNAVAILABLE)."""
        request = pb.StopRunRequest(run_id=run_id, reason=reason)
        return (await self._unary(self._stub.StopRun, request, retry=True)).run  # type: ignore[no-any-return]

    async def send_input(
        self, run_id: str, input: Mapping[str, Any], *, request_id: str | None = None
    ) -> run_pb2.RunEvent:
        """Sends input to the run (its agent receives it in log order); returns the `input`
        event appended. Retried on UNAVAILABLE under one request_id (a new UUID unless
        given), so a retry is never delivered twice."""
        struct = struct_pb2.Struct()
        struct.update(dict(input))
        request = pb.SendInputRequest(
            run_id=run_id, input=struct, request_id=request_id or str(uuid.uuid4())
        )
        return (await self._unary(self._stub.SendInput, request, retry=True)).event  # type: ignore[no-any-return]

    async def delete_run(self, run_id: str) -> None:
        """Deletes a finished run and its log."""
        await self._unary(self._stub.DeleteRun, pb.DeleteRunRequest(run_id=run_id))

    async def list_agents(self) -> list[run_pb2.Agent]:
        """The agents the server runs."""
        response = await self._unary(self._stub.ListAgents, pb.ListAgentsRequest(), retry=True)
        return list(response.agents)

    async def server_stats(self) -> pb.GetServerStatsResponse:
        """The figures of the server process this connection reached (needs the admin role:
        PermissionDeniedError otherwise); retried on UNAVAILABLE."""
        request = pb.GetServerStatsRequest()
        stats: pb.GetServerStatsResponse = await self._unary(
            self._stub.GetServerStats, request, retry=True
        )
        return stats

    async def create_read_token(
        self, run_id: str, ttl: float | None = None
    ) -> pb.CreateReadTokenResponse:
        """A new read token for the run: it reads that run only (GetRun, Subscribe, its
        HTTP events, also as `?access_token=`), for `ttl` seconds (None: the server's
        --read-token-ttl, also the most it grants). Not retried: each call mints one."""
        request = pb.CreateReadTokenRequest(run_id=run_id)
        if ttl is not None:
            request.ttl.CopyFrom(_duration(ttl))
        response: pb.CreateReadTokenResponse = await self._unary(
            self._stub.CreateReadToken, request
        )
        return response

    async def append_events(
        self,
        run_id: str,
        events: Sequence[pb.EventInput | Any],
        *,
        producer_id: str = "",
        producer_epoch: int = 0,
        producer_seq: int = 0,
        close: bool = False,
    ) -> pb.AppendEventsResponse:
        """Appends to an external run (agent `external`). Each event is an EventInput, or
        any JSON value (sent as its `value`). With `producer_id` the append is idempotent,
        so it is retried on UNAVAILABLE: a retry of an append the server took is answered
        with `duplicate` and writes nothing. (Producer numbers each of its appends: see
        `producer()`.)"""
        request = pb.AppendEventsRequest(
            run_id=run_id,
            events=[_event_input(event) for event in events],
            producer_id=producer_id,
            producer_epoch=producer_epoch,
            producer_seq=producer_seq,
            close=close,
        )
        response: pb.AppendEventsResponse = await self._unary(
            self._stub.AppendEvents, request, retry=bool(producer_id)
        )
        return response

    async def close_run(self, run_id: str, result: Mapping[str, Any] | None = None) -> run_pb2.Run:
        """Closes an external run: it ends SUCCEEDED (idempotent, so retried)."""
        request = pb.CloseRunRequest(run_id=run_id)
        if result is not None:
            request.result.update(dict(result))
        response = await self._unary(self._stub.CloseRun, request, retry=True)
        return response.run  # type: ignore[no-any-return]

    def producer(self, run_id: str, producer_id: str, epoch: int = 0) -> Producer:
        """An idempotent producer of the external run: `await producer.append(...)` numbers
        its appends itself."""
        return Producer(self, run_id, producer_id, epoch)

    async def watch_runs(self, **filters: Any) -> AsyncIterator[pb.WatchRunsResponse]:
        """The snapshot, the RUN_CHANGE_SNAPSHOT_END marker, then every change."""
        call = self._stub.WatchRuns(pb.WatchRunsRequest(**filters), metadata=await self._metadata())
        try:
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def wait(self, run_id: str) -> run_pb2.Run:
        """The run once it is terminal (follows its log, resuming as needed)."""
        run = await self.get_run(run_id)
        if run.state not in TERMINAL_STATES:
            async for _ in self.subscribe(run_id, from_seq=run.last_seq + 1):
                pass
        return await self.get_run(run_id)

    @overload
    def subscribe(
        self, run_id: str, from_seq: int = 1, *, snapshot: Literal[False] = False
    ) -> AsyncIterator[run_pb2.RunEvent]: ...

    @overload
    def subscribe(
        self, run_id: str, from_seq: int = 1, *, snapshot: bool
    ) -> AsyncIterator[run_pb2.RunSnapshot | run_pb2.RunEvent]: ...

    async def subscribe(
        self, run_id: str, from_seq: int = 1, *, snapshot: bool = False
    ) -> AsyncIterator[run_pb2.RunSnapshot | run_pb2.RunEvent]:
        """The run's events from `from_seq`, each exactly once, resuming after transient failures.

        With `snapshot`, a RunSnapshot comes first when the run has one covering
        `from_seq` - 1 or later: the state as of its `seq` (apply it in place of every
        event up to there); the events then start at its seq + 1. Without one that far,
        only events come, as without `snapshot`. A resumed stream never sends one again.

        Ends after the terminal event. Raises the typed error of a permanent failure, or
        UnavailableError once the retry policy gives up.
        """
        cursor = max(from_seq, 1)
        attempt = 0
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        ask_snapshot = snapshot
        while True:
            call = self._stub.Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=cursor, snapshot=ask_snapshot),
                metadata=await self._metadata(),
                timeout=self._stream_timeout,
            )
            try:
                async for response in call:
                    ask_snapshot = False  # the caller has a state now: a resume needs the rest
                    if response.HasField("snapshot"):
                        cursor = response.snapshot.seq + 1
                        attempt, last_progress = 0, loop.time()
                        yield response.snapshot
                        continue
                    for event in response.events:
                        if event.seq < cursor:
                            continue  # already delivered before the reconnect
                        cursor = event.seq + 1
                        attempt, last_progress = 0, loop.time()
                        yield event
                        if event.state in TERMINAL_STATES:
                            return
                return  # ended OK: the log has nothing after `cursor`
            except grpc.aio.AioRpcError as exc:
                if not (is_transient(exc) or self._refreshable(exc)):
                    raise from_rpc_error(exc) from None
                attempt += 1
                self._check_give_up(attempt, loop.time() - last_progress, exc)
                await asyncio.sleep(self.retry.backoff(attempt))
            finally:
                call.cancel()

    def _refreshable(self, exc: grpc.aio.AioRpcError) -> bool:
        """An expired token ends a stream; with a provider, the next attempt gets a new one."""
        if self._token_provider is None or exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            return False
        info = error_info(exc)
        return info is not None and info.reason == "TOKEN_EXPIRED"

    def _check_give_up(self, attempt: int, idle: float, exc: grpc.aio.AioRpcError) -> None:
        policy = self.retry
        if idle > policy.give_up_after or (policy.max_attempts and attempt > policy.max_attempts):
            error = from_rpc_error(exc)
            raise UnavailableError(
                f"gave up resuming after {attempt} attempts and {idle:.1f}s without progress: "
                f"{error.message}",
                code=error.code,
                reason=error.reason,
                metadata=error.metadata,
            ) from None


def _duration(seconds: float | timedelta) -> duration_pb2.Duration:
    if isinstance(seconds, timedelta):
        seconds = seconds.total_seconds()
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


__all__ = ["AsyncRunClient", "RetryPolicy", "RunServiceError", "TLSConfig", "TokenProvider"]


class Producer:
    """One instance of an idempotent producer of an external run (AppendEvents): it sends
    its appends in order, each with the next seq of its epoch, retrying each until it is
    answered; a new instance (after a crash) takes a higher epoch, which fences this one."""

    def __init__(self, client: AsyncRunClient, run_id: str, producer_id: str, epoch: int):
        self._client = client
        self.run_id = run_id
        self.producer_id = producer_id
        self.epoch = epoch
        self.seq = 0  # the seq of the next append

    async def append(self, *events: pb.EventInput | Any, close: bool = False) -> int:
        """Appends `events` as one unit; returns the run's last seq after it."""
        response = await self._client.append_events(
            self.run_id,
            events,
            producer_id=self.producer_id,
            producer_epoch=self.epoch,
            producer_seq=self.seq,
            close=close,
        )
        self.seq += 1
        return int(response.last_seq)


def _event_input(event: pb.EventInput | Any) -> pb.EventInput:
    if isinstance(event, pb.EventInput):
        return event
    message = pb.EventInput()
    json_format.ParseDict(event, message.value)
    return message
