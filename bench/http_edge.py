"""Scenario 10, the HTTP edge: runservice's Durable Streams reads and appends beside
its own gRPC and beside the Node reference server (`@durable-streams/server`), measured
in one run on the same workloads, each repetition visiting every server in turn (the
order rotated per repetition, so that drift hits all alike).

Three phases:

- **SSE replay.** One closed stream of N messages (appended `http_replay_batch` to a
  POST), read from `offset=-1` to its end over SSE by M readers at once: runservice's
  `/v1/streams/{path}`, the same run's `/v1/runs/{id}/events`, gRPC `Subscribe` of that
  run from seq 1, and the reference server's SSE of a stream of the same messages.
  Events/s (all readers together, from the common start to the last reader's last
  event) and p50/p99 over the readers of the time to their last event.
- **Live fan-out.** M SSE readers at the tail (`offset=now`) of a fresh stream while
  the bench appends K messages at a fixed rate, one per POST, then closes it: delivery
  latency (append sent → event received) p50/p99 over every delivery, runservice and the
  reference server; the gRPC baseline is `Subscribe` of an external run fed by
  `AppendEvents`.
- **Appends.** P producers, each POSTing one JSON message at a time to its own stream
  (and, in one case, all to one stream), with and without the idempotent-producer
  headers: appends/s and latency; gRPC `AppendEvents` (one message a call, to external
  runs, with and without producer fields) is the gRPC figure.

Readers and producers run in the load-client workers; the live producer runs in the
bench's own process. Each figure's baseline is the reference server where it serves
the same workload, else runservice's gRPC; the `bare` keys of a figure's CPU are its
baseline's (the report's "baseline" column). `text_table` prints every transport side
by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import numpy as np

from bench import http_clients as hc
from bench import reference
from bench.report import EN, aligned, num, spread
from bench.servers import Server, free_port, serve_has, start_runservice
from bench.stats import percentiles, summary
from runservice.v1 import run_service_pb2 as pb

if TYPE_CHECKING:
    from bench.clients import Workers
    from bench.scenarios import Bench, Figure, Outcome, Sizes

log = logging.getLogger("bench")

KEY = "http"
TITLE = "10. HTTP edge"
STREAMS, RUNS, GRPC, REFERENCE = "streams", "runs", "grpc", "reference"
LABELS = {
    STREAMS: "runservice /v1/streams SSE",
    RUNS: "runservice /v1/runs/{id}/events SSE",
    GRPC: "runservice gRPC",
    REFERENCE: "reference server",
}
# The append cases: (key, label, producers share one stream, idempotent-producer headers).
APPEND_CASES = (
    ("own", "own stream each", False, False),
    ("own.idempotent", "own stream each, idempotent", False, True),
    ("shared", "all on one stream", True, False),
    ("shared.idempotent", "all on one stream, idempotent", True, True),
)
GRPC_CASES = ("own", "own.idempotent")  # gRPC's: AppendEvents has no shared-stream twin
# Lead from handing the load clients their work to its start: the workers are warm
# processes, and every call first waits for the wall clock to reach the start.
LEAD_S = 0.3
LAGGING = 0.95  # a live producer answered below this share of the offered rate is flagged
READY_S = 60.0  # the longest the live readers may take to attach
HTTP_UP_S = 30.0


def add_arguments(p: argparse.ArgumentParser, d: Sizes) -> None:
    """The scenario's size flags (fields `http_*` of bench.scenarios.Sizes)."""
    g = p.add_argument_group(
        "http scenario (loads marked 'per core' are the defaults on this machine)"
    )
    g.add_argument(
        "--http-replay-events", type=int, help=f"messages replayed ({d.http_replay_events})"
    )
    g.add_argument(
        "--http-replay-batch",
        type=int,
        help=f"messages per append while filling the replay stream ({d.http_replay_batch})",
    )
    g.add_argument(
        "--http-readers", type=int, help=f"concurrent replay readers (4 per core: {d.http_readers})"
    )
    g.add_argument(
        "--http-fanout-readers",
        type=int,
        help=f"live readers at the tail (5 per core: {d.http_fanout_readers})",
    )
    g.add_argument(
        "--http-fanout-messages",
        type=int,
        help=f"messages appended per live case ({d.http_fanout_messages})",
    )
    g.add_argument(
        "--http-fanout-rate", type=float, help=f"live appends/s ({d.http_fanout_rate:g})"
    )
    g.add_argument(
        "--http-producers",
        type=int,
        help=f"concurrent producers (4 per core: {d.http_producers})",
    )
    g.add_argument(
        "--http-append-seconds",
        type=float,
        help=f"measured duration of each append case ({d.http_append_seconds:g})",
    )
    g.add_argument(
        "--http-reference-store",
        choices=reference.STORES,
        help=f"the reference server's store ({d.http_reference_store})",
    )


