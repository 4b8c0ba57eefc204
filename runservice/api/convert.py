"""Proto ⇄ domain: the only place the generated messages meet the domain types.

Validation of request fields happens here too, at the edge, so the runtime only ever sees
well-formed values. Every refusal names the field and says what a valid value looks like.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, json_format, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from runservice import jsonmap
from runservice.domain.errors import InvalidArgumentError, InvalidInputError
from runservice.domain.model import (
    AgentInfo,
    EncodedEvent,
    MultitaskStrategy,
    Run,
    RunChange,
    RunEvent,
    RunFailure,
    RunFilter,
    RunState,
    Snapshot,
    StartRequest,
    WatchUpdate,
)
from runservice.domain.streams import MAX_SAFE_INTEGER, MESSAGE, ProducerClaim
from runservice.domain.webhooks import WebhookAttempt, WebhookDelivery
from runservice.runtime.manager import ServerStats
from runservice.runtime.streams import AppendAsk, Message
from runservice.v1 import run_pb2, run_service_pb2, webhook_pb2

DOMAIN = "runservice"
MAX_INPUT_BYTES = 256 * 1024
MAX_LABELS = 64
UUID_TEXT_LEN = 36
NANOS_PER_SECOND = 1_000_000_000
MAX_TIMEOUT_S = 366 * 24 * 3600.0
MIN_RETENTION_S = 1.0

_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}")
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]*")

STATE_TO_PROTO: dict[RunState, int] = {
    s: run_pb2.RunState.Value(f"RUN_STATE_{s.value}") for s in RunState
}
STATE_FROM_PROTO: dict[int, RunState] = {v: k for k, v in STATE_TO_PROTO.items()}
_CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}
STRATEGY_TO_PROTO: dict[MultitaskStrategy, int] = {
    s: run_pb2.MultitaskStrategy.Value(f"MULTITASK_STRATEGY_{s.value}") for s in MultitaskStrategy
}
STRATEGY_FROM_PROTO: dict[int, MultitaskStrategy] = {v: k for k, v in STRATEGY_TO_PROTO.items()}
STRATEGY_FROM_PROTO[run_pb2.MULTITASK_STRATEGY_UNSPECIFIED] = MultitaskStrategy.REJECT
CHANGE_TO_PROTO: dict[RunChange, int] = {
    c: run_service_pb2.RunChange.Value(f"RUN_CHANGE_{c.value}") for c in RunChange
}


# -- requests -----------------------------------------------------------------------------


def run_id_from_proto(value: str, field: str = "run_id") -> str:
    """A canonical run id; INVALID_ARGUMENT for anything that is not a UUID."""
    if not value:
        raise InvalidArgumentError(field, "required; pass the run_id returned by StartRun")
    try:
        parsed = uuid.UUID(value) if len(value) == UUID_TEXT_LEN else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise InvalidArgumentError(
            field, "must be a run id in UUID text form, e.g. 0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d"
        )
    return str(parsed)


def start_request_from_proto(request: run_service_pb2.StartRunRequest) -> StartRequest:
    """The validated StartRun request."""
    if not request.agent:
        raise InvalidArgumentError("agent", "required; ListAgents shows the available agents")
    if not _AGENT_NAME.fullmatch(request.agent):
        raise InvalidArgumentError(
            "agent",
            "must be 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    input_size = request.input.ByteSize()
    if input_size > MAX_INPUT_BYTES:
        raise InvalidInputError(
            "input", f"is {input_size} bytes encoded; the limit is {MAX_INPUT_BYTES} bytes"
        )
    if request.multitask_strategy not in STRATEGY_FROM_PROTO:
        raise InvalidArgumentError("multitask_strategy", "is not a known MultitaskStrategy value")
    timeout: float | None = None
    if request.HasField("timeout"):
        # Plain arithmetic: ToTimedelta() overflows on Durations outside datetime's range.
        timeout = request.timeout.seconds + request.timeout.nanos / 1e9
        if not 0 < timeout <= MAX_TIMEOUT_S or abs(request.timeout.nanos) >= NANOS_PER_SECOND:
            raise InvalidArgumentError("timeout", "must be positive and at most 366 days")
    return StartRequest(
        agent=request.agent,
        input=struct_to_dict(request.input),
        thread_id=_text(request.thread_id, "thread_id", 255),
        multitask_strategy=STRATEGY_FROM_PROTO[request.multitask_strategy],
        request_id=_text(request.request_id, "request_id", 128),
        labels=labels_from_proto(request.labels),
        timeout=timeout,
        retention=_retention(request),
        webhook_url=request.webhook_url,  # checked against --webhook-allow by the servicer
    )


def _retention(request: run_service_pb2.StartRunRequest) -> float | None:
    """The retention a StartRun asks for in seconds; None when unset (the server's
    default). Its upper bound, the server's --max-retention, is the runtime's to check."""
    if not request.HasField("retention"):
        return None
    # Plain arithmetic, as for the timeout: ToTimedelta() overflows on huge Durations.
    retention = request.retention.seconds + request.retention.nanos / 1e9
    if retention < MIN_RETENTION_S or abs(request.retention.nanos) >= NANOS_PER_SECOND:
        raise InvalidArgumentError(
            "retention", "must be at least 1s (and at most the server's --max-retention)"
        )
    return retention


def ttl_from_proto(request: run_service_pb2.CreateReadTokenRequest) -> float | None:
    """The lifetime a CreateReadToken asks for in seconds; None when unset or zero (the
    server's default). InvalidArgumentError for a negative or malformed one."""
    if not request.HasField("ttl"):
        return None
    ttl = request.ttl.seconds + request.ttl.nanos / 1e9
    if ttl < 0 or abs(request.ttl.nanos) >= NANOS_PER_SECOND:
        raise InvalidArgumentError("ttl", "must be a positive duration (0: the server's default)")
    return ttl or None


def filter_from_proto(
    states: Any,
    agent: str,
    thread_id: str,
    labels: Mapping[str, str],
    waiting_for_input: bool = False,
) -> RunFilter:
    """The validated filter of ListRuns or WatchRuns."""
    chosen = set()
    for value in states:
        if value not in STATE_FROM_PROTO:
            raise InvalidArgumentError(
                "states", f"{value} is not a RunState value other than UNSPECIFIED"
            )
        chosen.add(STATE_FROM_PROTO[value])
    if agent and not _AGENT_NAME.fullmatch(agent):
        raise InvalidArgumentError("agent", "is not a valid agent name")
    return RunFilter(
        states=frozenset(chosen),
        agent=agent,
        thread_id=_text(thread_id, "thread_id", 255),
        labels=labels_from_proto(labels),
        waiting_for_input=waiting_for_input,
    )


def labels_from_proto(labels: Mapping[str, str]) -> dict[str, str]:
    """Validated labels: at most 64; keys like `team` or `app.example/tier`; values ≤ 256 chars."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgumentError("labels", f"at most {MAX_LABELS} labels are allowed")
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidArgumentError(
                "labels", f"key {key[:64]!r} must be 1-63 letters, digits, '_', '.', '-' or '/'"
            )
        _text(value, f"labels[{key}]", 256)
    return dict(labels)


def input_from_proto(request: run_service_pb2.SendInputRequest) -> tuple[str, dict[str, Any], str]:
    """The run, the input and the request_id of a SendInputRequest."""
    run_id = run_id_from_proto(request.run_id)
    if not request.HasField("input"):
        raise InvalidArgumentError("input", "is required: the input to send, a JSON object")
    request_id = _text(request.request_id, "request_id", 255)
    return run_id, struct_to_dict(request.input), request_id


def reason_from_proto(value: str) -> str:
    """A validated StopRun reason."""
    return _text(value, "reason", 1024)


def _text(value: str, field: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidArgumentError(field, f"must be at most {limit} characters")
    if not _PRINTABLE.fullmatch(value):
        raise InvalidArgumentError(field, "must not contain control characters")
    return value


def append_from_proto(request: run_service_pb2.AppendEventsRequest) -> tuple[str, AppendAsk]:
    """The run and the append of an AppendEventsRequest; InvalidArgumentError if malformed."""
    run_id = run_id_from_proto(request.run_id)
    if not request.events and not request.close:
        raise InvalidArgumentError("events", "give at least one event, or close the run")
    producer = None
    if request.producer_id:
        if not 0 <= request.producer_epoch <= MAX_SAFE_INTEGER:
            raise InvalidArgumentError("producer_epoch", f"must be 0 to {MAX_SAFE_INTEGER}")
        if not 0 <= request.producer_seq <= MAX_SAFE_INTEGER:
            raise InvalidArgumentError("producer_seq", f"must be 0 to {MAX_SAFE_INTEGER}")
        producer = ProducerClaim(
            _text(request.producer_id, "producer_id", 255),
            request.producer_epoch,
            request.producer_seq,
        )
    elif request.producer_epoch or request.producer_seq:
        raise InvalidArgumentError("producer_id", "required with producer_epoch and producer_seq")
    messages = [_message(event, i) for i, event in enumerate(request.events)]
    return run_id, AppendAsk(messages=messages, close=request.close, producer=producer)


def _message(event: run_service_pb2.EventInput, index: int) -> Message:
    kind = event.WhichOneof("payload")
    event_type = _text(event.type, f"events[{index}].type", 255) or MESSAGE
    if kind == "data":
        return Message(event_type, data=struct_to_dict(event.data, f"events[{index}].data"))
    if kind == "text":
        return Message(event_type, text=event.text)
    if kind == "binary":
        return Message(event_type, binary=event.binary)
    if kind == "value":
        try:
            value = jsonmap.dumps(jsonmap.whole_numbers(json_format.MessageToDict(event.value)))
        except ValueError:
            raise InvalidInputError(
                f"events[{index}].value", "must be JSON: NaN and Infinity are not allowed"
            ) from None
        return Message(event_type, value=value)
    return Message(event_type)


def struct_to_dict(struct: struct_pb2.Struct, field: str = "input") -> dict[str, Any]:
    """A Struct as a plain dict (numbers are floats, as in JSON); JSON-only values."""
    try:
        result: dict[str, Any] = json_format.MessageToDict(struct)
    except ValueError:  # NaN and Infinity have no JSON form
        raise InvalidInputError(field, "must be JSON: NaN and Infinity are not allowed") from None
    return result


def dict_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A plain JSON-like mapping as a Struct."""
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


# -- responses ----------------------------------------------------------------------------


def _set_time(target: timestamp_pb2.Timestamp, at: datetime) -> None:
    # In place, and cheaper than Timestamp.FromDatetime: this is on every event's path.
    micros = round(at.timestamp() * 1_000_000)
    target.seconds = micros // 1_000_000
    target.nanos = micros % 1_000_000 * 1000


def failure_to_proto(failure: RunFailure) -> status_pb2.Status:
    """A run's failure as a google.rpc.Status (with ErrorInfo carrying the error id)."""
    status = status_pb2.Status(code=grpc.StatusCode[failure.code].value[0], message=failure.message)
    if failure.error_id:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.ErrorInfo(
                reason="RUN_FAILED", domain=DOMAIN, metadata={"error_id": failure.error_id}
            )
        )
        status.details.append(detail)
    return status


