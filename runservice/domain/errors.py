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