def check(sizes: Sizes) -> None:
    """Exits when the reference server cannot run here and the run needs it."""
    reason = reference.unavailable()
    if reason and not sizes.http_reference_optional:
        raise SystemExit(f"the http scenario needs the Node reference server: {reason}")


@dataclass
class Usage:
    """CPU % (100 = one core) of a server and of the load clients over an interval."""

    server: Server
    workers: Workers
    t0: float = field(default_factory=time.monotonic)
    cpu0: float = 0.0
    clients0: float = 0.0

    def __post_init__(self) -> None:
        self.cpu0 = self.server.cpu_seconds()
        self.clients0 = self.workers.cpu_seconds()

    def read(self) -> tuple[float, float]:
        """(server %, clients %) since the meter was made."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        server = 100.0 * (self.server.cpu_seconds() - self.cpu0) / wall
        return server, 100.0 * (self.workers.cpu_seconds() - self.clients0) / wall


@dataclass
class Results:
    """Every value measured, per transport and figure key, one per repetition; the CPU
    per transport and phase."""

    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    cpu: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    counts: dict[str, list[Any]] = field(default_factory=dict)

    def add(self, target: str, got: dict[str, float]) -> None:
        for key, value in got.items():
            self.values.setdefault(target, {}).setdefault(key, []).append(value)

    def used(self, target: str, phase: str, usage: Usage) -> None:
        server, clients = usage.read()
        parts = self.cpu.setdefault(target, {}).setdefault(phase, {})
        parts.setdefault("server", []).append(server)
        parts.setdefault("clients", []).append(clients)

    def note(self, what: str, value: Any) -> None:
        self.counts.setdefault(what, []).append(value)


class HttpEdge:
    """The scenario against one runservice (gRPC and HTTP) and one reference server."""

    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.s = bench.s
        self.rs: Server | None = None
        self.ref: Server | None = None
        self.http = ""  # runservice's HTTP base URL
        self.out = Results()
        self._paths = 0
        self.replay_path = ""
        self.replay_run = ""  # the run behind runservice's replay stream

    # -- servers ---------------------------------------------------------------------------

    async def start(self) -> str:
        """Starts runservice (HTTP on) and the reference server; the reason the
        reference server is not measured, or ""."""
        port = free_port()
        extra = ["--http-listen", f"127.0.0.1:{port}"]
        if serve_has("--http-sse-max-duration"):  # one SSE response per replay, never cut
            extra += ["--http-sse-max-duration", f"{int(self.s.limit_s) + 60}s"]
        data = self.b.work / "http-runservice"
        self.rs = await asyncio.to_thread(start_runservice, data, extra, loop=self.b.server_loop)
        self.http = f"http://127.0.0.1:{port}"
        await self._http_up()
        reason = await asyncio.to_thread(reference.unavailable)
        if reason:
            if not self.s.http_reference_optional:
                raise RuntimeError(f"the reference server cannot run: {reason}")
            log.warning("http: the reference server is not measured: %s", reason)
            return reason
        log_path = self.b.work / "http-reference.log"
        self.ref = await asyncio.to_thread(reference.start, log_path, self.s.http_reference_store)
        log.info(
            "http: runservice pid %d at %s and %s, reference server pid %d at %s",
            self.rs.pid,
            self.rs.addr,
            self.http,
            self.ref.pid,
            self.ref.addr,
        )
        return ""

    async def _http_up(self) -> None:
        """Waits until runservice's HTTP edge answers (GET /v1/agents)."""
        assert self.rs is not None
        deadline = time.monotonic() + HTTP_UP_S
        async with hc.session(HTTP_UP_S) as http:
            while True:
                try:
                    url = self.http + "/v1/agents"
                    async with http.get(url, headers=hc.auth(self.rs.token)) as r:
                        if r.status == 200:  # noqa: PLR2004
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"runservice's HTTP edge not up within {HTTP_UP_S:g}s")
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stops both servers."""
        await self.b.stop(*(s for s in (self.rs, self.ref) if s is not None))

    def server(self, target: str) -> Server:
        """The process serving `target`."""
        server = self.ref if target == REFERENCE else self.rs
        assert server is not None
        return server

    def token(self, target: str) -> str:
        """The bearer token for `target` ("" for the reference server)."""
        return "" if target == REFERENCE else self.server(STREAMS).token

    def streams(self, target: str, http: aiohttp.ClientSession) -> hc.StreamsClient:
        """The Durable Streams calls to `target`'s server."""
        base = self.server(REFERENCE).addr if target == REFERENCE else self.http
        return hc.StreamsClient(http, base, self.token(target))

    def path(self, what: str) -> str:
        """A stream path not used before in this run."""
        self._paths += 1
        return f"bench/{what}-{self._paths}"

    def targets(self, *names: str) -> list[str]:
        """`names`, without the reference server when it is not measured."""
        return [n for n in names if n != REFERENCE or self.ref is not None]

    def rotated(self, rep: int, names: list[str]) -> list[str]:
        """`names`, rotated by one more place each repetition (who goes first changes)."""
        turn = rep % len(names)
        return names[turn:] + names[:turn]

    # -- the whole scenario ----------------------------------------------------------------

    async def measure(self) -> None:
        """Every phase, each repetition visiting every transport in turn."""
        async with hc.session(self.s.limit_s) as http:
            await self._fill(http)
            for rep in range(self.b.reps):
                for target in self.rotated(rep, self.targets(STREAMS, RUNS, GRPC, REFERENCE)):
                    got = await self._replay(target)
                    self.out.add(target, got)
                    log.info("http: rep %d replay %s: %s", rep + 1, target, _shown(got))
                for target in self.rotated(rep, self.targets(STREAMS, GRPC, REFERENCE)):
                    got = await self._live(target, http)
                    self.out.add(target, got)
                    log.info("http: rep %d live %s: %s", rep + 1, target, _shown(got))
                for key, _label, shared, idempotent in APPEND_CASES:
                    names = self.targets(STREAMS, REFERENCE)
                    names += [GRPC] if key in GRPC_CASES else []
                    for target in self.rotated(rep, names):
                        got = await self._appends(target, http, key, shared, idempotent)
                        self.out.add(target, got)
                        log.info("http: rep %d append %s %s: %s", rep + 1, key, target, _shown(got))

    # -- SSE replay ------------------------------------------------------------------------

    async def _fill(self, http: aiohttp.ClientSession) -> None:
        """The replay stream on both servers (the same messages), closed; the run behind
        runservice's, for /v1/runs/{id}/events and Subscribe."""
        s = self.s
        self.replay_path = self.path("replay")
        for target in self.targets(STREAMS, REFERENCE):
            t0 = time.monotonic()
            await self.streams(target, http).fill(
                self.replay_path, s.http_replay_events, s.http_replay_batch, s.payload
            )
            took = time.monotonic() - t0
            log.info("http: %s: filled the replay stream in %.1fs", target, took)
        channel, stub, md = self._stub()
        async with channel:
            self.replay_run = await hc.stream_run_id(stub, md, self.replay_path)

    def _stub(self) -> tuple[Any, Any, Any]:
        """A channel, a stub and the metadata for runservice's gRPC, as user `bench`."""
        from bench.scenarios import stub_of  # noqa: PLC0415 - scenarios imports this module

        return stub_of(self.server(GRPC))

    async def _replay(self, target: str) -> dict[str, float]:
        """M readers from the start to the end of the replay stream, all at once."""
        s = self.s
        server = self.server(target)
        start_at = time.time() + LEAD_S
        calls = [
            self._reader_call(target, count, start_at, ready_path="")
            for count in _parts(s.http_readers, self.b.workers.n)
        ]
        done = asyncio.ensure_future(asyncio.gather(*calls))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        usage = Usage(server, self.b.workers)
        results = await done
        self.out.used(target, "replay", usage)
        messages = [m for r in results for m in r["messages"]]
        _expect(target, "replay", results, messages, s.http_replay_events)
        ends = np.array([t for r in results for t in r["last"]]) - start_at
        p50, p99 = percentiles(ends, [50, 99])
        self.out.note(f"replay.sse_data_events.{target}", sum(r["events"] for r in results))
        return {
            "replay.events_per_s": sum(messages) / float(ends.max()),
            "replay.last_p50_s": p50,
            "replay.last_p99_s": p99,
        }

    def _reader_call(
        self, target: str, count: int, start_at: float, ready_path: str, path: str = ""
    ) -> Awaitable[dict[str, Any]]:
        """One worker's `count` readers of `target`: the replay stream, or with `path` a
        live stream (at its tail) or, for gRPC, the external run `path`."""
        s, workers = self.s, self.b.workers
        common = {"start_at": start_at, "ready_path": ready_path, "limit_s": s.limit_s}
        if target == GRPC:
            run_id = path or self.replay_run
            return workers.call(
                hc.grpc_readers,
                self.server(GRPC).addr,
                self.token(GRPC),
                [run_id] * count,
                loop=self.b.loop,
                **common,
            )
        if target == RUNS:
            url = f"{self.http}/v1/runs/{self.replay_run}/events?offset=-1&live=sse"
        else:
            base = self.server(REFERENCE).addr if target == REFERENCE else self.http
            query = "offset=now&live=sse" if path else "offset=-1&live=sse"
            url = f"{base}/v1/streams/{path or self.replay_path}?{query}"
        return workers.call(
            hc.sse_readers,
            [url] * count,
            self.token(target),
            run_events=target == RUNS,
            loop=self.b.loop,
            **common,
        )

    # -- live fan-out ----------------------------------------------------------------------

    async def _live(self, target: str, http: aiohttp.ClientSession) -> dict[str, float]:
        """M readers at the tail of a fresh stream (or external run) while K messages are
        appended at a fixed rate, one per append, then the stream is closed."""
        s = self.s
        channel, stub, md = self._stub()
        async with channel:
            if target == GRPC:
                start = pb.StartRunRequest(agent="external")
                path = (await stub.StartRun(start, metadata=md, timeout=60)).run.run_id
            else:
                path = self.path("live")
                await self.streams(target, http).create(path)
            produce, close = self._producer(target, http, stub, md, path)
            results, achieved = await self._follow_live(target, path, produce, close)
        if achieved < LAGGING * s.http_fanout_rate:
            log.warning(
                "http: live %s: the producer's appends were answered at %.0f/s of the "
                "%g/s offered: its latencies are at that lower rate",
                target,
                achieved,
                s.http_fanout_rate,
            )
        messages = [m for r in results for m in r["messages"]]
        _expect(target, "live", results, messages, s.http_fanout_messages)
        lat = np.concatenate([np.frombuffer(r["latencies_ms"], dtype=np.float64) for r in results])
        if lat.size != sum(messages):
            raise RuntimeError(f"{target}: {lat.size} latencies for {sum(messages)} messages")
        p50, p99, top = percentiles(lat, [50, 99, 100])
        return {
            "live.p50_ms": p50,
            "live.p99_ms": p99,
            "live.max_ms": top,
            "live.appends_per_s": achieved,
        }

    def _producer(
        self, target: str, http: aiohttp.ClientSession, stub: Any, md: Any, path: str
    ) -> tuple[Callable[[float], Awaitable[float]], Callable[[], Awaitable[Any]]]:
        """The live producer of `path` (or of the external run `path`), from a start time
        to the stream's close; and the close alone, for when the case fails first."""
        count, rate, size = self.s.http_fanout_messages, self.s.http_fanout_rate, self.s.payload
        if target == GRPC:
            request = pb.CloseRunRequest(run_id=path)
            return (
                lambda at: hc.grpc_produce(
                    stub, md, path, count=count, rate=rate, payload=size, start_at=at
                ),
                lambda: stub.CloseRun(request, metadata=md, timeout=60),
            )
        client = self.streams(target, http)
        return (
            lambda at: client.produce(path, count=count, rate=rate, payload=size, start_at=at),
            lambda: client.close(path),
        )

    async def _follow_live(
        self,
        target: str,
        path: str,
        produce: Callable[[float], Awaitable[float]],
        close: Callable[[], Awaitable[Any]],
    ) -> tuple[list[dict[str, Any]], float]:
        """Attaches the readers, waits until every one is at the tail, runs the producer;
        what the readers saw, and the append rate achieved. On a failure the stream is
        closed, so that the readers end at once rather than at their time limit."""
        s = self.s
        parts = _parts(s.http_fanout_readers, self.b.workers.n)
        tag = path.replace("/", "-")
        ready = [self.b.work / f"{tag}-{i}.ready" for i in range(len(parts))]
        calls = asyncio.ensure_future(
            asyncio.gather(
                *(
                    self._reader_call(target, n, time.time(), str(ready[i]), path)
                    for i, n in enumerate(parts)
                )
            )
        )
        try:
            attached = await _attached(ready, calls)
            if attached < s.http_fanout_readers:
                raise RuntimeError(f"{target}: {attached}/{s.http_fanout_readers} live readers")
            usage = Usage(self.server(target), self.b.workers)
            achieved = await produce(time.time() + 0.05)
        except BaseException:
            with contextlib.suppress(Exception):
                await close()
            await asyncio.gather(calls, return_exceptions=True)
            raise
        results: list[dict[str, Any]] = await calls
        self.out.used(target, "live", usage)
        return results, achieved

    # -- appends ---------------------------------------------------------------------------

    async def _appends(
        self, target: str, http: aiohttp.ClientSession, key: str, shared: bool, idempotent: bool
    ) -> dict[str, float]:
        """P producers appending as fast as they are answered, one message an append, each
        to a fresh stream (or external run) of its own or all to one."""
        s = self.s
        producers = s.http_producers
        channel, stub, md = self._stub()
        async with channel:
            if target == GRPC:
                start = pb.StartRunRequest(agent="external")
                runs = [
                    (await stub.StartRun(start, metadata=md, timeout=60)).run.run_id
                    for _ in range(producers)
                ]
                window = self._window()
                calls = self._grpc_calls(runs, idempotent, window)
                results = await self._run_appends(target, key, window, calls)
                for run_id in runs:
                    close = pb.CloseRunRequest(run_id=run_id)
                    await stub.CloseRun(close, metadata=md, timeout=60)
            else:
                client = self.streams(target, http)
                one = self.path(f"append-{key}")
                paths = [one] * producers if shared else [self.path(key) for _ in range(producers)]
                for p in dict.fromkeys(paths):
                    await client.create(p)
                window = self._window()
                ids = [f"producer-{j}" for j in range(producers)] if idempotent else []
                calls = self._http_calls(target, [client.url(p) for p in paths], ids, window)
                results = await self._run_appends(target, key, window, calls)
                for p in dict.fromkeys(paths):
                    await client.close(p)
        lat = np.concatenate([np.frombuffer(r["latencies_ms"], dtype=np.float64) for r in results])
        p50, p99 = percentiles(lat, [50, 99])
        total = sum(r["appends"] for r in results)
        return {
            f"append.{key}.per_s": total / s.http_append_seconds,
            f"append.{key}.p50_ms": p50,
            f"append.{key}.p99_ms": p99,
        }

    def _window(self) -> hc.Window:
        """The next append case's window: from the lead on, warm-up, then measured."""
        s = self.s
        return hc.Window(time.time() + LEAD_S, s.http_append_warmup, s.http_append_seconds)

    def _http_calls(
        self, target: str, urls: list[str], ids: list[str], window: hc.Window
    ) -> list[Awaitable[dict[str, Any]]]:
        parts = _slices(len(urls), self.b.workers.n)
        return [
            self.b.workers.call(
                hc.http_appenders,
                urls[part],
                self.token(target),
                ids[part] if ids else [],
                window=window,
                payload=self.s.payload,
                loop=self.b.loop,
            )
            for part in parts
        ]

    def _grpc_calls(
        self, runs: list[str], idempotent: bool, window: hc.Window
    ) -> list[Awaitable[dict[str, Any]]]:
        return [
            self.b.workers.call(
                hc.grpc_appenders,
                self.server(GRPC).addr,
                self.token(GRPC),
                runs[part],
                idempotent=idempotent,
                window=window,
                payload=self.s.payload,
                loop=self.b.loop,
            )
            for part in _slices(len(runs), self.b.workers.n)
        ]

    async def _run_appends(
        self,
        target: str,
        key: str,
        window: hc.Window,
        calls: list[Awaitable[dict[str, Any]]],
    ) -> list[dict[str, Any]]:
        """Runs the producers' calls; the CPU is read over the measured window only."""
        done = asyncio.ensure_future(asyncio.gather(*calls))
        await asyncio.sleep(max(0.0, window.begin - time.time()))
        usage = Usage(self.server(target), self.b.workers)
        await asyncio.sleep(max(0.0, window.end - time.time()))
        self.out.used(target, f"append.{key}", usage)
        results: list[dict[str, Any]] = await done
        failures = [r["failures"] for r in results if r["failures"]]
        if failures:
            raise RuntimeError(f"{target}: append {key}: {failures}")
        return results