def run_to_proto(run: Run, default_retention: float) -> run_pb2.Run:
    """The proto form of a run; `default_retention` (seconds) sets the expire_time of a
    finished run that asked for no retention of its own."""
    msg = run_pb2.Run(
        run_id=run.run_id,
        owner=run.owner,
        agent=run.agent,
        state=STATE_TO_PROTO[run.state],  # type: ignore[arg-type]
        input=dict_to_struct(run.input),
        thread_id=run.thread_id,
        labels=dict(run.labels),
        last_seq=run.last_seq,
        stop_reason=run.stop_reason,
        request_id=run.request_id,
        multitask_strategy=STRATEGY_TO_PROTO[run.multitask_strategy],  # type: ignore[arg-type]
        webhook_url=run.webhook_url,
        waiting_for_input=run.waiting_for_input,
        usage=dict(run.usage),
        resume_count=run.resume_count,
    )
    _set_time(msg.create_time, run.created_at)
    if run.progress is not None:
        progress = run.progress
        msg.progress.CopyFrom(
            run_pb2.RunProgress(done=progress.done, total=progress.total, message=progress.message)
        )
    if run.result is not None:
        msg.result.CopyFrom(dict_to_struct(run.result))
    if run.error is not None:
        msg.error.CopyFrom(failure_to_proto(run.error))
    if run.started_at is not None:
        _set_time(msg.start_time, run.started_at)
    if run.ended_at is not None:
        _set_time(msg.end_time, run.ended_at)
    expire_at = run.expire_at(default_retention)
    if expire_at is not None:
        _set_time(msg.expire_time, expire_at)
    if run.timeout is not None:
        msg.timeout.CopyFrom(
            duration_pb2.Duration(seconds=int(run.timeout), nanos=int(run.timeout % 1 * 1e9))
        )
    return msg


