"""Hostile inputs: random and adversarial requests against every RPC of a live server.

One server runs for the whole module on its own event loop in a thread; hypothesis drives
it through a blocking channel, so thousands of requests run (and shrink) against a single
server. Every property is checked on every example:

- each answer is OK or a status documented for that RPC, never UNKNOWN or INTERNAL;
- each refusal carries a google.rpc.ErrorInfo (domain `runservice`, a reason from the
  ErrorReason enum, matching the status code), except gRPC's own RESOURCE_EXHAUSTED for a
  message above the receive limit;
- no message leaks Python internals (tracebacks, file paths, exception class reprs),
  unless the text is an echo of the request's own fields;
- a user never sees another user's run: NOT_FOUND with the same message as a random id;
- no refused StartRun leaves a run behind (the admin's listing is audited before and
  after each batch, and the newest run id after each refusal);
- the server stays healthy (grpc.health.v1 SERVING) after each batch.

The targeted tests at the end of the module pin inputs that once broke the server
(non-finite numbers, out-of-range durations, undecodable bytes, oversize pages); the
generated data covers them too.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format, struct_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runservice.v1 import error_reason_pb2, run_pb2
from runservice.v1 import run_service_pb2 as pb
from runservice.v1 import run_service_pb2_grpc as pb_grpc
from tests.conftest import Harness, start_harness
from tests.fakes import FakeClock
from tests.helpers import TERMINAL, error_info, read_all

Code = grpc.StatusCode

INPUT_LIMIT = 256 * 1024  # DESIGN §2: the service's input limit
RECEIVE_LIMIT = 4 * 1024 * 1024  # the server's default grpc.max_receive_message_length
METADATA_LIMIT = 16 * 1024  # the server's default --max-metadata-size
CLIENT_RECEIVE = 64 * 1024 * 1024
DEADLINE = 30.0
STREAM_DEADLINE = 10.0
TAIL_DEADLINE = 0.5  # a Subscribe at the live tail of an active run waits for events
USERS = ("alice", "bob", "root")
ADMIN = "root"
SERVICE = "runservice.v1.RunService"
METHODS = tuple(pb.DESCRIPTOR.services_by_name["RunService"].methods_by_name)
STREAMING = {"Subscribe", "WatchRuns"}
ACTIVE = {run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING}

COMMON = {Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE}
ALLOWED: dict[str, set[Code]] = {
    "StartRun": COMMON | {Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS},
    "GetRun": COMMON | {Code.NOT_FOUND},
    "ListRuns": COMMON | {Code.PERMISSION_DENIED},
    "StopRun": COMMON | {Code.NOT_FOUND},
    "Subscribe": COMMON | {Code.NOT_FOUND, Code.OUT_OF_RANGE},
    "DeleteRun": COMMON | {Code.NOT_FOUND, Code.FAILED_PRECONDITION},
    "WatchRuns": COMMON | {Code.PERMISSION_DENIED},
    "ListAgents": COMMON,
    "GetServerStats": COMMON | {Code.PERMISSION_DENIED},
    "CreateReadToken": COMMON | {Code.NOT_FOUND},
    "ListWebhookDeliveries": COMMON | {Code.NOT_FOUND},
    "AppendEvents": COMMON | {Code.NOT_FOUND, Code.FAILED_PRECONDITION},
    "CloseRun": COMMON | {Code.NOT_FOUND, Code.FAILED_PRECONDITION},
    "SendInput": COMMON | {Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.ALREADY_EXISTS},
}

# ErrorReason → the code the proto documents for it. A reason missing here (added later)
# must still be a value of the enum.
REASON_NAMES = {
    n.removeprefix("ERROR_REASON_") for n in error_reason_pb2.ErrorReason.DESCRIPTOR.values_by_name
}
REASON_CODES: dict[str, Code] = {
    "RUN_NOT_FOUND": Code.NOT_FOUND,
    "UNKNOWN_AGENT": Code.INVALID_ARGUMENT,
    "INVALID_INPUT": Code.INVALID_ARGUMENT,
    "INVALID_PAGE_TOKEN": Code.INVALID_ARGUMENT,
    "INVALID_ARGUMENT": Code.INVALID_ARGUMENT,
    "SEQ_OUT_OF_RANGE": Code.OUT_OF_RANGE,
    "THREAD_BUSY": Code.FAILED_PRECONDITION,
    "RUN_ACTIVE": Code.FAILED_PRECONDITION,
    "REQUEST_ID_REUSED": Code.ALREADY_EXISTS,
    "TOO_MANY_ACTIVE_RUNS": Code.RESOURCE_EXHAUSTED,
    "TOO_MANY_STREAMS": Code.RESOURCE_EXHAUSTED,
    "SERVER_DRAINING": Code.UNAVAILABLE,
    "ADMIN_ONLY": Code.PERMISSION_DENIED,
    "READ_TOKEN_SCOPE": Code.PERMISSION_DENIED,
    "TOKEN_EXPIRED": Code.UNAUTHENTICATED,
    "CREDENTIALS_MISSING": Code.UNAUTHENTICATED,
    "CREDENTIALS_INVALID": Code.UNAUTHENTICATED,
    "INTERNAL_ERROR": Code.INTERNAL,
    "WEBHOOK_URL_NOT_ALLOWED": Code.INVALID_ARGUMENT,
    "STREAM_CLOSED": Code.FAILED_PRECONDITION,
    "PRODUCER_EPOCH_STALE": Code.FAILED_PRECONDITION,
    "PRODUCER_SEQ_GAP": Code.FAILED_PRECONDITION,
    "STREAM_SEQ_CONFLICT": Code.FAILED_PRECONDITION,
    "STREAM_EXISTS": Code.ALREADY_EXISTS,
    "CONTENT_TYPE_MISMATCH": Code.FAILED_PRECONDITION,
    "TOO_MANY_OPEN_STREAMS": Code.RESOURCE_EXHAUSTED,
    "STREAM_DELETED": Code.NOT_FOUND,
    "NOT_EXTERNAL": Code.FAILED_PRECONDITION,
    "RUN_ENDED": Code.FAILED_PRECONDITION,
    "EXTERNAL_RUN": Code.FAILED_PRECONDITION,
}
AUTH_REASONS = {"CREDENTIALS_MISSING", "CREDENTIALS_INVALID", "TOKEN_EXPIRED"}

# What a message must never contain unless the client itself sent that text.
LEAKS = (
    "Traceback",
    'File "',
    "Error(",
    "Exception(",
    "<class '",
    "object at 0x",
    "site-packages",
    "sqlalchemy",
    "sqlite3",
)

_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}")
MAX_TIMEOUT_S = 366 * 24 * 3600


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# -- the live server ----------------------------------------------------------------------


@dataclass(frozen=True)
class Filt:
    """A ListRuns / WatchRuns filter, kept as plain values to compare and match."""

    states: tuple[int, ...] = ()
    agent: str = ""
    thread_id: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    def key(self) -> tuple[Any, ...]:
        return (frozenset(self.states), self.agent, self.thread_id, frozenset(self.labels))

    def fill(self, request: Any) -> Any:
        request.states.extend(self.states)
        request.agent = self.agent
        request.thread_id = self.thread_id
        request.labels.update(dict(self.labels))
        return request

    def matches(self, run: run_pb2.Run, *, default_states: set[int] | None = None) -> bool:
        states = set(self.states) or default_states
        return (
            (not states or run.state in states)
            and (not self.agent or run.agent == self.agent)
            and (not self.thread_id or run.thread_id == self.thread_id)
            and all(run.labels.get(k) == v for k, v in self.labels)
        )


@dataclass(frozen=True)
class IssuedToken:
    """A real next_page_token and the query it was issued for."""

    token: str
    user: str
    everyone: bool
    filt: Filt


@dataclass
class Live:
    """The module's server, its seeded runs, and what the tests learned along the way."""

    harness: Harness
    loop: asyncio.AbstractEventLoop
    channel: grpc.Channel
    stub: pb_grpc.RunServiceStub
    health: health_pb2_grpc.HealthStub
    agents: set[str] = field(default_factory=set)
    owners: dict[str, str] = field(default_factory=dict)  # every run id we know → owner
    finished: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    active: dict[str, str] = field(default_factory=dict)  # user → an active seed run
    last_seq: dict[str, int] = field(default_factory=dict)  # seed run → its stable last_seq
    deleted: set[str] = field(default_factory=set)
    page_tokens: list[IssuedToken] = field(default_factory=list)
    not_found: dict[str, tuple[str, str, tuple[str, ...]]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)

    def md(self, user: str | None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.harness.tokens[user]}"),) if user else ()

    def runs_of(self, user: str) -> list[str]:
        return [r for r, owner in self.owners.items() if owner == user and r not in self.deleted]

    def others(self, user: str) -> list[str]:
        return [r for r, owner in self.owners.items() if owner != user and r not in self.deleted]

    def tick(self, rpc: str) -> None:
        self.calls[rpc] += 1
        if sum(self.calls.values()) % 250 == 0:
            assert_healthy(self)


def assert_healthy(live: Live) -> None:
    """Health answers SERVING for the server and the service, and a plain call works."""
    for service in ("", SERVICE):
        answer = live.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    agents = live.stub.ListAgents(pb.ListAgentsRequest(), metadata=live.md("alice"), timeout=10)
    assert {"echo", "ticker"} <= {a.name for a in agents.agents}