def _shown(got: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in got.items()}


def _parts(count: int, workers: int) -> list[int]:
    """`count` split as evenly as can be over at most `workers` parts (none empty)."""
    n = max(1, min(count, workers))
    return [count // n + (1 if i < count % n else 0) for i in range(n)]


def _slices(count: int, workers: int) -> list[slice]:
    """Consecutive slices of `count` items, sized as `_parts` says."""
    out, first = [], 0
    for size in _parts(count, workers):
        out.append(slice(first, first + size))
        first += size
    return out


def _expect(
    target: str, phase: str, results: list[dict[str, Any]], messages: list[int], each: int
) -> None:
    """Raises unless every reader got `each` messages and nothing failed."""
    failures = [r["failures"] for r in results if r["failures"]]
    if failures or any(m != each for m in messages):
        raise RuntimeError(f"{target}: {phase}: readers got {messages} of {each}; {failures}")


async def _attached(ready: list[Path], calls: asyncio.Future[list[dict[str, Any]]]) -> int:
    """How many live readers reached the tail, once every worker wrote its ready file
    (raises if a worker failed first)."""
    deadline = time.monotonic() + READY_S
    while not all(p.exists() for p in ready):
        if calls.done():
            calls.result()  # raises the worker's error, if any
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"live readers not attached within {READY_S:g}s")
        await asyncio.sleep(0.02)
    states = [json.loads(p.read_text()) for p in ready if p.exists()]
    return sum(int(st["ready"]) for st in states)


