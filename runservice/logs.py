"""The server's log output on stderr: lines for people (text) or for machines (json).

In JSON, each record is one object on one line: `time` (RFC 3339, UTC), `level`, `logger`,
`message`, then the record's structured fields (what its call passed as `extra=`, such as
`run_id` or `error_id`), `trace_id` and `span_id` when it was logged inside a traced call
or run, and `exception` holding the whole traceback as one string. Text lines print the
message only, as they always have.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

# Everything a LogRecord carries of its own: what is left over came in through `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_CORE = ("time", "level", "logger", "message")


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line (see the module docstring)."""

    def __init__(self, static: Mapping[str, Any] | None = None) -> None:
        """`static` fields are put in every object (a worker's index, say)."""
        super().__init__()
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object without a line break (newlines inside are escaped)."""
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._static,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in _CORE and not key.startswith("_"):
                entry[key] = value
        span = trace.get_current_span().get_span_context()
        if span.is_valid:  # logged inside a traced call or run: where to find it
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def rfc3339(timestamp: float) -> str:
    """`timestamp` (seconds since the epoch) in UTC to the millisecond: 2025-01-31T12:00:00.123Z."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure(level: str, log_format: str, worker_index: int | None = None) -> None:
    """Sends every record at `level` and above to stderr in `log_format` ("text" or "json").

    A worker of `--workers` writes among its peers on its parent's stderr, so its lines say
    whose they are: `[worker N]` in text, a `worker` field in JSON.
    """
    handler = logging.StreamHandler()
    if log_format == "json":
        static = {} if worker_index is None else {"worker": worker_index}
        handler.setFormatter(JsonFormatter(static))
        logging.captureWarnings(True)  # a Python warning, too, is then one JSON line
    else:
        who = "" if worker_index is None else f"[worker {worker_index}] "
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])
