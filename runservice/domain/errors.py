"""Domain errors. Each carries a stable `reason` from the proto's ErrorReason vocabulary.

Code below `api/` raises these; `api/status.py` is the one table that turns them into gRPC
statuses. Messages are written for the person reading them: they say what was wrong and,
where there is one, what to do instead.
"""

from __future__ import annotations


class RunServiceError(Exception):
    """Base of every error a client may see; `metadata` becomes ErrorInfo metadata."""

    reason: str = "INTERNAL_ERROR"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class RunNotFoundError(RunServiceError):
    """The run does not exist or belongs to someone else (indistinguishable on purpose)."""

    reason = "RUN_NOT_FOUND"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} not found", run_id=run_id)


class UnknownAgentError(RunServiceError):
    """No agent of that name is registered."""

    reason = "UNKNOWN_AGENT"

    def __init__(self, agent: str, known: list[str]) -> None:
        listing = ", ".join(known) or "none"
        super().__init__(
            f"unknown agent {agent!r}; this server runs: {listing} (see ListAgents)", agent=agent
        )


class InvalidArgumentError(RunServiceError):
    """A request field is malformed; `field` names it."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)


class InvalidInputError(InvalidArgumentError):
    """The run's input was refused (too large, or not what the agent takes)."""

    reason = "INVALID_INPUT"


class WebhookUrlNotAllowedError(InvalidArgumentError):
    """A run's own webhook URL is outside every prefix the server allows (--webhook-allow)."""

    reason = "WEBHOOK_URL_NOT_ALLOWED"

    def __init__(self, url: str, allowed: tuple[str, ...]) -> None:
        if allowed:
            hint = "this server allows URLs under " + ", ".join(allowed)
        else:
            hint = "this server allows no webhook URLs of runs (it has no --webhook-allow)"
        super().__init__(
            "webhook_url", f"{url[:200]!r} is not allowed; {hint}; or leave webhook_url empty"
        )


class InvalidPageTokenError(RunServiceError):
    """The page token is malformed, tampered with, or from a different query."""

    reason = "INVALID_PAGE_TOKEN"

    def __init__(self) -> None:
        super().__init__(
            "page_token is not valid for this query; pass the next_page_token of a previous "
            "ListRuns call with the same filters, or omit it to start from the first page",
            field="page_token",
        )


class SeqOutOfRangeError(RunServiceError):
    """A cursor points past the end of a run's log."""

    reason = "SEQ_OUT_OF_RANGE"

    def __init__(self, run_id: str, from_seq: int, last_seq: int) -> None:
        super().__init__(
            f"from_seq {from_seq} is past the end of run {run_id!r}, whose log ends at seq "
            f"{last_seq}; resume from at most {last_seq + 1}",
            run_id=run_id,
            last_seq=str(last_seq),
        )


class ThreadBusyError(RunServiceError):
    """The thread has an active run and the strategy is REJECT."""

    reason = "THREAD_BUSY"

    def __init__(self, thread_id: str, active_run_id: str) -> None:
        super().__init__(
            f"thread {thread_id!r} already has an active run ({active_run_id}); wait for it, "
            "stop it, or start with multitask_strategy INTERRUPT or ENQUEUE",
            thread_id=thread_id,
            active_run_id=active_run_id,
        )


class RunActiveError(RunServiceError):
    """The operation needs a finished run."""

    reason = "RUN_ACTIVE"

    def __init__(self, run_id: str, action: str) -> None:
        super().__init__(
            f"run {run_id!r} is still active; stop it or wait for it to finish before {action}",
            run_id=run_id,
        )


class RequestIdReusedError(RunServiceError):
    """The idempotency key was already used for a different request."""

    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: str, run_id: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was already used for a different request (run "
            f"{run_id}); use a new request_id for a new run",
            request_id=request_id,
            run_id=run_id,
        )


