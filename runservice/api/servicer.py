"""The RunService servicer: parse the request, call the manager, convert the answer."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc

import runservice
from runservice.api import convert
from runservice.api.auth import current_principal
from runservice.api.page_token import PageTokens
from runservice.api.read_token import ReadTokens
from runservice.domain.errors import AdminOnlyError, InvalidArgumentError
from runservice.domain.model import Run, Snapshot
from runservice.domain.webhooks import WebhookLog, WebhookPolicy
from runservice.runtime.manager import RunManager
from runservice.runtime.streams import AppendAsk, ExternalRuns
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

DEFAULT_PAGE_SIZE = 50
PAGE_BYTES = 3 * 1024 * 1024  # under the 4 MiB a stock gRPC client accepts, with room
"""A ListRuns page stops short of this many bytes (runs carry inputs of up to 256 KiB), or
of half the server's send limit if that is smaller."""
MAX_PAGE_SIZE = 1000

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class ProcessInfo:
    """Who answers GetServerStats: this process, and since when it serves."""

    replica: str = ""
    version: str = field(default_factory=runservice.version)
    hostname: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_monotonic: float = field(default_factory=time.monotonic)

    def uptime(self) -> float:
        """Seconds since the process started serving, on the monotonic clock."""
        return time.monotonic() - self.started_monotonic