# -- the figures -----------------------------------------------------------------------

# (key, name, unit, better, runservice's transport, the baseline's transport)
FIGURES = (
    ("replay.events_per_s", "SSE replay events/s", "events/s", "higher", STREAMS, REFERENCE),
    ("replay.events_per_s", "SSE replay events/s", "events/s", "higher", RUNS, GRPC),
    ("replay.last_p50_s", "SSE replay time to last event p50", "s", "lower", STREAMS, REFERENCE),
    ("replay.last_p99_s", "SSE replay time to last event p99", "s", "lower", STREAMS, REFERENCE),
    ("replay.last_p50_s", "SSE replay time to last event p50", "s", "lower", RUNS, GRPC),
    ("replay.last_p99_s", "SSE replay time to last event p99", "s", "lower", RUNS, GRPC),
    ("live.p50_ms", "SSE live delivery p50", "ms", "lower", STREAMS, REFERENCE),
    ("live.p99_ms", "SSE live delivery p99", "ms", "lower", STREAMS, REFERENCE),
    ("live.p50_ms", "SSE live delivery p50", "ms", "lower", STREAMS, GRPC),
    ("live.p99_ms", "SSE live delivery p99", "ms", "lower", STREAMS, GRPC),
    *(
        (f"append.{key}.per_s", f"appends/s, {label}", "appends/s", "higher", STREAMS, REFERENCE)
        for key, label, _shared, _idem in APPEND_CASES
    ),
    *(
        (f"append.{key}.per_s", f"appends/s, {label}", "appends/s", "higher", STREAMS, GRPC)
        for key, label, _shared, _idem in APPEND_CASES
        if key in GRPC_CASES
    ),
)
SHORT = {
    STREAMS: "/v1/streams",
    RUNS: "/v1/runs/{id}/events",
    GRPC: "gRPC",
    REFERENCE: "reference",
}
BASELINES = {
    REFERENCE: "the Node reference server (@durable-streams/server), same workload",
    GRPC: "runservice's gRPC (Subscribe, AppendEvents), same run or external runs",
}