class InputRequestIdReusedError(RequestIdReusedError):
    """SendInput's idempotency key was already used for a different input to the run."""

    def __init__(self, request_id: str, run_id: str) -> None:
        RunServiceError.__init__(
            self,
            f"request_id {request_id!r} was already used for a different input to run "
            f"{run_id}; use a new request_id for a new input",
            request_id=request_id,
            run_id=run_id,
        )


class RunEndedError(RunServiceError):
    """The run has ended: it takes no more input."""

    reason = "RUN_ENDED"

    def __init__(self, run_id: str, state: str) -> None:
        super().__init__(
            f"run {run_id!r} has ended ({state}) and takes no more input; start a new run "
            "(on the same thread_id to continue the conversation)",
            run_id=run_id,
        )


class ExternalRunInputError(RunServiceError):
    """External runs have no agent to take input."""

    reason = "EXTERNAL_RUN"

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"run {run_id!r} is an external run: it has no agent to take input; feed it with "
            "AppendEvents",
            run_id=run_id,
        )


class TooManyActiveRunsError(RunServiceError):
    """A per-user or global cap on active runs is reached."""

    reason = "TOO_MANY_ACTIVE_RUNS"


class TooManyStreamsError(RunServiceError):
    """The caller has too many open streams."""

    reason = "TOO_MANY_STREAMS"


class ServerDrainingError(RunServiceError):
    """The server is shutting down and takes no new work."""

    reason = "SERVER_DRAINING"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry after it restarts")


class AdminOnlyError(RunServiceError):
    """The request needs the admin role."""

    reason = "ADMIN_ONLY"

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} needs the admin role")


class ReadTokenScopeError(RunServiceError):
    """A read token was used for something other than reading its run."""

    reason = "READ_TOKEN_SCOPE"

    def __init__(self, call: str) -> None:
        super().__init__(
            f"a read token only reads its own run (GetRun, Subscribe, and over HTTP the run "
            f"and its events); {call} needs the user's own credentials",
            call=call,
        )


class AuthenticationError(RunServiceError):
    """The caller could not be authenticated."""

    reason = "CREDENTIALS_INVALID"


class CredentialsMissingError(AuthenticationError):
    """No credentials were sent."""

    reason = "CREDENTIALS_MISSING"


class TokenExpiredError(AuthenticationError):
    """The credentials have expired."""

    reason = "TOKEN_EXPIRED"


class WatchLaggedError(RunServiceError):
    """A watcher fell too far behind the changes and must reopen its watch."""

    reason = "WATCH_LAGGED"

    def __init__(self) -> None:
        super().__init__(
            "this watch fell too far behind the changes and was closed; open a new watch "
            "(it starts with a fresh snapshot)"
        )


class DatabaseUnavailableError(RunServiceError):
    """The store cannot take writes right now; the work was refused before anything was
    written. `cause` says why, in words an operator can act on."""

    reason = "STORE_UNAVAILABLE"

    def __init__(self, cause: str) -> None:
        super().__init__(
            f"the server cannot write to its database right now ({cause}); nothing was "
            "written: retry later or against another instance",
            cause=cause,
        )


class StreamStalledError(RunServiceError):
    """A stream took nothing the server sent for longer than the stall timeout."""

    reason = "STREAM_STALLED"

    def __init__(self, stalled_s: float, resume: str) -> None:
        super().__init__(
            f"this stream took nothing the server sent for {stalled_s:g}s and was closed; {resume}"
        )


class StoreError(Exception):
    """The store refused an operation for good (a constraint, a bug). Never shown verbatim."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached, is locked or has no room; the same operation may
    succeed later. `cause` says why in an operator's words ("the disk holding the
    database is full"); `contended` is True when another writer holds the database."""

    def __init__(
        self, message: str, cause: str = "the database is unavailable", *, contended: bool = False
    ) -> None:
        super().__init__(f"{message}: {cause}")
        self.cause = cause
        # Another writer holds the database: it lets go on its own, usually soon.
        self.contended = contended


class RunFencedError(StoreError):
    """This replica lost its lease on the run (a peer declared it gone and interrupted the
    run): the database refuses every write of the run from here."""