def _wait_terminal(live: Live, run_id: str, user: str) -> run_pb2.Run:
    deadline = time.monotonic() + 20
    while True:
        run = live.stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=live.md(user)).run
        if run.state in TERMINAL:
            return run
        assert time.monotonic() < deadline, f"run {run_id} did not finish"
        time.sleep(0.01)


def _start(live: Live, user: str, agent: str, inp: dict[str, Any], **fields: Any) -> str:
    request = pb.StartRunRequest(agent=agent, **fields)
    request.input.update(inp)
    run = live.stub.StartRun(request, metadata=live.md(user), timeout=DEADLINE).run
    live.owners[run.run_id] = user
    return run.run_id


def _start_active(live: Live, user: str, **fields: Any) -> str:
    """An echo run that emits one token, then sleeps for an hour: active until stopped."""
    run_id = _start(live, user, "echo", {"text": "a b", "delay": 3600.0}, **fields)
    deadline = time.monotonic() + 20
    while (
        live.stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=live.md(user)).run.last_seq < 2
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return run_id


SEED_FILTERS = (
    Filt(),
    Filt(labels=(("seed", "yes"),)),
    Filt(thread_id="seed-thread"),
    Filt(states=(run_pb2.RUN_STATE_SUCCEEDED,)),
    Filt(agent="echo"),
)


def _seed(live: Live) -> None:
    """Finished and active runs for every user, page tokens, and NOT_FOUND's shape."""
    live.agents = {
        a.name
        for a in live.stub.ListAgents(pb.ListAgentsRequest(), metadata=live.md("alice")).agents
    }
    for user in USERS:
        labels = {"seed": "yes", "team": "blue"}
        for text in ("hello world", "again"):
            run_id = _start(
                live, user, "echo", {"text": text}, labels=labels, thread_id="seed-thread"
            )
            _wait_terminal(live, run_id, user)
            live.finished[user].append(run_id)
        live.finished[user].append(_start(live, user, "refusing", {}, labels={"team": "red"}))
        live.finished[user].append(_start(live, user, "recorder", {}))
        for run_id in live.finished[user]:
            live.last_seq[run_id] = _wait_terminal(live, run_id, user).last_seq
        live.active[user] = _start_active(live, user, labels={"seed": "active"})
        live.last_seq[live.active[user]] = 2
    for user in USERS:
        for filt in SEED_FILTERS:
            for everyone in (False, True) if user == ADMIN else (False,):
                request = filt.fill(pb.ListRunsRequest(page_size=1, all_users=everyone))
                answer = live.stub.ListRuns(request, metadata=live.md(user))
                assert answer.next_page_token, (user, filt)
                live.page_tokens.append(IssuedToken(answer.next_page_token, user, everyone, filt))
    missing = str(uuid.uuid4())
    for rpc in ("GetRun", "StopRun", "Subscribe", "DeleteRun"):
        err = _call(live, rpc, _by_id(rpc, missing), "alice").error
        assert err is not None and err.code() == Code.NOT_FOUND
        live.not_found[rpc] = _not_found_shape(err, missing)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A server on its own loop in a thread, seeded, with a blocking channel to it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="hostile-server", daemon=True)
    thread.start()
    data_dir: Path = tmp_path_factory.mktemp("hostile")
    harness = asyncio.run_coroutine_threadsafe(
        start_harness(data_dir, FakeClock(), stop_grace=1.0, drain_timeout=0.5), loop
    ).result(60)
    channel = grpc.insecure_channel(
        harness.address, options=[("grpc.max_receive_message_length", CLIENT_RECEIVE)]
    )
    state = Live(
        harness,
        loop,
        channel,
        pb_grpc.RunServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )
    try:
        _seed(state)
        yield state
    finally:
        channel.close()

        async def stop() -> None:
            await harness.channel.close()
            await harness.app.stop()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


# -- calling and checking -----------------------------------------------------------------


@dataclass
class Outcome:
    """A unary response, or the first messages of a stream, or the refusal."""

    rpc: str
    response: Any = None
    messages: list[Any] = field(default_factory=list)
    error: Any = None  # a grpc.RpcError that is also a grpc.Call

    @property
    def code(self) -> Code:
        return Code.OK if self.error is None else self.error.code()

    @property
    def details(self) -> str:
        return "" if self.error is None else self.error.details() or ""


def _call(
    live: Live,
    rpc: str,
    request: Message,
    user: str | None,
    *,
    metadata: tuple[tuple[str, Any], ...] | None = None,
    timeout: float | None = None,
    first: int = 1,
    last: Callable[[Any], bool] | None = None,
) -> Outcome:
    """Calls `rpc`; a stream is read for `first` messages (or up to one that is `last`)
    and then cancelled."""
    method = getattr(live.stub, rpc)
    md = live.md(user) if metadata is None else metadata
    outcome = Outcome(rpc)
    live.tick(rpc)
    try:
        if rpc in STREAMING:
            call = method(
                request, metadata=md, timeout=STREAM_DEADLINE if timeout is None else timeout
            )
            try:
                for message in call:
                    outcome.messages.append(message)
                    if len(outcome.messages) >= first or (last is not None and last(message)):
                        break
            finally:
                call.cancel()
        else:
            outcome.response = method(
                request, metadata=md, timeout=DEADLINE if timeout is None else timeout
            )
    except grpc.RpcError as exc:
        outcome.error = exc
    return outcome


def _strings_of(message: Message) -> list[str]:
    """Every string in a message, map keys included: what a server may echo back."""
    out: list[str] = []
    for fd, value in message.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            for key, item in value.items():
                out.append(str(key))
                out.extend(_strings_of(item) if isinstance(item, Message) else [str(item)])
        elif fd.is_repeated:
            for item in value:
                out.extend(_strings_of(item) if isinstance(item, Message) else [str(item)])
        elif isinstance(value, Message):
            out.extend(_strings_of(value))
        elif isinstance(value, str):
            out.append(value)
    return out


def _assert_no_leak(text: str, echoes: list[str], what: str) -> None:
    for pattern in LEAKS:
        if pattern in text and not any(pattern in echo for echo in echoes):
            raise AssertionError(f"{what} leaks {pattern!r}: {text[:500]!r}")


def check_refusal(
    outcome: Outcome, request: Message, *, deadline_set: bool = False, metadata_size: int = 0
) -> error_details_pb2.ErrorInfo | None:
    """A refusal has a documented code, an ErrorInfo that fits it, and no internals."""
    err = outcome.error
    assert err is not None
    code, details = outcome.code, outcome.details
    assert code not in (Code.UNKNOWN, Code.INTERNAL), f"{outcome.rpc}: {code} {details[:500]!r}"
    if code == Code.DEADLINE_EXCEEDED:
        assert deadline_set, f"{outcome.rpc}: DEADLINE_EXCEEDED without a short client deadline"
        return None
    assert code in ALLOWED[outcome.rpc], f"{outcome.rpc}: undocumented {code} {details[:300]!r}"
    info = error_info(err)
    if info is None:
        # gRPC's own refusal of a message or of metadata above the server's limits.
        assert code == Code.RESOURCE_EXHAUSTED, f"{outcome.rpc}: {code} without ErrorInfo"
        too_big = request.ByteSize() > RECEIVE_LIMIT and "larger than max" in details
        too_many_headers = metadata_size > METADATA_LIMIT and "metadata size" in details
        assert too_big or too_many_headers, f"{outcome.rpc}: {details!r}"
        return None
    assert info.domain == "runservice", info
    assert info.reason in REASON_NAMES, info
    expected = REASON_CODES.get(info.reason)
    assert expected is None or expected == code, f"{outcome.rpc}: {info.reason} with {code}"
    assert info.reason != "INTERNAL_ERROR", details
    echoes = _strings_of(request)
    _assert_no_leak(details, echoes, f"{outcome.rpc} message")
    for value in info.metadata.values():
        _assert_no_leak(value, echoes, f"{outcome.rpc} ErrorInfo metadata")
    return info


def check_run(run: run_pb2.Run, user: str, *, any_owner: bool = False) -> None:
    """A run a caller received: theirs (unless an admin listing), with no internals."""
    if not any_owner:
        assert run.owner == user, f"{user} was shown {run.owner}'s run {run.run_id}"
    assert str(uuid.UUID(run.run_id)) == run.run_id
    assert run.state != run_pb2.RUN_STATE_UNSPECIFIED
    if run.HasField("error"):  # it may quote what the client gave: a stop reason, say
        echoes = [run.stop_reason, run.thread_id, *run.labels.values(), *_strings_of(run.input)]
        _assert_no_leak(run.error.message, echoes, f"run {run.run_id} error")


def _canonical(run_id: str) -> str | None:
    """The id a lenient UUID parser reads in `run_id`, or None."""
    if len(run_id) != 36:
        return None
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return None


def _not_found_shape(err: Any, run_id: str) -> tuple[str, str, tuple[str, ...]]:
    info = error_info(err)
    assert info is not None
    masked = tuple(sorted(f"{k}={v.replace(run_id, '<id>')}" for k, v in info.metadata.items()))
    return (err.details().replace(run_id, "<id>"), info.reason, masked)