def figures(out: Results) -> list[Figure]:
    """One figure per row of FIGURES: runservice's transport beside its baseline's."""
    from bench.scenarios import Figure  # noqa: PLC0415 - scenarios imports this module

    made = []
    for key, name, unit, better, mine, base in FIGURES:
        phase = key.rsplit(".", 1)[0] if key.startswith("append.") else key.split(".")[0]
        baseline = out.values.get(base, {}).get(key)
        cpu = _cpu(out, phase, mine, base if baseline else "")
        made.append(
            Figure(
                f"http.{key}.{mine}.vs.{base}",
                f"{name}: {SHORT[mine]} vs {SHORT[base]}",
                unit,
                better,
                out.values[mine][key],
                baseline,
                BASELINES[base] if baseline else "",
                cpu=cpu,
            )
        )
    return made


def _cpu(out: Results, phase: str, mine: str, base: str) -> dict[str, list[float]]:
    """A figure's CPU: runservice's while its transport was measured, and under the
    report's `bare` keys the baseline's."""
    cpu: dict[str, list[float]] = {}
    for who, target in (("runservice", mine), ("bare", base)):
        parts = out.cpu.get(target, {}).get(phase) if target else None
        if parts:
            cpu[who] = parts["server"]
            cpu[f"{who} clients"] = parts["clients"]
    return cpu


