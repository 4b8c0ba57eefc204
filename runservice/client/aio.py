"""AsyncRunClient: every RunService call, with pagination and a resuming Subscribe."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


class RunServiceClientError(Exception):
    """A call failed; `code`, `reason` (ErrorInfo) and `metadata` say how."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        self.code = error.code()
        self.message = error.details() or ""
        self.reason = ""
        self.metadata: dict[str, str] = {}
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        for detail in status.details if status is not None else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                self.reason, self.metadata = info.reason, dict(info.metadata)
        super().__init__(f"{self.code.name}: {self.message}")


class AsyncRunClient:
    """A connection to a runservice server, authenticated with a bearer token."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.RunServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def __aenter__(self) -> AsyncRunClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise RunServiceClientError(exc) from None

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
    ) -> run_pb2.Run:
        """Starts a run and returns it."""
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
            request.timeout.CopyFrom(
                duration_pb2.Duration(seconds=int(timeout), nanos=int(timeout % 1 * 1e9))
            )
        response = await self._call(self._stub.StartRun, request)
        return response.run  # type: ignore[no-any-return]

    async def get_run(self, run_id: str) -> run_pb2.Run:
        """The run."""
        return (await self._call(self._stub.GetRun, pb.GetRunRequest(run_id=run_id))).run  # type: ignore[no-any-return]

    async def list_runs(
        self, *, page_size: int = 100, limit: int | None = None, **filters: Any
    ) -> AsyncIterator[run_pb2.Run]:
        """Every matching run, newest first, fetching pages as needed."""
        token, seen = "", 0
        while True:
            request = pb.ListRunsRequest(page_size=page_size, page_token=token, **filters)
            page = await self._call(self._stub.ListRuns, request)
            for run in page.runs:
                yield run
                seen += 1
                if limit is not None and seen >= limit:
                    return
            token = page.next_page_token
            if not token:
                return

    async def stop_run(self, run_id: str, reason: str = "") -> run_pb2.Run:
        """Stops the run; returns it terminal."""
        request = pb.StopRunRequest(run_id=run_id, reason=reason)
        return (await self._call(self._stub.StopRun, request)).run  # type: ignore[no-any-return]

    async def delete_run(self, run_id: str) -> None:
        """Deletes a finished run."""
        await self._call(self._stub.DeleteRun, pb.DeleteRunRequest(run_id=run_id))

    async def list_agents(self) -> list[run_pb2.Agent]:
        """The agents the server runs."""
        return list((await self._call(self._stub.ListAgents, pb.ListAgentsRequest())).agents)

    async def watch_runs(self, **filters: Any) -> AsyncIterator[pb.WatchRunsResponse]:
        """The snapshot, the RUN_CHANGE_SNAPSHOT_END marker, then every change."""
        call = self._stub.WatchRuns(pb.WatchRunsRequest(**filters), metadata=self._metadata)
        try:
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as exc:
            raise RunServiceClientError(exc) from None
        finally:
            call.cancel()

    async def wait(self, run_id: str) -> run_pb2.Run:
        """The run once it is terminal."""
        async for _ in self.subscribe(run_id, from_seq=(await self.get_run(run_id)).last_seq + 1):
            pass
        return await self.get_run(run_id)

    async def subscribe(
        self, run_id: str, from_seq: int = 1, *, max_retries: int = 10
    ) -> AsyncIterator[run_pb2.RunEvent]:
        """The run's events from `from_seq`, resuming after transient failures without gaps."""
        cursor, failures = max(from_seq, 1), 0
        while True:
            call = self._stub.Subscribe(
                pb.SubscribeRequest(run_id=run_id, from_seq=cursor), metadata=self._metadata
            )
            try:
                async for response in call:
                    failures = 0
                    for event in response.events:
                        if event.seq < cursor:
                            continue
                        cursor = event.seq + 1
                        yield event
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or failures >= max_retries:
                    raise RunServiceClientError(exc) from None
                failures += 1
                await asyncio.sleep(min(5.0, 0.1 * 2**failures) * random.uniform(0.5, 1.0))
            finally:
                call.cancel()