def assert_not_found_like_missing(live: Live, outcome: Outcome, canon: str) -> None:
    """NOT_FOUND, worded exactly as for a random id that was never issued."""
    assert outcome.code == Code.NOT_FOUND, f"{outcome.rpc}: {outcome.code} {outcome.details!r}"
    assert _not_found_shape(outcome.error, canon) == live.not_found[outcome.rpc]


def _by_id(rpc: str, run_id: str) -> Message:
    return {
        "GetRun": pb.GetRunRequest,
        "StopRun": pb.StopRunRequest,
        "Subscribe": pb.SubscribeRequest,
        "DeleteRun": pb.DeleteRunRequest,
    }[rpc](run_id=run_id)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def _newest(live: Live) -> str:
    request = pb.ListRunsRequest(all_users=True, page_size=1)
    answer = live.stub.ListRuns(request, metadata=live.md(ADMIN), timeout=DEADLINE)
    return answer.runs[0].run_id if answer.runs else ""


def audit(live: Live) -> dict[str, set[str]]:
    """Every stored run by owner, as the admin's paged listing shows them."""
    by_owner: dict[str, set[str]] = defaultdict(set)
    token = ""
    while True:
        request = pb.ListRunsRequest(all_users=True, page_size=20, page_token=token)
        answer = live.stub.ListRuns(request, metadata=live.md(ADMIN), timeout=60)
        for run in answer.runs:
            by_owner[run.owner].add(run.run_id)
        token = answer.next_page_token
        if not token:
            return by_owner


# -- strategies ---------------------------------------------------------------------------

_CHARS = st.characters(codec="utf-8")
NASTY = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\r\n",
    "\t",
    "\x1b[31mred",
    "\x7f",
    "\u0085",
    "\u2028",
    "\u202egnp.exe",
    "\ufeff",
    "\U0001f642",
    "e\u0301",
    "../../../../etc/passwd",
    "..\\..\\boot.ini",
    "%2e%2e%2f%2e%2e%2f",
    "/dev/null",
    "C:\\CON",
    "' OR '1'='1",
    '"; DROP TABLE runs; --',
    "%s%s%s%n",
    "{0}{1}",
    "${jndi:ldap://x/a}",
    "{{7*7}}",
    "<script>alert(1)</script>",
    "null",
    "None",
    "NaN",
    "-1",
    "9" * 40,
    "Traceback (most recent call last):",
    "ValueError('x')",
)
SIZES = (63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 65_536)


def _repeat(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


LONG = st.builds(
    _repeat, st.sampled_from(("x", "é", "\U0001f642", "\x00", "ab ", "-")), st.sampled_from(SIZES)
)


def texts(small: int = 40) -> st.SearchStrategy[str]:
    """Short random unicode, nasty classics, and long runs at interesting lengths."""
    return st.one_of(st.text(_CHARS, max_size=small), st.sampled_from(NASTY), LONG)


OVERSIZE = st.sampled_from([False] * 29 + [True])  # ~1 in 30: a message above 4 MiB
HUGE = _repeat("h", RECEIVE_LIMIT + 1024)
CALLERS = st.sampled_from(USERS)
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
ENUMS = st.one_of(st.integers(0, 8), INT32)

_KEYS = st.one_of(st.text(_CHARS, max_size=16), st.sampled_from(NASTY))
_LEAF = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False), st.text(_CHARS, max_size=24)
)
_FINITE = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(_CHARS, max_size=24),
)


def _json(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaf,
        lambda kids: st.one_of(
            st.lists(kids, max_size=4), st.dictionaries(_KEYS, kids, max_size=4)
        ),
        max_leaves=12,
    )


_JSON = _json(_FINITE)
_HOSTILE_JSON = _json(st.one_of(_LEAF, st.just(math.nan), st.just(-math.inf)))


def _nest(depth: int, as_list: bool, leaf: str) -> Any:
    value: Any = leaf
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


def _blob(unit: str, size: int) -> dict[str, Any]:
    return {"blob": _repeat(unit, size)}


def _many_keys(count: int) -> dict[str, Any]:
    return {f"key{i}": i for i in range(count)}


INPUTS = st.one_of(
    st.dictionaries(_KEYS, _HOSTILE_JSON, max_size=6),
    # Past ~32 levels a Struct is deeper than the protobuf decoder accepts.
    st.builds(
        lambda d: {"deep": d},
        st.builds(_nest, st.integers(1, 80), st.booleans(), st.text(_CHARS, max_size=8)),
    ),
    # Near and above the 256 KiB input limit (encoded size ≈ characters times bytes each).
    st.builds(
        _blob,
        st.sampled_from(("x", "é", "\U0001f642")),
        st.sampled_from(
            (1000, 65_000, 65_536, 87_000, 131_000, 262_100, 262_131, 262_144, 270_000)
        ),
    ),
    st.builds(_many_keys, st.integers(100, 3000)),
)
STRATEGIES = st.one_of(st.sampled_from(list(run_pb2.MultitaskStrategy.values())), ENUMS)
THREADS = st.one_of(st.sampled_from(("", "", "hostile-1", "hostile-2", "seed-thread")), texts())
REQUEST_IDS = st.one_of(st.sampled_from(("", "", "rid-1", "rid-2")), st.uuids().map(str), texts())
LABEL_KEYS = st.one_of(
    st.from_regex(_LABEL_KEY, fullmatch=True),
    st.sampled_from(("team", "seed", "a" * 63, "a" * 64, "-lead", "k\x00", "app.example/tier")),
    texts(16),
)


def _many_labels(count: int) -> dict[str, str]:
    return {f"k{i}": str(i) for i in range(count)}


LABELS = st.one_of(
    st.dictionaries(LABEL_KEYS, texts(), max_size=4),
    st.builds(_many_labels, st.integers(60, 70)),
)
DURATION_S = 315_576_000_000  # google.protobuf.Duration's documented range
DURATIONS = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(
        st.sampled_from((0, 1, -1, 60, MAX_TIMEOUT_S, MAX_TIMEOUT_S + 1, DURATION_S, -DURATION_S)),
        st.integers(-DURATION_S, DURATION_S),
        INT64,
    ),
    nanos=st.one_of(
        st.sampled_from((0, 1, -1, 999_999_999, -999_999_999, 10**9, -(2**31))),
        st.integers(-999_999_999, 999_999_999),
    ),
)
AGENTS = st.one_of(
    st.sampled_from(("echo", "recorder", "refusing")),
    st.sampled_from(
        (
            "",
            "ECHO",
            "echo ",
            " echo",
            "echo\x00",
            "../echo",
            "echo/../ticker",
            "-echo",
            "a" * 128,
            "a" * 129,
            "no-such-agent",
            "runservice.agents:echo",
        )
    ),
    texts(),
)