def event_to_proto(event: RunEvent) -> run_pb2.RunEvent:
    """The proto form of a log event."""
    msg = run_pb2.RunEvent(run_id=event.run_id, seq=event.seq, type=event.type)
    _set_time(msg.time, event.at)
    if event.data is not None:
        msg.data.update(event.data)
    elif event.text is not None:
        msg.text = event.text
    elif event.binary is not None:
        msg.binary = event.binary
    elif event.value is not None:
        json_format.Parse(event.value, msg.value)
    if event.state is not None:
        msg.state = STATE_TO_PROTO[event.state]  # type: ignore[assignment]
    if event.error is not None:
        msg.error.CopyFrom(failure_to_proto(event.error))
    if event.resumed_from_seq:
        msg.resumed_from_seq = event.resumed_from_seq
    return msg


def failure_from_proto(status: status_pb2.Status) -> RunFailure:
    """The run failure a google.rpc.Status made by failure_to_proto describes."""
    error_id = None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            error_id = info.metadata.get("error_id") or None
    return RunFailure(_CODE_NAMES.get(status.code, "UNKNOWN"), status.message, error_id)


def decode_event(wire: bytes) -> RunEvent:
    """The event encode_event made `wire` from (numbers in data come back as floats)."""
    msg = run_pb2.RunEvent.FromString(wire)
    payload = msg.WhichOneof("payload")
    return RunEvent(
        msg.run_id,
        msg.seq,
        msg.time.ToDatetime(UTC),
        msg.type,
        data=json_format.MessageToDict(msg.data) if payload == "data" else None,
        text=msg.text if payload == "text" else None,
        binary=msg.binary if payload == "binary" else None,
        state=STATE_FROM_PROTO[msg.state] if msg.state else None,
        error=failure_from_proto(msg.error) if msg.HasField("error") else None,
        value=_value_json(msg.value) if payload == "value" else None,
        resumed_from_seq=msg.resumed_from_seq,
        wire=wire,
    )


