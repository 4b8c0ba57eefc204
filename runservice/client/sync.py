"""RunClient: the blocking twin of AsyncRunClient, running the same code on a private loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from typing import Any, Literal, TypeVar, overload

from runservice.client.aio import AsyncRunClient
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb

T = TypeVar("T")


class RunClient:
    """A blocking client: each method runs AsyncRunClient's on a background event loop.

    Takes the same arguments as AsyncRunClient. Use it as a context manager, or call
    close() when done.
    """

    def __init__(self, address: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="runservice-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncRunClient:
            return AsyncRunClient(address, **options)

        self._aio = self._run(make())

    def __enter__(self) -> RunClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel and stops the background loop."""
        if self._loop.is_closed():
            return
        self._run(self._aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def wait_connected(self, timeout: float) -> None:
        """Returns once connected; UnavailableError after `timeout` seconds (see AsyncRunClient)."""
        self._run(self._aio.wait_connected(timeout))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self._loop.is_closed():
                self._run(aclose())

    def start_run(
        self, agent: str, input: Mapping[str, Any] | None = None, **options: Any
    ) -> run_pb2.Run:
        """Starts a run (see AsyncRunClient.start_run)."""
        return self._run(self._aio.start_run(agent, input, **options))

    def get_run(self, run_id: str) -> run_pb2.Run:
        """The run."""
        return self._run(self._aio.get_run(run_id))

    def list_runs(self, **options: Any) -> Iterator[run_pb2.Run]:
        """Every matching run, newest first (see AsyncRunClient.list_runs)."""
        return self._iterate(self._aio.list_runs(**options))

    def stop_run(self, run_id: str, reason: str = "") -> run_pb2.Run:
        """Stops the run; returns it terminal."""
        return self._run(self._aio.stop_run(run_id, reason))

    def send_input(
        self, run_id: str, input: Mapping[str, Any], *, request_id: str | None = None
    ) -> run_pb2.RunEvent:
        """Sends input to the run; returns the `input` event appended."""
        return self._run(self._aio.send_input(run_id, input, request_id=request_id))

    def delete_run(self, run_id: str) -> None:
        """Deletes a finished run."""
        self._run(self._aio.delete_run(run_id))

    def list_agents(self) -> list[run_pb2.Agent]:
        """The agents the server runs."""
        return self._run(self._aio.list_agents())

    def server_stats(self) -> pb.GetServerStatsResponse:
        """The figures of the server process this connection reached (admin only)."""
        return self._run(self._aio.server_stats())

    def create_read_token(
        self, run_id: str, ttl: float | None = None
    ) -> pb.CreateReadTokenResponse:
        """A new read token for the run (see AsyncRunClient.create_read_token)."""
        return self._run(self._aio.create_read_token(run_id, ttl))

    def append_events(self, run_id: str, events: Any, **options: Any) -> pb.AppendEventsResponse:
        """Appends to an external run (see AsyncRunClient.append_events)."""
        return self._run(self._aio.append_events(run_id, events, **options))

    def close_run(self, run_id: str, result: Any = None) -> run_pb2.Run:
        """Closes an external run (see AsyncRunClient.close_run)."""
        return self._run(self._aio.close_run(run_id, result))

    def watch_runs(self, **filters: Any) -> Iterator[pb.WatchRunsResponse]:
        """The snapshot, its end marker, then every change."""
        return self._iterate(self._aio.watch_runs(**filters))

    def wait(self, run_id: str) -> run_pb2.Run:
        """The run once it is terminal."""
        return self._run(self._aio.wait(run_id))

    @overload
    def subscribe(
        self, run_id: str, from_seq: int = 1, *, snapshot: Literal[False] = False
    ) -> Iterator[run_pb2.RunEvent]: ...

    @overload
    def subscribe(
        self, run_id: str, from_seq: int = 1, *, snapshot: bool
    ) -> Iterator[run_pb2.RunSnapshot | run_pb2.RunEvent]: ...

    def subscribe(
        self, run_id: str, from_seq: int = 1, *, snapshot: bool = False
    ) -> Iterator[run_pb2.RunSnapshot | run_pb2.RunEvent]:
        """The run's events from `from_seq`, each exactly once, resuming as needed; with
        `snapshot`, a RunSnapshot first when the run has one that far (see
        AsyncRunClient.subscribe)."""
        return self._iterate(self._aio.subscribe(run_id, from_seq, snapshot=snapshot))