def params(s: Sizes, cores: int | None, not_measured: str, store: str) -> dict[str, Any]:
    """The scenario's parameters, as the report lists them."""
    return {
        "cores": cores,
        "replay_messages": s.http_replay_events,
        "replay_messages_per_append": s.http_replay_batch,
        "replay_readers": s.http_readers,
        "live_readers": s.http_fanout_readers,
        "live_messages": s.http_fanout_messages,
        "live_appends_per_s": s.http_fanout_rate,
        "producers": s.http_producers,
        "append_seconds": s.http_append_seconds,
        "append_warmup_s": s.http_append_warmup,
        "payload_bytes": s.payload,
        "reference_server": "not measured: " + not_measured if not_measured else store,
        "auth": "runservice: bearer token (tokens file); reference server: none",
    }


async def run(bench: Bench) -> Outcome:
    """The HTTP edge scenario (see the module's docstring)."""
    from bench.scenarios import Outcome  # noqa: PLC0415 - scenarios imports this module

    edge = HttpEdge(bench)
    try:
        not_measured = await edge.start()
        await edge.measure()
    finally:
        await edge.stop()
    details = {
        "columns": LABELS,
        "values": edge.out.values,
        "cpu_pct": edge.out.cpu,
        "counts": edge.out.counts,
    }
    store = bench.s.http_reference_store
    return Outcome(
        KEY,
        TITLE,
        params(bench.s, os.cpu_count(), not_measured, store),
        figures(edge.out),
        details,
    )