class RunServiceServicer(pb_grpc.RunServiceServicer):
    """gRPC edge of RunManager. No business logic here."""

    def __init__(
        self,
        manager: RunManager,
        page_tokens: PageTokens,
        read_tokens: ReadTokens,
        page_bytes: int = PAGE_BYTES,
        *,
        replica: str = "",
        webhook_policy: WebhookPolicy | None = None,
        webhook_log: WebhookLog | None = None,
    ) -> None:
        self._manager = manager
        self._webhook_policy = webhook_policy or WebhookPolicy()
        self._webhook_log = webhook_log  # None: this server stores no deliveries
        self._tokens = page_tokens
        self._read_tokens = read_tokens
        self._page_bytes = page_bytes
        self._process = ProcessInfo(replica)

    def _proto(self, run: Run) -> run_pb2.Run:
        return convert.run_to_proto(run, self._manager.default_retention)

    async def StartRun(self, request: pb.StartRunRequest, context: Context) -> pb.StartRunResponse:
        spec = convert.start_request_from_proto(request)
        self._webhook_policy.check(spec.webhook_url)
        run = await self._manager.start_run(current_principal(), spec)
        return pb.StartRunResponse(run=self._proto(run))

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        run_id = convert.run_id_from_proto(request.run_id)
        run = await self._manager.get_run(current_principal(), run_id)
        return pb.GetRunResponse(run=self._proto(run))

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        if request.page_size < 0:
            raise InvalidArgumentError("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        principal = current_principal()
        run_filter = convert.filter_from_proto(
            request.states,
            request.agent,
            request.thread_id,
            request.labels,
            request.waiting_for_input,
        )
        scope = principal.scope(all_users=request.all_users)
        before = (
            self._tokens.decode(request.page_token, scope, run_filter)
            if request.page_token
            else None
        )
        runs = await self._manager.list_runs(
            principal,
            run_filter,
            all_users=request.all_users,
            before_run_id=before,
            limit=size + 1,
        )
        messages, more = _fit_page(runs, size, self._page_bytes, self._proto)
        token = self._tokens.encode(scope, run_filter, messages[-1].run_id) if more else ""
        return pb.ListRunsResponse(runs=messages, next_page_token=token)

    async def StopRun(self, request: pb.StopRunRequest, context: Context) -> pb.StopRunResponse:
        run_id = convert.run_id_from_proto(request.run_id)
        reason = convert.reason_from_proto(request.reason)
        run = await self._manager.stop_run(current_principal(), run_id, reason)
        return pb.StopRunResponse(run=self._proto(run))

    async def Subscribe(  # yields pre-serialized responses (see convert.py)
        self, request: pb.SubscribeRequest, context: Context
    ) -> AsyncIterator[bytes]:
        run_id = convert.run_id_from_proto(request.run_id)
        if request.from_seq < 0:
            raise InvalidArgumentError("from_seq", "must not be negative (0 or 1 = from the start)")
        items = await self._manager.subscribe(
            current_principal(), run_id, request.from_seq, snapshot=request.snapshot
        )
        async for item in items:
            if isinstance(item, Snapshot):  # first, if any: the events follow its seq
                yield convert.snapshot_response_bytes(item)
                continue
            # Events carry their wire form, encoded once at commit: concatenate, don't convert.
            message = convert.subscribe_response_bytes(item)
            del item  # a write the client is slow to take holds the message alone
            yield message

    async def DeleteRun(
        self, request: pb.DeleteRunRequest, context: Context
    ) -> pb.DeleteRunResponse:
        run_id = convert.run_id_from_proto(request.run_id)
        await self._manager.delete_run(current_principal(), run_id)
        return pb.DeleteRunResponse()

    async def WatchRuns(
        self, request: pb.WatchRunsRequest, context: Context
    ) -> AsyncIterator[pb.WatchRunsResponse]:
        run_filter = convert.filter_from_proto(
            request.states,
            request.agent,
            request.thread_id,
            request.labels,
            request.waiting_for_input,
        )
        updates = await self._manager.watch(
            current_principal(), run_filter, all_users=request.all_users
        )
        async for update in updates:
            yield convert.watch_update_to_proto(update, self._manager.default_retention)

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        agents = self._manager.list_agents()
        return pb.ListAgentsResponse(agents=[convert.agent_to_proto(a) for a in agents])

    async def GetServerStats(
        self, request: pb.GetServerStatsRequest, context: Context
    ) -> pb.GetServerStatsResponse:
        if not current_principal().is_admin:
            raise AdminOnlyError("reading the server's stats (GetServerStats)")
        process = self._process
        return convert.server_stats_to_proto(
            self._manager.stats(),
            version=process.version,
            hostname=process.hostname,
            pid=process.pid,
            replica=process.replica,
            started_at=process.started_at,
            uptime=process.uptime(),
        )

    async def CreateReadToken(
        self, request: pb.CreateReadTokenRequest, context: Context
    ) -> pb.CreateReadTokenResponse:
        run_id = convert.run_id_from_proto(request.run_id)
        ttl = convert.ttl_from_proto(request)
        # The owner or an admin (a read token's caller never gets here: auth refuses it).
        run = await self._manager.get_run(current_principal(), run_id)
        token, expires_at = self._read_tokens.mint(run.owner, run.run_id, ttl)
        return convert.read_token_to_proto(token, expires_at, run.run_id)

    async def SendInput(
        self, request: pb.SendInputRequest, context: Context
    ) -> pb.SendInputResponse:
        run_id, data, request_id = convert.input_from_proto(request)
        event = await self._manager.send_input(current_principal(), run_id, data, request_id)
        return pb.SendInputResponse(event=convert.event_to_proto(event))

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        run_id = convert.run_id_from_proto(request.run_id)
        principal = current_principal()
        run = await self._manager.get_run(principal, run_id)  # another user's: NOT_FOUND
        if self._webhook_log is None:
            return pb.ListWebhookDeliveriesResponse()
        deliveries = await self._webhook_log.deliveries(run.run_id)
        return convert.deliveries_to_proto(deliveries, show_deployment_url=principal.is_admin)

    async def AppendEvents(
        self, request: pb.AppendEventsRequest, context: Context
    ) -> pb.AppendEventsResponse:
        run_id, ask = convert.append_from_proto(request)
        outcome = await self._external().append(current_principal(), ask, run_id=run_id)
        producer = outcome.producer
        return pb.AppendEventsResponse(
            last_seq=outcome.run.last_seq,
            duplicate=outcome.duplicate,
            closed=outcome.closed,
            producer_epoch=producer.epoch if producer is not None else 0,
            producer_seq=producer.seq if producer is not None else 0,
        )

    async def CloseRun(self, request: pb.CloseRunRequest, context: Context) -> pb.CloseRunResponse:
        run_id = convert.run_id_from_proto(request.run_id)
        result = (
            convert.struct_to_dict(request.result, "result") if request.HasField("result") else None
        )
        ask = AppendAsk(close=True, result=result)
        outcome = await self._external().append(current_principal(), ask, run_id=run_id)
        return pb.CloseRunResponse(run=self._proto(outcome.run))

    def _external(self) -> ExternalRuns:
        external = self._manager.external
        if external is None:
            raise InvalidArgumentError("run_id", "this server keeps no external runs")
        return external


def _fit_page(
    runs: list[Run], size: int, budget: int, to_proto: Callable[[Run], run_pb2.Run]
) -> tuple[list[run_pb2.Run], bool]:
    """The page's messages, at most `size` and `budget` bytes; and whether more follow.

    A shorter page with a next_page_token is allowed (AIP-158); a page always holds at
    least one run, so paging always advances.
    """
    messages: list[run_pb2.Run] = []
    total = 0
    for run in runs[:size]:
        message = to_proto(run)
        total += message.ByteSize() + 8  # its tag and length prefix in the response
        if messages and total > budget:
            return messages, True
        messages.append(message)
    return messages, len(runs) > size