def pick(*options: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `options`, chosen with the given weights (st.one_of flattens nested
    one_of strategies into equal shares, which would drown a few good values)."""
    return st.sampled_from([s for weight, s in options for _ in range(weight)]).flatmap(lambda s: s)


DEADLINES = pick((4, st.none()), (1, st.sampled_from((-1.0, 0.0, 1e-6, 1e-3, 1e6))))


def _digits(text: str, zero: str) -> str:
    return text.translate({ord("0") + i: chr(ord(zero) + i) for i in range(10)})


def _aliases(run_id: str) -> list[str]:
    """Other spellings of a run id: forms a lenient parser may map onto the same run."""
    bare = run_id.replace("-", "")
    return [
        run_id.upper(),
        bare + "----",
        "-" + bare[:8] + "-" + bare[8:20] + "-" + bare[20:] + "-",
        _digits(run_id, "\u0660"),  # Arabic-Indic digits
        _digits(run_id, "\uff10"),  # fullwidth digits
        " " + run_id[1:],
        run_id[:-1] + "\x00",
        "../" + run_id,
        run_id + "/../" + run_id,
        run_id + "\n",
        "{" + run_id + "}",
        "urn:uuid:" + run_id,
        run_id[:-1] + ("0" if run_id[-1] != "0" else "1"),
    ]


def run_ids(pool: list[str]) -> st.SearchStrategy[str]:
    """Real ids from `pool`, their aliases, random UUIDs, and junk."""
    real = st.sampled_from(pool) if pool else st.uuids().map(str)
    return st.one_of(
        real,
        real,
        real.flatmap(lambda r: st.sampled_from(_aliases(r))),
        st.uuids().map(str),
        st.uuids().map(_v7),
        texts(),
        st.text(_CHARS, min_size=36, max_size=36),
    )


def _v7(value: uuid.UUID) -> str:
    """A random id shaped like the server's (UUID version 7)."""
    return str(uuid.UUID(int=value.int & ~(0xF << 76) | 7 << 76))


@st.composite
def filters(draw: st.DrawFn) -> Filt:
    seedish = draw(st.sampled_from((*SEED_FILTERS, None, None)))
    if seedish is not None:
        return seedish
    return Filt(
        states=tuple(draw(st.lists(st.one_of(st.integers(1, 7), ENUMS), max_size=3))),
        agent=draw(st.one_of(st.sampled_from(("", "", "echo", "recorder", "refusing")), texts())),
        thread_id=draw(st.one_of(st.sampled_from(("", "", "seed-thread")), texts())),
        labels=tuple(draw(st.one_of(st.just({}), st.just({"seed": "yes"}), LABELS)).items()),
    )


def _filter_verdict(filt: Filt) -> str:
    if any(s not in run_pb2.RunState.values() or s == 0 for s in filt.states):
        return "invalid"
    if _has_control(filt.thread_id) or any(_has_control(v) for _, v in filt.labels):
        return "invalid"
    if len(filt.labels) > 64 or (filt.agent and not _AGENT_NAME.fullmatch(filt.agent)):
        return "invalid"
    ok = len(filt.thread_id) <= 255 and all(
        _LABEL_KEY.fullmatch(k) and len(v) <= 256 for k, v in filt.labels
    )
    return "valid" if ok else "either"


# -- StartRun -----------------------------------------------------------------------------


# Well-formed but still awkward values: what a StartRun must accept.
_PRINTABLE = st.characters(codec="utf-8", exclude_categories=("Cc",))


def clean_texts(limit: int) -> st.SearchStrategy[str]:
    """Text without control characters, at most `limit` long, nasty classics included."""
    return st.one_of(
        st.text(_PRINTABLE, max_size=min(limit, 40)),
        st.sampled_from([t for t in NASTY if not _has_control(t)]),
        st.builds(
            _repeat, st.sampled_from(("x", "é", "\U0001f642", "ab ")), st.sampled_from(SIZES)
        ),
    ).map(lambda t: t[:limit])


CLEAN = {
    "agent": st.sampled_from(("echo", "recorder", "refusing")),
    "input": st.one_of(
        st.dictionaries(_KEYS, _JSON, max_size=6),
        st.builds(
            lambda d: {"deep": d},
            st.builds(_nest, st.integers(1, 30), st.booleans(), st.text(_CHARS, max_size=8)),
        ),
        st.builds(_blob, st.just("x"), st.sampled_from((1000, 65_536, 200_000, 262_100))),
        st.builds(_blob, st.just("\U0001f642"), st.sampled_from((16_384, 65_500))),
        st.builds(_many_keys, st.integers(100, 3000)),
    ),
    "thread_id": st.one_of(st.sampled_from(("", "hostile-1", "seed-thread")), clean_texts(256)),
    "multitask_strategy": st.sampled_from(sorted(run_pb2.MultitaskStrategy.values())),
    "request_id": st.one_of(
        st.sampled_from(("", "rid-1", "rid-2")), st.uuids().map(str), clean_texts(128)
    ),
    "labels": st.one_of(
        st.dictionaries(st.from_regex(_LABEL_KEY, fullmatch=True), clean_texts(256), max_size=4),
        st.just(_many_labels(64)),
    ),
    "timeout": st.one_of(
        st.none(),
        st.builds(duration_pb2.Duration, seconds=st.integers(1, MAX_TIMEOUT_S)),
        st.builds(duration_pb2.Duration, nanos=st.integers(1000, 999_999_999)),
    ),
}
HOSTILE = {
    "agent": AGENTS,
    "input": INPUTS,
    "thread_id": THREADS,
    "multitask_strategy": STRATEGIES,
    "request_id": REQUEST_IDS,
    "labels": LABELS,
    "timeout": st.one_of(st.none(), DURATIONS),
}


@st.composite
def start_requests(draw: st.DrawFn) -> pb.StartRunRequest:
    """Half well-formed requests, a quarter with one hostile field, a quarter all hostile."""
    mode = draw(st.sampled_from(("clean", "clean", "one", "chaos")))
    bad = draw(st.sampled_from(sorted(HOSTILE))) if mode == "one" else None
    fields = {
        name: draw(HOSTILE[name] if mode == "chaos" or name == bad else CLEAN[name])
        for name in sorted(CLEAN)
    }
    inp, timeout = fields.pop("input"), fields.pop("timeout")
    if fields["agent"] == "echo":  # keep echo runs short: no delay, a few words at most
        inp = {k: v for k, v in inp.items() if k not in ("text", "delay")}
        words = draw(st.none() | st.text(_CHARS, max_size=40))
        if words is not None:
            inp["text"] = words
    request = pb.StartRunRequest(**fields)
    request.input.update(inp)
    if timeout is not None:
        request.timeout.CopyFrom(timeout)
    if draw(OVERSIZE):
        request.input["pad"] = HUGE
    return request


def _shape(struct: struct_pb2.Struct) -> tuple[int, bool]:
    """How deeply `struct` nests containers, and whether it holds a NaN or an Infinity."""
    depth, non_finite = 0, False
    stack = [(v, 1) for v in struct.fields.values()]
    while stack:
        value, level = stack.pop()
        depth = max(depth, level)
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            non_finite = non_finite or not math.isfinite(value.number_value)
        elif kind == "struct_value":
            stack.extend((v, level + 1) for v in value.struct_value.fields.values())
        elif kind == "list_value":
            stack.extend((v, level + 1) for v in value.list_value.values)
    return depth, non_finite


def _timeout_s(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _start_verdict(request: pb.StartRunRequest, agents: set[str]) -> str:
    """`invalid` when the request is plainly malformed, `valid` when plainly fine."""
    if request.ByteSize() > RECEIVE_LIMIT:
        return "invalid"
    timeout = _timeout_s(request.timeout) if request.HasField("timeout") else None
    texts_ = (request.thread_id, request.request_id, *request.labels.values())
    depth, non_finite = _shape(request.input)
    if (
        request.agent not in agents
        or non_finite
        or request.input.ByteSize() > INPUT_LIMIT
        or request.multitask_strategy not in run_pb2.MultitaskStrategy.values()
        or (timeout is not None and timeout <= 0)
        or abs(request.timeout.seconds) > DURATION_S
        or abs(request.timeout.nanos) >= 10**9
        or len(request.labels) > 64
        or any(_has_control(t) for t in texts_)
    ):
        return "invalid"
    fine = (
        depth <= 30  # deeper, the protobuf decoder may refuse the whole request
        and len(request.thread_id) <= 255
        and len(request.request_id) <= 128
        and all(_LABEL_KEY.fullmatch(k) and len(v) <= 256 for k, v in request.labels.items())
        # Under a microsecond, a server may round the timeout down to zero.
        and (timeout is None or 1e-6 <= timeout <= MAX_TIMEOUT_S)
    )
    return "valid" if fine else "either"


def test_start_run_refuses_hostile_requests_cleanly_and_leaves_nothing_behind(
    live: Live,
) -> None:
    """StartRun: documented answers only, refusals create no run, accepted runs echo input."""
    before = audit(live)
    accepted: dict[str, set[str]] = defaultdict(set)
    big: dict[str, str] = {}
    newest = [_newest(live)]

    @_settings(400)
    @given(user=CALLERS, request=start_requests())
    def example(user: str, request: pb.StartRunRequest) -> None:
        verdict = _start_verdict(request, live.agents)
        outcome = _call(live, "StartRun", request, user)
        if outcome.error is not None:
            check_refusal(outcome, request)
            if verdict == "valid":
                assert outcome.code in {
                    Code.FAILED_PRECONDITION,
                    Code.ALREADY_EXISTS,
                    Code.RESOURCE_EXHAUSTED,
                }, f"a well-formed StartRun was refused: {outcome.code} {outcome.details!r}"
            if verdict == "invalid" and request.ByteSize() <= RECEIVE_LIMIT:
                assert outcome.code == Code.INVALID_ARGUMENT, outcome.details
            assert _newest(live) == newest[0], "a refused StartRun left a run behind"
            return
        assert verdict != "invalid", f"a malformed StartRun was accepted: {request.agent!r}"
        run = outcome.response.run
        check_run(run, user)
        assert (run.agent, run.thread_id, run.request_id) == (
            request.agent,
            request.thread_id,
            request.request_id,
        )
        assert dict(run.labels) == dict(request.labels)
        assert json_format.MessageToDict(run.input) == json_format.MessageToDict(request.input)
        if run.run_id not in live.owners:
            assert run.state in ACTIVE, run.state
        live.owners[run.run_id] = user
        accepted[user].add(run.run_id)
        if run.ByteSize() > 32 * 1024:
            big[run.run_id] = user
        newest[0] = max(newest[0], run.run_id)  # ids sort by creation time

    example()
    after = audit(live)
    for user in USERS:
        assert before[user] <= after[user], f"{user} lost runs"
        assert after[user] - before[user] == accepted[user] - before[user], user
    # Accepted runs with large inputs are deleted again, so that the later listings and
    # audits stay light (their owners' DeleteRun is the operation under test there too).
    for run_id, user in big.items():
        _wait_terminal(live, run_id, user)
        live.stub.DeleteRun(pb.DeleteRunRequest(run_id=run_id), metadata=live.md(user))
        live.deleted.add(run_id)
    assert_healthy(live)


# -- GetRun -------------------------------------------------------------------------------


def _expect_lookup(live: Live, user: str, run_id: str, outcome: Outcome) -> str | None:
    """Checks the part every by-id RPC shares; returns the canonical id when it resolved."""
    canon = _canonical(run_id)
    if canon is None:
        assert outcome.code in {
            Code.INVALID_ARGUMENT,
            Code.RESOURCE_EXHAUSTED,
            Code.DEADLINE_EXCEEDED,
        }, f"{outcome.rpc}({run_id[:80]!r}): {outcome.code}"
        return None
    owner = live.owners.get(canon)
    mine = owner == user and canon not in live.deleted
    if not mine and outcome.code == Code.NOT_FOUND:
        assert_not_found_like_missing(live, outcome, canon)
    if not mine:
        assert outcome.code != Code.OK, f"{user} reached {owner}'s run {canon} via {run_id!r}"
    return canon


def test_get_run_answers_every_id_and_never_shows_another_users_run(live: Live) -> None:
    """GetRun: own ids OK; other users', random and deleted ids NOT_FOUND; junk refused."""
    own = {u: live.runs_of(u)[:50] for u in USERS}
    pools = {u: [*own[u][:10], *live.others(u)[:50], *sorted(live.deleted)[:10]] for u in USERS}

    @_settings(350)
    @given(data=st.data(), user=st.sampled_from(("alice", "bob")), deadline=DEADLINES)
    def example(data: st.DataObject, user: str, deadline: float | None) -> None:
        run_id = data.draw(pick((2, st.sampled_from(own[user])), (3, run_ids(pools[user]))))
        if data.draw(OVERSIZE):
            run_id = HUGE
        request = pb.GetRunRequest(run_id=run_id)
        outcome = _call(live, "GetRun", request, user, timeout=deadline)
        if outcome.error is not None:
            check_refusal(outcome, request, deadline_set=deadline is not None)
        canon = _expect_lookup(live, user, run_id, outcome)
        if outcome.error is None:
            check_run(outcome.response.run, user)
            assert outcome.response.run.run_id == canon
        elif run_id == canon and live.owners.get(canon) == user and canon not in live.deleted:
            assert deadline is not None, f"own run {canon}: {outcome.code}"

    example()
    assert_healthy(live)


# -- ListRuns -----------------------------------------------------------------------------


def _mutations(token: str) -> st.SearchStrategy[str]:
    index = st.integers(0, len(token) - 1)
    return st.one_of(
        st.tuples(index, st.integers(0, 6)).map(
            lambda p: token[: p[0]] + chr(ord(token[p[0]]) ^ (1 << p[1])) + token[p[0] + 1 :]
        ),
        index.map(lambda i: token[:i]),
        texts().map(lambda t: token + t),
        st.integers(1, 4).map(lambda n: token + "=" * n),
        st.just(token.swapcase()),
        st.just(token[::-1]),
        st.tuples(index, st.characters(codec="utf-8")).map(
            lambda p: token[: p[0]] + p[1] + token[p[0] + 1 :]
        ),
        st.just(base64.urlsafe_b64encode(token.encode()).decode()),
    )


GARBAGE_TOKENS = st.one_of(
    texts(200),
    st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    st.binary(max_size=64).map(
        lambda b: (
            base64.urlsafe_b64encode(b + b'{"b":"ffffffff-ffff-7fff-bfff-ffffffffffff","q":""}')
            .decode()
            .rstrip("=")
        )
    ),
)
PAGE_SIZES = st.one_of(
    st.sampled_from((0, 1, 2, 49, 50, 51, 999, 1000, 1001, -1, -(2**31), 2**31 - 1)), INT32
)


@dataclass
class ListCase:
    user: str
    request: pb.ListRunsRequest
    filt: Filt
    token: str  # valid | foreign | mutated | garbage | none
    issued: IssuedToken | None


@st.composite
def list_cases(draw: st.DrawFn, tokens: list[IssuedToken]) -> ListCase:
    kind = draw(st.sampled_from(("valid", "foreign", "mutated", "garbage", "none")))
    issued = draw(st.sampled_from(tokens)) if kind in ("valid", "foreign", "mutated") else None
    if issued is not None and kind != "foreign":
        user, filt, everyone = issued.user, issued.filt, issued.everyone
    else:
        user, filt, everyone = draw(CALLERS), draw(filters()), draw(st.booleans())
    page_token = ""
    if issued is not None:
        page_token = issued.token if kind != "mutated" else draw(_mutations(issued.token))
    elif kind == "garbage":
        page_token = draw(GARBAGE_TOKENS)
    request = filt.fill(
        pb.ListRunsRequest(page_size=draw(PAGE_SIZES), page_token=page_token, all_users=everyone)
    )
    if draw(OVERSIZE):
        request.page_token = HUGE
        kind = "garbage"
    if not request.page_token:
        kind = "none"
    elif issued is not None and request.page_token == issued.token and kind == "mutated":
        kind = "valid"
    return ListCase(user, request, filt, kind, issued)


def _same_query(case: ListCase) -> bool:
    issued = case.issued
    everyone = case.request.all_users and case.user == ADMIN
    return (
        issued is not None
        and issued.user == case.user
        and issued.everyone == everyone
        and issued.filt.key() == case.filt.key()
    )


def test_list_runs_survives_hostile_filters_sizes_and_page_tokens(live: Live) -> None:
    """ListRuns: only the caller's runs, within the page size; foreign tokens are refused."""

    @_settings(400)
    @given(case=list_cases(live.page_tokens))
    def example(case: ListCase) -> None:
        request, user = case.request, case.user
        outcome = _call(live, "ListRuns", request, user)
        admin_all = request.all_users and user == ADMIN
        verdict = _filter_verdict(case.filt)
        if outcome.error is not None:
            info = check_refusal(outcome, request)
            if verdict == "valid" and request.page_size >= 0 and case.token in ("valid", "none"):
                if request.all_users and user != ADMIN:
                    assert outcome.code == Code.PERMISSION_DENIED, outcome.details
                else:
                    raise AssertionError(f"a well-formed ListRuns was refused: {outcome.details}")
            if case.token == "foreign" and not _same_query(case) and info is not None:
                assert outcome.code in {Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED}
            return
        assert request.page_size >= 0, "a negative page_size was accepted"
        assert verdict != "invalid", f"a malformed filter was accepted: {case.filt}"
        assert not (request.all_users and user != ADMIN), "all_users granted to a non-admin"
        if case.token in ("foreign", "garbage"):
            assert case.token == "foreign" and _same_query(case), (
                f"a {case.token} page token was accepted: {request.page_token[:200]!r}"
            )
        runs = outcome.response.runs
        assert len(runs) <= min(request.page_size or 50, 1000)
        ids = [r.run_id for r in runs]
        assert ids == sorted(ids, reverse=True), "not newest first"
        for run in runs:
            check_run(run, user, any_owner=admin_all)
            assert case.filt.matches(run), f"{run.run_id} does not match {case.filt}"
        if case.token == "mutated":
            # Only an encoding variant of the real token may pass, and then it means the same.
            assert case.issued is not None
            again = pb.ListRunsRequest()
            again.CopyFrom(request)
            again.page_token = case.issued.token
            original = live.stub.ListRuns(again, metadata=live.md(user), timeout=DEADLINE)
            assert [r.run_id for r in original.runs] == ids, "a tampered token changed the page"

    example()
    assert_healthy(live)


# -- Subscribe ----------------------------------------------------------------------------


def _from_seqs(last: int) -> st.SearchStrategy[int]:
    return pick(
        (3, st.integers(0, last + 1)),
        (1, st.sampled_from((last + 2, -1, 2**63 - 1, -(2**63)))),
        (1, INT64),
    )


def test_subscribe_answers_hostile_ids_and_cursors(live: Live) -> None:
    """Subscribe: own runs from any valid cursor; past the end OUT_OF_RANGE; others NOT_FOUND."""
    seeds = [r for user in USERS for r in (*live.finished[user], live.active[user])]

    @_settings(400)
    @given(data=st.data(), user=st.sampled_from(("alice", "bob")))
    def example(data: st.DataObject, user: str) -> None:
        own = [*live.finished[user], live.active[user]]
        run_id = data.draw(pick((3, st.sampled_from(own)), (2, run_ids(seeds))))
        canon = _canonical(run_id)
        last = live.last_seq.get(canon or "", 3)
        from_seq = data.draw(_from_seqs(last))
        if data.draw(OVERSIZE):
            run_id = HUGE
        request = pb.SubscribeRequest(run_id=run_id, from_seq=from_seq)
        mine = canon is not None and live.owners.get(canon) == user and run_id == canon
        # At the live tail of an active run the stream waits for events (an alias of the
        # id may resolve to it too).
        at_tail = canon == live.active[user] and from_seq >= last + 1
        outcome = _call(
            live, "Subscribe", request, user, timeout=TAIL_DEADLINE if at_tail else None
        )
        if outcome.error is not None and _capped(
            check_refusal(outcome, request, deadline_set=at_tail)
        ):
            return
        if from_seq < 0:
            assert outcome.code in {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}
            return
        _expect_lookup(live, user, run_id, outcome)
        if not mine:
            return
        if from_seq > last + 1:
            assert outcome.code == Code.OUT_OF_RANGE, outcome.details
            info = error_info(outcome.error)
            assert info is not None and info.metadata["last_seq"] == str(last)
            return
        if at_tail:
            assert outcome.code == Code.DEADLINE_EXCEEDED, outcome.code
            return
        assert outcome.code == Code.OK, f"own run {canon} from {from_seq}: {outcome.details}"
        events = [e for m in outcome.messages for e in m.events]
        if from_seq <= last:
            assert events, "no events although the log has them"
        seqs = [e.seq for e in events]
        assert seqs == list(range(max(from_seq, 1), max(from_seq, 1) + len(seqs)))
        assert all(e.run_id == canon for e in events)
        for e in events:
            if e.HasField("error"):
                _assert_no_leak(e.error.message, [], "event error")

    example()
    assert_healthy(live)


# -- WatchRuns ----------------------------------------------------------------------------


def test_watch_runs_answers_hostile_filters_with_the_callers_runs_only(live: Live) -> None:
    """WatchRuns: the snapshot holds the caller's matching runs only; bad filters refused."""

    @_settings(300)
    @given(user=CALLERS, filt=filters(), everyone=st.booleans(), oversize=OVERSIZE)
    def example(user: str, filt: Filt, everyone: bool, oversize: bool) -> None:
        request = filt.fill(pb.WatchRunsRequest(all_users=everyone))
        if oversize:
            request.thread_id = HUGE
        outcome = _call(live, "WatchRuns", request, user, first=2, last=_snapshot_end)
        verdict = _filter_verdict(filt)
        if outcome.error is not None:
            info = check_refusal(outcome, request)
            if verdict == "valid" and not oversize and not _capped(info):
                expected = Code.PERMISSION_DENIED if everyone and user != ADMIN else None
                assert outcome.code == expected, f"{outcome.code}: {outcome.details}"
            return
        assert verdict != "invalid", f"a malformed filter was accepted: {filt}"
        assert not (everyone and user != ADMIN), "all_users granted to a non-admin"
        assert outcome.messages, "the stream ended before its snapshot"
        for message in outcome.messages:
            if message.change == pb.RUN_CHANGE_SNAPSHOT_END:
                assert not message.HasField("run")
                break
            assert message.change == pb.RUN_CHANGE_EXISTING, message.change
            check_run(message.run, user, any_owner=everyone and user == ADMIN)
            assert filt.matches(message.run, default_states=ACTIVE), message.run.run_id

    example()
    assert_healthy(live)


def _snapshot_end(message: pb.WatchRunsResponse) -> bool:
    return message.change == pb.RUN_CHANGE_SNAPSHOT_END


def _capped(info: error_details_pb2.ErrorInfo | None) -> bool:
    """A refusal for a cap (streams, active runs) that a well-formed request may meet."""
    return info is not None and info.reason in {"TOO_MANY_STREAMS", "TOO_MANY_ACTIVE_RUNS"}


# -- StopRun ------------------------------------------------------------------------------


REASONS = st.one_of(texts(), st.sampled_from((_repeat("r", 1024), _repeat("r", 1025))))


def test_stop_run_answers_hostile_ids_and_reasons(live: Live) -> None:
    """StopRun: own runs stop (or stay as they are when finished); others are untouched."""
    before = {r: _wait_state(live, r) for r in live.active.values()}
    pools = {u: [*live.finished[u], *live.others(u)[:60]] for u in USERS}

    @_settings(300)
    @given(data=st.data(), user=st.sampled_from(("alice", "bob")), reason=REASONS)
    def example(data: st.DataObject, user: str, reason: str) -> None:
        fresh = data.draw(st.sampled_from([False] * 7 + [True]))
        mine = st.sampled_from(live.finished[user])
        run_id = (
            _start_active(live, user)
            if fresh
            else data.draw(pick((1, mine), (2, run_ids(pools[user]))))
        )
        if data.draw(OVERSIZE):
            reason = HUGE
        request = pb.StopRunRequest(run_id=run_id, reason=reason)
        outcome = _call(live, "StopRun", request, user)
        if outcome.error is not None:
            check_refusal(outcome, request)
        bad_reason = _has_control(reason) or len(reason) > 1024
        if bad_reason:
            assert outcome.code != Code.OK, f"reason {reason[:80]!r} was accepted"
        else:
            _expect_lookup(live, user, run_id, outcome)
        if fresh:
            state = _wait_state(live, run_id)
            if outcome.error is None:
                assert not bad_reason, f"reason {reason[:80]!r} was accepted"
                stopped = outcome.response.run
                check_run(stopped, user)
                assert stopped.state == state == run_pb2.RUN_STATE_STOPPED
                assert stopped.stop_reason == (reason or stopped.stop_reason)
            else:
                assert outcome.code in {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}
                assert state == run_pb2.RUN_STATE_RUNNING, "a refused StopRun stopped it"
                live.stub.StopRun(pb.StopRunRequest(run_id=run_id), metadata=live.md(user))
            return
        canon = _canonical(run_id)
        if outcome.error is None:
            stopped = outcome.response.run
            check_run(stopped, user)
            assert stopped.run_id == canon
            assert stopped.state in TERMINAL

    example()
    for run_id, state in before.items():
        assert _wait_state(live, run_id) == state, f"the active seed {run_id} was disturbed"
    assert_healthy(live)


def _wait_state(live: Live, run_id: str) -> Any:
    return live.stub.GetRun(pb.GetRunRequest(run_id=run_id), metadata=live.md(ADMIN)).run.state


# -- ListAgents and credentials -----------------------------------------------------------


def _unknown_fields(fields: list[tuple[int, int, bytes]]) -> bytes:
    """Well-formed protobuf bytes made only of the given (number, wire type, payload)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    out = b""
    for number, wire, payload in fields:
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(int.from_bytes(payload[:9], "little") & (2**64 - 1))
        elif wire == 1:
            out += payload[:8].ljust(8, b"\0")
        elif wire == 2:
            out += varint(len(payload)) + payload
        else:
            out += payload[:4].ljust(4, b"\0")
    return out


UNKNOWN_FIELDS = st.lists(
    st.tuples(
        st.integers(1, 2**29 - 1).filter(lambda n: not 19000 <= n <= 19999),
        st.sampled_from((0, 1, 2, 5)),
        st.binary(max_size=64),
    ),
    max_size=6,
)


def test_list_agents_ignores_unknown_fields_and_odd_deadlines(live: Live) -> None:
    """ListAgents: any well-formed request (unknown fields included) lists the agents."""
    raw = live.channel.unary_unary(f"/{SERVICE}/ListAgents")

    @_settings(300)
    @given(user=CALLERS, fields=UNKNOWN_FIELDS, deadline=DEADLINES)
    def example(user: str, fields: list[tuple[int, int, bytes]], deadline: float | None) -> None:
        live.tick("ListAgents")
        try:
            answer = raw(
                _unknown_fields(fields),
                metadata=live.md(user),
                timeout=DEADLINE if deadline is None else deadline,
            )
        except grpc.RpcError as exc:
            outcome = Outcome("ListAgents", error=exc)
            check_refusal(outcome, pb.ListAgentsRequest(), deadline_set=deadline is not None)
            assert outcome.code == Code.DEADLINE_EXCEEDED, outcome.details
            return
        agents = pb.ListAgentsResponse.FromString(answer).agents
        assert [a.name for a in agents] == sorted(live.agents)

    example()
    assert_healthy(live)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


_ALG_NONE = (
    _b64(b'{"alg":"none","typ":"JWT"}')
    + "."
    + _b64(b'{"sub":"root","roles":["admin"],"exp":9999999999}')
    + "."
)
ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)


def _auth_values(tokens: dict[str, str]) -> st.SearchStrategy[str]:
    def forms(tok: str) -> list[str]:
        return [
            f"Bearer {tok}",
            f"Bearer {tok}",
            f"bearer {tok}",
            f"BEARER {tok}",
            f"Bearer  {tok}",
            f"Bearer {tok} ",
            f"Bearer {tok}x",
            f"Bearer x{tok}",
            f"Bearer {tok[:-1]}",
            f"Bearer {tok.swapcase()}",
            tok,
            f"Basic {tok}",
            f"Bearer {tok},{tok}",
            f"Bearer {tok} {tok}",
        ]

    return st.one_of(
        st.sampled_from(list(tokens.values())).flatmap(lambda t: st.sampled_from(forms(t))),
        st.sampled_from(("", " ", "Bearer", "Bearer ", "Bearer  ", "Basic", _ALG_NONE)),
        st.just("Bearer ").flatmap(lambda p: ASCII.map(lambda t: p + t)),
        ASCII,
        st.tuples(st.binary(max_size=40), st.binary(max_size=80), st.binary(max_size=40)).map(
            lambda p: "Bearer " + ".".join(_b64(x) for x in p)
        ),
        st.just(f"Bearer {_ALG_NONE}"),
    )


@st.composite
def metadata(draw: st.DrawFn, tokens: dict[str, str]) -> list[tuple[str, Any]]:
    entries: list[tuple[str, Any]] = [
        ("authorization", draw(_auth_values(tokens))) for _ in range(draw(st.integers(0, 3)))
    ]
    entries += draw(
        st.lists(
            st.one_of(
                st.tuples(
                    st.sampled_from(
                        ("x-user", "x-forwarded-user", "x-remote-user", "x-roles", "user")
                    ),
                    st.sampled_from(("root", "admin", "bob", "alice")),
                ),
                st.tuples(st.from_regex(r"x-[a-z0-9_.]{1,20}", fullmatch=True), ASCII),
                st.tuples(st.just("authorization-bin"), st.binary(max_size=64)),
            ),
            max_size=3,
        )
    )
    if draw(OVERSIZE):  # above the server's metadata limit, hard limit included
        entries.append(("x-pad", "p" * (METADATA_LIMIT + 8 * 1024)))
    return draw(st.permutations(entries))


def _probe_requests(live: Live) -> dict[str, Message]:
    missing = "0190f6e4-8c4e-7a1b-9c2d-3e4f5a6b7c8d"
    return {
        "StartRun": pb.StartRunRequest(agent="recorder"),
        "GetRun": pb.GetRunRequest(run_id=missing),
        "ListRuns": pb.ListRunsRequest(all_users=True, page_size=1),
        "StopRun": pb.StopRunRequest(run_id=missing),
        "Subscribe": pb.SubscribeRequest(run_id=missing),
        "DeleteRun": pb.DeleteRunRequest(run_id=missing),
        "WatchRuns": pb.WatchRunsRequest(),
        "ListAgents": pb.ListAgentsRequest(),
        "GetServerStats": pb.GetServerStatsRequest(),
        "CreateReadToken": pb.CreateReadTokenRequest(run_id=missing),
        "ListWebhookDeliveries": pb.ListWebhookDeliveriesRequest(run_id=missing),
        "AppendEvents": pb.AppendEventsRequest(run_id=missing, close=True),
        "CloseRun": pb.CloseRunRequest(run_id=missing),
    }


def test_credentials_decide_the_caller_whatever_else_the_metadata_says(live: Live) -> None:
    """Garbage or missing credentials are UNAUTHENTICATED on every RPC; a token acts only
    as its own user, whatever other headers claim; the decision is the same on every RPC."""
    tokens = live.harness.tokens
    probes = _probe_requests(live)
    before = audit(live)
    accepted: dict[str, set[str]] = defaultdict(set)

    @_settings(300)
    @given(md=metadata(tokens), rpc=st.sampled_from(sorted(probes)))
    def example(md: list[tuple[str, Any]], rpc: str) -> None:
        auth = [v for k, v in md if k == "authorization"]
        present = {u for u, tok in tokens.items() if any(tok in v for v in auth)}
        exact = [u for u, tok in tokens.items() if auth == [f"Bearer {tok}"]]
        size = sum(len(k) + len(v) for k, v in md)
        who = _call(live, "ListRuns", pb.ListRunsRequest(page_size=5), None, metadata=tuple(md))
        if size > METADATA_LIMIT:
            assert who.code == Code.RESOURCE_EXHAUSTED, f"{size} bytes of metadata: {who.code}"
            check_refusal(who, pb.ListRunsRequest(), metadata_size=size)
            return
        if who.error is not None:
            info = check_refusal(who, pb.ListRunsRequest())
            assert who.code == Code.UNAUTHENTICATED, who.details
            assert info is not None and info.reason in AUTH_REASONS, info
            assert not exact, f"the exact credentials of {exact} were refused"
            caller = None
        else:
            owners = {r.owner for r in who.response.runs}
            assert len(owners) == 1, owners
            caller = owners.pop()
            assert caller in present, f"authenticated as {caller} with {auth!r}"
            assert not exact or exact == [caller]
        request = probes[rpc]
        outcome = _call(live, rpc, request, None, metadata=tuple(md))
        if outcome.error is not None:
            check_refusal(outcome, request)
        if caller is None:
            assert outcome.code == Code.UNAUTHENTICATED, f"{rpc}: {outcome.code}"
            return
        assert outcome.code != Code.UNAUTHENTICATED, f"{rpc}: {outcome.details}"
        if rpc == "ListRuns" and caller != ADMIN:
            assert outcome.code == Code.PERMISSION_DENIED, "all_users granted to a non-admin"
        if rpc == "GetServerStats":
            denied = outcome.code == Code.PERMISSION_DENIED
            assert denied == (caller != ADMIN), f"GetServerStats as {caller}: {outcome.code}"
        if rpc == "StartRun" and outcome.error is None:
            assert outcome.response.run.owner == caller
            live.owners[outcome.response.run.run_id] = caller
            accepted[caller].add(outcome.response.run.run_id)

    example()
    after = audit(live)
    for user in USERS:
        assert after[user] - before[user] == accepted[user], user
    assert_healthy(live)


# -- raw request bytes --------------------------------------------------------------------


def _raw_first(live: Live, method: str, body: bytes, user: str | None) -> Outcome:
    """Sends `body` as is; a stream is read for one message and then cancelled."""
    path = f"/{SERVICE}/{method}"
    outcome = Outcome(method)
    live.tick(method)
    try:
        if method in STREAMING:
            call = live.channel.unary_stream(path)(body, metadata=live.md(user), timeout=10)
            try:
                outcome.messages = list(itertools.islice(call, 1))
            finally:
                call.cancel()
        else:
            outcome.response = live.channel.unary_unary(path)(
                body, metadata=live.md(user), timeout=DEADLINE
            )
    except grpc.RpcError as exc:
        outcome.error = exc
    return outcome


def _bases(live: Live) -> dict[str, bytes]:
    """One well-formed request per method, to mutate. None of them deletes or stops a run."""
    own = live.finished["alice"][0]
    start = pb.StartRunRequest(agent="recorder", thread_id="raw", labels={"team": "raw"})
    start.input.update({"text": "raw bytes", "n": 1.5})
    messages: dict[str, Message] = {
        "StartRun": start,
        "GetRun": pb.GetRunRequest(run_id=own),
        "ListRuns": SEED_FILTERS[1].fill(pb.ListRunsRequest(page_size=3)),
        "StopRun": pb.StopRunRequest(run_id=own, reason="raw"),
        "Subscribe": pb.SubscribeRequest(run_id=own, from_seq=1),
        "DeleteRun": pb.DeleteRunRequest(run_id=str(uuid.uuid4())),
        "WatchRuns": SEED_FILTERS[1].fill(pb.WatchRunsRequest()),
        "ListAgents": pb.ListAgentsRequest(),
        "GetServerStats": pb.GetServerStatsRequest(),
        "CreateReadToken": pb.CreateReadTokenRequest(run_id=own, ttl={"seconds": 60}),
        "ListWebhookDeliveries": pb.ListWebhookDeliveriesRequest(run_id=own),
        # An agent's run: refused (NOT_EXTERNAL) whatever the mutation leaves of the rest.
        "AppendEvents": pb.AppendEventsRequest(
            run_id=own, events=[pb.EventInput(type="t", text="raw")], producer_id="p"
        ),
        "CloseRun": pb.CloseRunRequest(run_id=own),
        # A finished run: refused (RUN_ENDED) whatever the mutation leaves of the rest.
        "SendInput": pb.SendInputRequest(run_id=own, input={"raw": 1}, request_id="raw"),
    }
    return {m: messages[m].SerializeToString() for m in METHODS}


@st.composite
def raw_bodies(draw: st.DrawFn, bases: dict[str, bytes]) -> tuple[str, bytes]:
    method = draw(st.sampled_from(METHODS))
    base = bases[method]
    kind = draw(st.sampled_from(("random", "flip", "truncate", "splice", "deep")))
    if kind == "random" or not base:
        return method, draw(st.binary(max_size=300))
    if kind == "deep":
        return "StartRun", _deep_input_request(draw(st.integers(20, 150)))
    i = draw(st.integers(0, len(base) - 1))
    if kind == "flip":
        return method, base[:i] + bytes([base[i] ^ 1 << draw(st.integers(0, 7))]) + base[i + 1 :]
    if kind == "truncate":
        return method, base[:i]
    return method, base[:i] + draw(st.binary(min_size=1, max_size=40)) + base[i:]


def test_raw_request_bytes_never_confuse_the_server(live: Live) -> None:
    """Random, corrupted and over-deep request bytes: a request the protobuf decoder refuses
    is INVALID_ARGUMENT (UNAUTHENTICATED first without credentials); one it accepts gets a
    documented answer like any other request."""
    bases = _bases(live)
    before = audit(live)
    accepted: dict[str, set[str]] = defaultdict(set)

    @_settings(300)
    @given(case=raw_bodies(bases), user=st.sampled_from((*USERS, None)))
    def example(case: tuple[str, bytes], user: str | None) -> None:
        method, body = case
        try:
            request: Message | None = getattr(pb, f"{method}Request").FromString(body)
        except Exception:  # DecodeError, RecursionError: undecodable either way
            request = None
        outcome = _raw_first(live, method, body, user)
        if outcome.error is not None:
            info = check_refusal(outcome, request or pb.ListAgentsRequest())
            if user is None:
                assert outcome.code == Code.UNAUTHENTICATED, outcome.details
            elif request is None:
                assert outcome.code == Code.INVALID_ARGUMENT, outcome.details
                assert info is not None and info.reason == "INVALID_ARGUMENT", info
            return
        assert user is not None and request is not None, f"{method} accepted {body[:40]!r}"
        if method == "StartRun":
            run = pb.StartRunResponse.FromString(outcome.response).run
            check_run(run, user)
            live.owners[run.run_id] = user
            accepted[user].add(run.run_id)
        elif method in ("GetRun", "StopRun"):  # an admin may reach any run by id
            run = getattr(pb, f"{method}Response").FromString(outcome.response).run
            check_run(run, user, any_owner=user == ADMIN)
        elif method == "ListRuns":
            for run in pb.ListRunsResponse.FromString(outcome.response).runs:
                check_run(run, user, any_owner=user == ADMIN and request.all_users)

    example()
    after = audit(live)
    for user in USERS:
        assert after[user] - before[user] == accepted[user], user
    assert_healthy(live)


# -- isolation ----------------------------------------------------------------------------


def test_another_users_runs_are_indistinguishable_from_missing_ones(live: Live) -> None:
    """GetRun, Subscribe, StopRun and DeleteRun on another user's run, in any spelling and
    with any other field, answer like a random id, and change nothing."""
    seeds = [r for user in USERS for r in (*live.finished[user], live.active[user])]
    snapshot = {r: _wait_state(live, r) for r in seeds}
    targets = {u: live.others(u) for u in USERS}

    @_settings(300)
    @given(data=st.data(), user=st.sampled_from(("alice", "bob")))
    def example(data: st.DataObject, user: str) -> None:
        target = data.draw(st.sampled_from(targets[user]))
        run_id = data.draw(st.one_of(st.just(target), st.sampled_from(_aliases(target))))
        rpc = data.draw(st.sampled_from(("GetRun", "Subscribe", "StopRun", "DeleteRun")))
        request = _by_id(rpc, run_id)
        if rpc == "Subscribe":
            request.from_seq = data.draw(_from_seqs(live.last_seq.get(target, 3)))
        if rpc == "StopRun":
            request.reason = data.draw(REASONS)
        outcome = _call(live, rpc, request, user)
        assert outcome.error is not None, f"{user} reached {target} with {rpc}({run_id!r})"
        check_refusal(outcome, request)
        if outcome.code != Code.NOT_FOUND:
            # Only a refusal of the request's own malformed fields may come first.
            assert outcome.code == Code.INVALID_ARGUMENT, outcome.details
            return
        canon = _canonical(run_id)
        assert canon is not None
        assert_not_found_like_missing(live, outcome, canon)

    example()
    for run_id, state in snapshot.items():
        assert _wait_state(live, run_id) == state, f"{run_id} changed"
    assert_store_matches(live)
    assert_healthy(live)


def assert_store_matches(live: Live) -> None:
    """The store holds exactly the runs StartRun returned, less those their owners deleted."""
    stored = audit(live)
    for user in USERS:
        assert stored[user] == set(live.runs_of(user)), user


# -- DeleteRun (last: it removes runs) ----------------------------------------------------


def test_delete_run_removes_only_the_callers_finished_runs(live: Live) -> None:
    """DeleteRun: own finished runs go (once); active ones are RUN_ACTIVE; others stay."""
    victims: dict[str, list[str]] = {}
    for user in ("alice", "bob"):
        victims[user] = [_start(live, user, "echo", {"text": f"victim {i}"}) for i in range(12)]
        for run_id in victims[user]:
            _wait_terminal(live, run_id, user)
    gone: set[str] = set()
    pools = {u: [*victims[u], live.active[u], *live.others(u)[:60]] for u in victims}

    @_settings(300)
    @given(data=st.data(), user=st.sampled_from(("alice", "bob")))
    def example(data: st.DataObject, user: str) -> None:
        run_id = data.draw(pick((1, st.sampled_from(victims[user])), (1, run_ids(pools[user]))))
        if data.draw(OVERSIZE):
            run_id = HUGE
        request = pb.DeleteRunRequest(run_id=run_id)
        outcome = _call(live, "DeleteRun", request, user)
        if outcome.error is not None:
            check_refusal(outcome, request)
        canon = _expect_lookup(live, user, run_id, outcome)
        if canon is None or live.owners.get(canon) != user or run_id != canon:
            if outcome.error is None:
                assert canon is not None and live.owners.get(canon) == user
                gone.add(canon)
                live.deleted.add(canon)
            return
        if canon == live.active[user]:
            assert outcome.code == Code.FAILED_PRECONDITION, outcome.details
            info = error_info(outcome.error)
            assert info is not None and info.reason == "RUN_ACTIVE"
        elif canon in gone:
            assert_not_found_like_missing(live, outcome, canon)
        else:
            assert outcome.code == Code.OK, outcome.details
            gone.add(canon)
            live.deleted.add(canon)

    example()
    assert_store_matches(live)
    assert gone, "no run was deleted: the strategy never drew an own finished run"
    assert_healthy(live)


def test_no_run_exists_that_no_accepted_start_returned(live: Live) -> None:
    """Across the whole module: the store holds exactly the runs that StartRun returned."""
    assert_store_matches(live)
    assert_healthy(live)


# -- inputs that once broke the server ---------------------------------------------------


def _refusal(live: Live, rpc: str, request: Message, user: str | None = "alice") -> Outcome:
    outcome = _call(live, rpc, request, user)
    assert outcome.error is not None, f"{rpc} accepted {request}"
    return outcome


def test_non_finite_numbers_in_input_are_refused(live: Live) -> None:
    """A NaN or ±Infinity number anywhere in the input is INVALID_ARGUMENT (INVALID_INPUT)."""
    for value in (math.nan, math.inf, -math.inf):
        for where in ({"x": value}, {"a": [1, {"b": value}]}):
            request = pb.StartRunRequest(agent="echo")
            request.input.update(where)
            outcome = _refusal(live, "StartRun", request)
            assert outcome.code == Code.INVALID_ARGUMENT, f"{where}: {outcome.details}"
            info = check_refusal(outcome, request)
            assert info is not None and info.reason == "INVALID_INPUT", info


def test_out_of_range_durations_are_refused(live: Live) -> None:
    """A timeout outside google.protobuf.Duration's range is INVALID_ARGUMENT."""
    for seconds in (2**63 - 1, -(2**63), 10**15, -(10**15)):
        request = pb.StartRunRequest(agent="echo", timeout=duration_pb2.Duration(seconds=seconds))
        outcome = _refusal(live, "StartRun", request)
        assert outcome.code == Code.INVALID_ARGUMENT, f"{seconds}: {outcome.details}"
        check_refusal(outcome, request)


def _deep_input_request(depth: int) -> bytes:
    request = pb.StartRunRequest(agent="echo")
    node = request.input
    for _ in range(depth):  # built in place: copying a message this deep fails client-side
        node = node.fields["k"].struct_value
    node.fields["leaf"].string_value = "x"
    return request.SerializeToString()


def _raw(live: Live, method: str, body: bytes, user: str | None) -> Any:
    """Sends `body` as the request of `method`, bytes as they are."""
    path = f"/{SERVICE}/{method}"
    if method in STREAMING:
        return list(live.channel.unary_stream(path)(body, metadata=live.md(user), timeout=10))
    return live.channel.unary_unary(path)(body, metadata=live.md(user), timeout=10)


CORRUPT = (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\x80\x80\x80\x80\x10")


@pytest.mark.parametrize("credentials", ["alice", None], ids=["authenticated", "anonymous"])
def test_undecodable_requests_are_refused_cleanly(live: Live, credentials: str | None) -> None:
    """Corrupt bytes, and a Struct nested past the decoder's depth limit, are refused with
    INVALID_ARGUMENT (UNAUTHENTICATED without credentials), never UNKNOWN."""
    cases = [(m, body) for m in METHODS for body in CORRUPT]
    cases += [("StartRun", _deep_input_request(depth)) for depth in (33, 40, 100)]
    for method, body in cases:
        with pytest.raises(grpc.RpcError) as caught:
            _raw(live, method, body, credentials)
        outcome = Outcome(method, error=caught.value)
        expected = Code.UNAUTHENTICATED if credentials is None else Code.INVALID_ARGUMENT
        assert outcome.code == expected, f"{method} {body[:16]!r}: {outcome.code} {outcome.details}"
        check_refusal(outcome, pb.StartRunRequest())


async def test_list_runs_pages_fit_the_send_limit(make_server: Any) -> None:
    """A page of runs with large inputs is cut short to fit the send limit, not refused."""
    server = await make_server(max_send_message_size=1024 * 1024)
    alice = server.caller("alice")
    for _ in range(6):
        request = pb.StartRunRequest(agent="recorder")
        request.input["blob"] = "y" * (INPUT_LIMIT - 64)
        await alice.StartRun(request)
    seen: list[str] = []
    token = ""
    while True:
        answer = await alice.ListRuns(pb.ListRunsRequest(page_size=1000, page_token=token))
        assert answer.runs, "an empty page with a next_page_token"
        seen += [r.run_id for r in answer.runs]
        token = answer.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 6


async def test_list_runs_pages_fit_a_stock_clients_receive_limit(make_server: Any) -> None:
    """A default ListRuns page stays within a default channel's 4 MiB receive limit."""
    server = await make_server()
    alice = server.caller("alice")  # the harness channel keeps gRPC's default limits

    async def start(size: int) -> str:
        request = pb.StartRunRequest(agent="recorder")
        request.input["blob"] = "y" * size
        run_id = (await alice.StartRun(request)).run.run_id
        await read_all(alice, run_id)  # finished: its listed size no longer changes
        return run_id

    await start(200_000)
    listed = (await alice.ListRuns(pb.ListRunsRequest(page_size=1))).runs[0].ByteSize()
    per_run = RECEIVE_LIMIT // 16 - 4  # 16 runs fit the budget; framing tips them over
    for _ in range(17):
        await start(200_000 - (listed - per_run))
    page = await alice.ListRuns(pb.ListRunsRequest())
    assert page.runs and page.next_page_token