# -- every transport side by side --------------------------------------------------------

# (name, unit, key, phase whose CPU it is)
SIDE_ROWS = (
    ("SSE replay events/s", "events/s", "replay.events_per_s"),
    ("SSE replay time to last event p50", "s", "replay.last_p50_s"),
    ("SSE replay time to last event p99", "s", "replay.last_p99_s"),
    ("live delivery p50", "ms", "live.p50_ms"),
    ("live delivery p99", "ms", "live.p99_ms"),
    ("live delivery max", "ms", "live.max_ms"),
    ("live appends/s achieved (of the offered rate)", "appends/s", "live.appends_per_s"),
    *(
        row
        for key, label, _shared, _idem in APPEND_CASES
        for row in (
            (f"appends/s, {label}", "appends/s", f"append.{key}.per_s"),
            (f"append latency p50, {label}", "ms", f"append.{key}.p50_ms"),
            (f"append latency p99, {label}", "ms", f"append.{key}.p99_ms"),
        )
    ),
)
SIDE_COLUMNS = ("figure", "unit", *(LABELS[t] for t in (STREAMS, RUNS, GRPC, REFERENCE)))


def side_rows(sc: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every figure of the scenario with each transport's median (min-max) side by side,
    then the server's CPU % in each phase."""
    values, cpu = sc["details"]["values"], sc["details"]["cpu_pct"]
    order = (STREAMS, RUNS, GRPC, REFERENCE)
    out = []
    for name, unit, key in SIDE_ROWS:
        cells = [spread(summary(v)) if (v := values.get(t, {}).get(key)) else "—" for t in order]
        if any(c != "—" for c in cells):
            out.append((name, unit, *cells))
    phases = dict.fromkeys(p for t in order for p in cpu.get(t, {}))
    for phase in phases:
        cells = [
            f"{num(summary(parts['server'])['median'])} %"
            if (parts := cpu.get(t, {}).get(phase))
            else "—"
            for t in order
        ]
        out.append((f"server CPU, {phase}", "% of a core", *cells))
    return out


def text_table(results: dict[str, Any]) -> str:
    """The HTTP edge scenario's transports side by side, for the terminal ("" without it)."""
    sc = next((x for x in results["scenarios"] if x["key"] == KEY), None)
    if sc is None or sc.get("skipped"):
        return ""
    lines = [
        "",
        f"HTTP edge, every transport side by side (median (min{EN}max) of the reps):",
        *aligned(SIDE_COLUMNS, side_rows(sc)),
    ]
    return "\n".join(lines)