def _value_json(value: struct_pb2.Value) -> str:
    return jsonmap.dumps(jsonmap.whole_numbers(json_format.MessageToDict(value)))


def encode_event(event: RunEvent) -> bytes:
    """The event's wire form (a serialized RunEvent), made once and stored with it."""
    wire: bytes = event_to_proto(event).SerializeToString()
    return wire


_EVENTS_TAG = b"\x0a"  # SubscribeResponse.events: field 1, length-delimited


_SEVEN_BITS = 0x7F


_ONE_BYTE_VARINTS = tuple(bytes((n,)) for n in range(_SEVEN_BITS + 1))


def _varint(value: int) -> bytes:
    if value <= _SEVEN_BITS:  # most events: a length under 128 is its own byte
        return _ONE_BYTE_VARINTS[value]
    out = bytearray()
    while value > _SEVEN_BITS:
        out.append((value & _SEVEN_BITS) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def subscribe_response_bytes(batch: Sequence[EncodedEvent]) -> bytes:
    """A serialized SubscribeResponse holding `batch`, built from each event's wire form.

    Equivalent to SubscribeResponse(events=[...]).SerializeToString(), built without
    decoding or re-encoding a single event.
    """
    return b"".join([_EVENTS_TAG + _varint(len(event.wire)) + event.wire for event in batch])


def snapshot_to_proto(snapshot: Snapshot) -> run_pb2.RunSnapshot:
    """The proto form of a run's snapshot (its data, JSON text, as a google.protobuf.Value)."""
    msg = run_pb2.RunSnapshot(seq=snapshot.seq)
    json_format.Parse(snapshot.data, msg.data)
    return msg


def snapshot_response_bytes(snapshot: Snapshot) -> bytes:
    """A serialized SubscribeResponse holding `snapshot` alone."""
    response = run_service_pb2.SubscribeResponse(snapshot=snapshot_to_proto(snapshot))
    wire: bytes = response.SerializeToString()
    return wire


def agent_to_proto(agent: AgentInfo) -> run_pb2.Agent:
    """The proto form of an agent's description."""
    return run_pb2.Agent(name=agent.name, description=agent.description)


def watch_update_to_proto(
    update: WatchUpdate, default_retention: float
) -> run_service_pb2.WatchRunsResponse:
    """The proto form of a WatchRuns change (see run_to_proto for `default_retention`)."""
    msg = run_service_pb2.WatchRunsResponse(change=CHANGE_TO_PROTO[update.change])  # type: ignore[arg-type]
    if update.run is not None:
        msg.run.CopyFrom(run_to_proto(update.run, default_retention))
    return msg


def read_token_to_proto(
    token: str, expires_at: datetime, run_id: str
) -> run_service_pb2.CreateReadTokenResponse:
    """The CreateReadToken answer."""
    msg = run_service_pb2.CreateReadTokenResponse(token=token, run_id=run_id)
    _set_time(msg.expire_time, expires_at)
    return msg


def server_stats_to_proto(
    stats: ServerStats,
    *,
    version: str,
    hostname: str,
    pid: int,
    replica: str,
    started_at: datetime,
    uptime: float,
) -> run_service_pb2.GetServerStatsResponse:
    """The GetServerStats answer: the process's figures and who the process is."""
    msg = run_service_pb2.GetServerStatsResponse(
        active_runs=stats.active_runs,
        queued_runs=stats.queued_runs,
        runs_in_memory=stats.runs_in_memory,
        subscriptions=stats.subscriptions,
        subscriber_lag_events=stats.subscriber_lag_events,
        max_subscriber_lag_events=stats.max_subscriber_lag_events,
        watches=stats.watches,
        commits=stats.commits,
        events_committed=stats.events_committed,
        pending_events=stats.pending_events,
        draining=stats.draining,
        store_problem=stats.store_problem,
        version=version,
        hostname=hostname,
        pid=pid,
        replica=replica,
    )
    _set_time(msg.start_time, started_at)
    msg.uptime.FromNanoseconds(round(uptime * 1e9))
    return msg


def deliveries_to_proto(
    deliveries: Sequence[WebhookDelivery], *, show_deployment_url: bool
) -> run_service_pb2.ListWebhookDeliveriesResponse:
    """The ListWebhookDeliveries answer. The deployment's webhook URL is the operator's (it
    may carry a token): only admins see it."""
    msg = run_service_pb2.ListWebhookDeliveriesResponse()
    for delivery in deliveries:
        shown = show_deployment_url or delivery.target.value != "DEPLOYMENT"
        item = msg.deliveries.add(
            delivery_id=delivery.delivery_id,
            run_id=delivery.run_id,
            target=webhook_pb2.WebhookTarget.Value(f"WEBHOOK_TARGET_{delivery.target.value}"),
            url=delivery.url if shown else "",
            state=webhook_pb2.WebhookDeliveryState.Value(
                f"WEBHOOK_DELIVERY_STATE_{delivery.state.value}"
            ),
        )
        _set_time(item.create_time, delivery.created_at)
        if delivery.next_attempt_at is not None:
            _set_time(item.next_attempt_time, delivery.next_attempt_at)
        if delivery.ended_at is not None:
            _set_time(item.end_time, delivery.ended_at)
        item.attempts.extend(_attempt_to_proto(a) for a in delivery.attempts)
    return msg


def _attempt_to_proto(attempt: WebhookAttempt) -> webhook_pb2.WebhookAttempt:
    msg = webhook_pb2.WebhookAttempt(
        attempt=attempt.attempt, http_status=attempt.status or 0, error=attempt.error
    )
    _set_time(msg.time, attempt.at)
    msg.duration.FromNanoseconds(round(attempt.duration * 1e9))
    return msg