# -- external runs (streams) ----------------------------------------------------------------


class StreamError(RunServiceError):
    """A refusal of the Durable Streams protocol: `http_status` is the status the protocol
    gives it on /v1/streams, and `headers` the protocol headers that go with it."""

    http_status = 409

    def __init__(self, message: str, headers: dict[str, str] | None = None, **metadata: str):
        super().__init__(message, **metadata)
        self.headers = headers or {}


class StreamClosedError(StreamError):
    """The external run is closed (or ended otherwise): nothing more can be appended."""

    reason = "STREAM_CLOSED"

    def __init__(self, run_id: str, last_seq: int) -> None:
        super().__init__(
            f"run {run_id!r} is closed: nothing more can be appended (its log ends at seq "
            f"{last_seq}); start a new run to go on",
            run_id=run_id,
            last_seq=str(last_seq),
        )
        self.last_seq = last_seq


class ProducerEpochStaleError(StreamError):
    """A producer wrote with an epoch older than its current one (a zombie instance)."""

    reason = "PRODUCER_EPOCH_STALE"
    http_status = 403

    def __init__(self, producer_id: str, epoch: int, current: int) -> None:
        super().__init__(
            f"producer {producer_id!r} is at epoch {current}; epoch {epoch} is stale (a newer "
            "instance of this producer took over)",
            producer_id=producer_id,
            epoch=str(current),
        )
        self.current = current


class ProducerSeqGapError(StreamError):
    """A producer's seq is not the next one it may use."""

    reason = "PRODUCER_SEQ_GAP"

    def __init__(self, producer_id: str, expected: int, received: int, *, new_epoch: bool) -> None:
        what = "a new epoch starts at seq 0" if new_epoch else f"the next seq is {expected}"
        super().__init__(
            f"producer {producer_id!r} sent seq {received}, but {what}; resend the appends "
            "from there",
            producer_id=producer_id,
            expected_seq=str(expected),
            received_seq=str(received),
        )
        self.expected = expected
        self.received = received
        self.http_status = 400 if new_epoch else 409


class StreamSeqConflictError(StreamError):
    """Stream-Seq did not increase."""

    reason = "STREAM_SEQ_CONFLICT"

    def __init__(self, seq: str, last: str) -> None:
        super().__init__(
            f"Stream-Seq {seq!r} is not greater (bytewise) than the last one accepted, {last!r}"
        )


class StreamExistsError(StreamError):
    """A stream exists at the path with another configuration."""

    reason = "STREAM_EXISTS"

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"a stream exists at {path!r} with {why}; delete it or use another path")


class ContentTypeMismatchError(StreamError):
    """The content type (or the payload's kind) does not suit the stream."""

    reason = "CONTENT_TYPE_MISMATCH"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class TooManyOpenStreamsError(StreamError):
    """The cap on open external runs is reached."""

    reason = "TOO_MANY_OPEN_STREAMS"
    http_status = 429

    def __init__(self, limit: int, scope: str, flag: str) -> None:
        super().__init__(
            f"{scope} already {'has' if scope == 'you' else 'have'} {limit} open external runs, "
            f"the most {flag} allows; close or delete one first",
            limit=str(limit),
        )


class StreamDeletedError(StreamError):
    """The stream was deleted while forks of it lived: its path stays taken until they go."""

    reason = "STREAM_DELETED"
    http_status = 410

    def __init__(self, path: str) -> None:
        super().__init__(
            f"the stream at {path!r} was deleted; its forks still read what they inherited, "
            "and the path is free again once they are gone"
        )


class NotExternalError(StreamError):
    """Appends and CloseRun are for external runs."""

    reason = "NOT_EXTERNAL"

    def __init__(self, run_id: str, agent: str) -> None:
        super().__init__(
            f"run {run_id!r} is a run of agent {agent!r}, whose events come from the agent; "
            "only external runs (agent 'external') take appends",
            run_id=run_id,
        )
