"""The run API over HTTP/JSON: each route builds the very request message the gRPC call
would get and calls the same RunServiceServicer method; the answer is that method's
response message in the proto's JSON mapping with proto field names (what grpcurl
prints: int64 as strings, enums by name, RFC 3339 times, default values left out).

Bodies are JSON objects in that mapping (`Content-Type: application/json`; unknown fields
are refused). Query parameters are read strictly too: one the route does not take is
refused rather than ignored, so a misspelt filter never widens a listing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar, cast

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from multidict import MultiMapping

from runservice import jsonmap
from runservice.api.auth import current_principal
from runservice.api.limits import StreamLimiter
from runservice.api.servicer import RunServiceServicer
from runservice.api.status import describe, until_expiry
from runservice.domain.errors import InvalidArgumentError
from runservice.v1 import run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.web import sse
from runservice.web.events import StreamSettings
from runservice.web.problems import problem_text

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

NO_CONTEXT: Any = None
"""What the HTTP edge passes as the gRPC context: the servicer's unary methods (StartRun,
GetRun, ListRuns, StopRun, DeleteRun, ListAgents) and WatchRuns never use theirs."""

FILTER_PARAMS = frozenset(
    {"state", "agent", "thread_id", "label", "all_users", "waiting_for_input"}
)
LIST_PARAMS = FILTER_PARAMS | {"page_size", "page_token"}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def _answer(message: Message) -> web.Response:
    return web.Response(
        body=jsonmap.to_text(message).encode(), headers={"Content-Type": jsonmap.JSON_TYPE}
    )


async def _body(request: web.Request, message: M) -> M:
    """`message` filled from the request's JSON body (none: left empty);
    InvalidArgumentError for a body that is not a JSON object of its fields."""
    raw = await request.read()  # above --max-receive-message-size: aiohttp's 413
    if not raw.strip():
        return message
    if request.content_type != "application/json":
        raise InvalidArgumentError("Content-Type", "must be application/json for a JSON body")
    try:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise InvalidArgumentError(
                "body", f"must be a JSON object of {_name(message)}'s fields"
            )
        json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "does not parse"
        raise InvalidArgumentError("body", f"is not a {_name(message)}: {first}") from None
    except ValueError:
        raise InvalidArgumentError("body", "is not valid JSON (UTF-8)") from None
    except RecursionError:
        raise InvalidArgumentError("body", "nests too deeply") from None
    return message


def _name(message: Message) -> str:
    return message.DESCRIPTOR.name


def _only(query: MultiMapping[str], allowed: frozenset[str]) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise InvalidArgumentError(
            unknown[0], f"is not a parameter of this route (it takes {', '.join(sorted(allowed))})"
        )


def _one(query: MultiMapping[str], name: str) -> str:
    values = query.getall(name, [])
    if len(values) > 1:
        raise InvalidArgumentError(name, "give it once")
    return values[0] if values else ""


def _states(values: list[str]) -> list[run_pb2.RunState]:
    states = []
    for value in values:
        name = value.strip().upper()
        name = name if name.startswith("RUN_STATE_") else f"RUN_STATE_{name}"
        if name == "RUN_STATE_UNSPECIFIED" or name not in run_pb2.RunState.keys():  # noqa: SIM118 - an enum wrapper
            raise InvalidArgumentError(
                "state", f"{value!r} is not a run state (PENDING, RUNNING, SUCCEEDED, ...)"
            )
        states.append(cast("run_pb2.RunState", run_pb2.RunState.Value(name)))
    return states


def _labels(values: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise InvalidArgumentError("label", f"{value[:64]!r} must read key=value")
        if key in labels:
            raise InvalidArgumentError("label", f"key {key[:64]!r} is given twice")
        labels[key] = text
    return labels


def _boolean(query: MultiMapping[str], name: str) -> bool:
    text = _one(query, name).lower()
    if text and text not in _BOOLEANS:
        raise InvalidArgumentError(name, "must be true or false")
    return _BOOLEANS.get(text, False)


def _filter(query: MultiMapping[str], message: pb.ListRunsRequest | pb.WatchRunsRequest) -> None:
    """Sets the filter fields of a ListRunsRequest or WatchRunsRequest from the query."""
    message.states.extend(_states(query.getall("state", [])))
    message.agent = _one(query, "agent")
    message.thread_id = _one(query, "thread_id")
    message.labels.update(_labels(query.getall("label", [])))
    message.all_users = _boolean(query, "all_users")
    message.waiting_for_input = _boolean(query, "waiting_for_input")


def list_request(query: MultiMapping[str]) -> pb.ListRunsRequest:
    """The ListRunsRequest of `GET /v1/runs?...`."""
    _only(query, LIST_PARAMS)
    message = pb.ListRunsRequest(page_token=_one(query, "page_token"))
    _filter(query, message)
    size = _one(query, "page_size")
    if size:
        try:
            message.page_size = int(size)
        except ValueError:
            raise InvalidArgumentError("page_size", "must be a whole number") from None
    return message


def watch_request(query: MultiMapping[str]) -> pb.WatchRunsRequest:
    """The WatchRunsRequest of `GET /v1/runs:watch?...`."""
    _only(query, FILTER_PARAMS)
    message = pb.WatchRunsRequest()
    _filter(query, message)
    return message


class RunRoutes:
    """The handlers of the run API."""

    def __init__(
        self, servicer: RunServiceServicer, streams: StreamLimiter, settings: StreamSettings
    ) -> None:
        self._servicer = servicer
        self._streams = streams
        self._settings = settings

    async def start_run(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/runs: the body is a StartRunRequest."""
        message = await _body(request, pb.StartRunRequest())
        return _answer(await self._servicer.StartRun(message, NO_CONTEXT))

    async def get_run(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/runs/{run_id}."""
        message = pb.GetRunRequest(run_id=request.match_info["run_id"])
        return _answer(await self._servicer.GetRun(message, NO_CONTEXT))

    async def list_runs(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/runs, filtered and paged by the query."""
        message = list_request(request.query)
        return _answer(await self._servicer.ListRuns(message, NO_CONTEXT))

    async def stop_run(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/runs/{run_id}:stop, with an optional body `{"reason": "..."}`."""
        message = await _body(request, pb.StopRunRequest())
        if message.run_id:
            raise InvalidArgumentError("run_id", "goes in the path, not the body")
        message.run_id = request.match_info["run_id"]
        return _answer(await self._servicer.StopRun(message, NO_CONTEXT))

    async def send_input(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/runs/{run_id}:input: the body is a SendInputRequest without run_id,
        `{"input": {...}, "request_id": "..."}`; answers the SendInputResponse."""
        message = await _body(request, pb.SendInputRequest())
        if message.run_id:
            raise InvalidArgumentError("run_id", "goes in the path, not the body")
        message.run_id = request.match_info["run_id"]
        return _answer(await self._servicer.SendInput(message, NO_CONTEXT))

    async def delete_run(self, request: web.Request) -> web.StreamResponse:
        """DELETE /v1/runs/{run_id}: answers `{}` (an empty DeleteRunResponse)."""
        message = pb.DeleteRunRequest(run_id=request.match_info["run_id"])
        return _answer(await self._servicer.DeleteRun(message, NO_CONTEXT))

    async def create_read_token(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/runs/{run_id}:readToken, with an optional body `{"ttl": "300s"}`:
        answers the CreateReadTokenResponse."""
        message = await _body(request, pb.CreateReadTokenRequest())
        if message.run_id:
            raise InvalidArgumentError("run_id", "goes in the path, not the body")
        message.run_id = request.match_info["run_id"]
        return _answer(await self._servicer.CreateReadToken(message, NO_CONTEXT))

    async def list_webhook_deliveries(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/runs/{run_id}/webhookDeliveries: the ListWebhookDeliveriesResponse."""
        message = pb.ListWebhookDeliveriesRequest(run_id=request.match_info["run_id"])
        return _answer(await self._servicer.ListWebhookDeliveries(message, NO_CONTEXT))

    async def list_agents(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/agents."""
        return _answer(await self._servicer.ListAgents(pb.ListAgentsRequest(), NO_CONTEXT))

    async def watch_runs(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/runs:watch: WatchRuns as SSE, one `change` event per WatchRunsResponse,
        heartbeats while idle; a watch that falls behind ends with an `error` event
        (WATCH_LAGGED). Refusals (ADMIN_ONLY, SERVER_DRAINING...) come before the stream
        opens, as problems."""
        message = watch_request(request.query)
        principal = current_principal()
        with self._streams.hold(principal.user):
            updates = self._servicer.WatchRuns(message, NO_CONTEXT)
            try:
                first = await anext(updates)  # the snapshot's first item, or its end
                stream = await sse.Stream.open(request, {}, self._settings.stall_timeout)
                await self._follow(stream, first, until_expiry(updates, principal))
            finally:
                await sse.aclose(updates)
        return stream.response

    async def _follow(
        self,
        stream: sse.Stream,
        first: pb.WatchRunsResponse,
        updates: AsyncIterator[pb.WatchRunsResponse],
    ) -> None:
        paced = sse.Paced(updates)
        try:
            await stream.send(sse.event("change", jsonmap.to_text(first)))
            while True:
                update = await paced.next(self._settings.sse_heartbeat)
                if update is None:
                    return
                if isinstance(update, sse.Idle):
                    await stream.send(sse.HEARTBEAT)
                    continue
                await stream.send(sse.event("change", jsonmap.to_text(update)))
        except sse.ClientGoneError as exc:
            level = logging.INFO if exc.stalled else logging.DEBUG
            logger.log(level, "a WatchRuns SSE stream ended: the client %s", exc)
        except Exception as exc:  # WATCH_LAGGED, an expired token...: say so, and end
            await stream.send_last(sse.event("error", problem_text(describe(exc))))
        finally:
            await paced.aclose()
