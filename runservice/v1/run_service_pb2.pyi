import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from runservice.v1 import run_pb2 as _run_pb2
from runservice.v1 import webhook_pb2 as _webhook_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_CHANGE_UNSPECIFIED: _ClassVar[RunChange]
    RUN_CHANGE_EXISTING: _ClassVar[RunChange]
    RUN_CHANGE_SNAPSHOT_END: _ClassVar[RunChange]
    RUN_CHANGE_CREATED: _ClassVar[RunChange]
    RUN_CHANGE_STATE_CHANGED: _ClassVar[RunChange]
    RUN_CHANGE_DELETED: _ClassVar[RunChange]
    RUN_CHANGE_UPDATED: _ClassVar[RunChange]
RUN_CHANGE_UNSPECIFIED: RunChange
RUN_CHANGE_EXISTING: RunChange
RUN_CHANGE_SNAPSHOT_END: RunChange
RUN_CHANGE_CREATED: RunChange
RUN_CHANGE_STATE_CHANGED: RunChange
RUN_CHANGE_DELETED: RunChange
RUN_CHANGE_UPDATED: RunChange

class StartRunRequest(_message.Message):
    __slots__ = ("agent", "input", "thread_id", "multitask_strategy", "request_id", "labels", "timeout", "retention", "webhook_url")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    MULTITASK_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    agent: str
    input: _struct_pb2.Struct
    thread_id: str
    multitask_strategy: _run_pb2.MultitaskStrategy
    request_id: str
    labels: _containers.ScalarMap[str, str]
    timeout: _duration_pb2.Duration
    retention: _duration_pb2.Duration
    webhook_url: str
    def __init__(self, agent: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., thread_id: _Optional[str] = ..., multitask_strategy: _Optional[_Union[_run_pb2.MultitaskStrategy, str]] = ..., request_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., retention: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., webhook_url: _Optional[str] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states", "agent", "thread_id", "labels", "all_users", "waiting_for_input")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ALL_USERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_INPUT_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[_run_pb2.RunState]
    agent: str
    thread_id: str
    labels: _containers.ScalarMap[str, str]
    all_users: bool
    waiting_for_input: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_run_pb2.RunState, str]]] = ..., agent: _Optional[str] = ..., thread_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., all_users: _Optional[bool] = ..., waiting_for_input: _Optional[bool] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[_run_pb2.Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[_run_pb2.Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StopRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("run_id", "from_seq", "snapshot")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_seq: int
    snapshot: bool
    def __init__(self, run_id: _Optional[str] = ..., from_seq: _Optional[int] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("events", "snapshot")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_run_pb2.RunEvent]
    snapshot: _run_pb2.RunSnapshot
    def __init__(self, events: _Optional[_Iterable[_Union[_run_pb2.RunEvent, _Mapping]]] = ..., snapshot: _Optional[_Union[_run_pb2.RunSnapshot, _Mapping]] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class DeleteRunResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRunsRequest(_message.Message):
    __slots__ = ("states", "agent", "thread_id", "labels", "all_users", "waiting_for_input")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATES_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ALL_USERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_INPUT_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_run_pb2.RunState]
    agent: str
    thread_id: str
    labels: _containers.ScalarMap[str, str]
    all_users: bool
    waiting_for_input: bool
    def __init__(self, states: _Optional[_Iterable[_Union[_run_pb2.RunState, str]]] = ..., agent: _Optional[str] = ..., thread_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., all_users: _Optional[bool] = ..., waiting_for_input: _Optional[bool] = ...) -> None: ...

class WatchRunsResponse(_message.Message):
    __slots__ = ("change", "run")
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    change: RunChange
    run: _run_pb2.Run
    def __init__(self, change: _Optional[_Union[RunChange, str]] = ..., run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[_run_pb2.Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[_run_pb2.Agent, _Mapping]]] = ...) -> None: ...

class GetServerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerStatsResponse(_message.Message):
    __slots__ = ("active_runs", "queued_runs", "runs_in_memory", "subscriptions", "subscriber_lag_events", "max_subscriber_lag_events", "watches", "commits", "events_committed", "pending_events", "draining", "store_problem", "version", "start_time", "uptime", "hostname", "pid", "replica")
    ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_RUNS_FIELD_NUMBER: _ClassVar[int]
    RUNS_IN_MEMORY_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBER_LAG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SUBSCRIBER_LAG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    WATCHES_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    PENDING_EVENTS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    STORE_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    active_runs: int
    queued_runs: int
    runs_in_memory: int
    subscriptions: int
    subscriber_lag_events: int
    max_subscriber_lag_events: int
    watches: int
    commits: int
    events_committed: int
    pending_events: int
    draining: bool
    store_problem: str
    version: str
    start_time: _timestamp_pb2.Timestamp
    uptime: _duration_pb2.Duration
    hostname: str
    pid: int
    replica: str
    def __init__(self, active_runs: _Optional[int] = ..., queued_runs: _Optional[int] = ..., runs_in_memory: _Optional[int] = ..., subscriptions: _Optional[int] = ..., subscriber_lag_events: _Optional[int] = ..., max_subscriber_lag_events: _Optional[int] = ..., watches: _Optional[int] = ..., commits: _Optional[int] = ..., events_committed: _Optional[int] = ..., pending_events: _Optional[int] = ..., draining: _Optional[bool] = ..., store_problem: _Optional[str] = ..., version: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., uptime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...

class CreateReadTokenRequest(_message.Message):
    __slots__ = ("run_id", "ttl")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, run_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CreateReadTokenResponse(_message.Message):
    __slots__ = ("token", "expire_time", "run_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    expire_time: _timestamp_pb2.Timestamp
    run_id: str
    def __init__(self, token: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run_id: _Optional[str] = ...) -> None: ...

class EventInput(_message.Message):
    __slots__ = ("type", "data", "text", "binary", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    data: _struct_pb2.Struct
    text: str
    binary: bytes
    value: _struct_pb2.Value
    def __init__(self, type: _Optional[str] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., text: _Optional[str] = ..., binary: _Optional[bytes] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class AppendEventsRequest(_message.Message):
    __slots__ = ("run_id", "events", "producer_id", "producer_epoch", "producer_seq", "close")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_SEQ_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    events: _containers.RepeatedCompositeFieldContainer[EventInput]
    producer_id: str
    producer_epoch: int
    producer_seq: int
    close: bool
    def __init__(self, run_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[EventInput, _Mapping]]] = ..., producer_id: _Optional[str] = ..., producer_epoch: _Optional[int] = ..., producer_seq: _Optional[int] = ..., close: _Optional[bool] = ...) -> None: ...

class AppendEventsResponse(_message.Message):
    __slots__ = ("last_seq", "duplicate", "closed", "producer_epoch", "producer_seq")
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_SEQ_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    duplicate: bool
    closed: bool
    producer_epoch: int
    producer_seq: int
    def __init__(self, last_seq: _Optional[int] = ..., duplicate: _Optional[bool] = ..., closed: _Optional[bool] = ..., producer_epoch: _Optional[int] = ..., producer_seq: _Optional[int] = ...) -> None: ...

class CloseRunRequest(_message.Message):
    __slots__ = ("run_id", "result")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    result: _struct_pb2.Struct
    def __init__(self, run_id: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CloseRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class ListWebhookDeliveriesRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListWebhookDeliveriesResponse(_message.Message):
    __slots__ = ("deliveries",)
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[_webhook_pb2.WebhookDelivery]
    def __init__(self, deliveries: _Optional[_Iterable[_Union[_webhook_pb2.WebhookDelivery, _Mapping]]] = ...) -> None: ...

class SendInputRequest(_message.Message):
    __slots__ = ("run_id", "input", "request_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    input: _struct_pb2.Struct
    request_id: str
    def __init__(self, run_id: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class SendInputResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: _run_pb2.RunEvent
    def __init__(self, event: _Optional[_Union[_run_pb2.RunEvent, _Mapping]] = ...) -> None: ...
