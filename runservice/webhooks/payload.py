"""The body of a completion webhook: a Standard Webhooks event of type `run.completed`.

    {"type": "run.completed", "timestamp": "<the run's end_time>",
     "data": {"run": <the Run, in the proto's JSON mapping with proto field names>}}

The run is written as GetRun's answer prints it over HTTP (runservice/jsonmap.py): int64
as strings, enums by name, RFC 3339 times. The body is made once, when the run's end is
committed, and sent unchanged by every attempt.
"""

from __future__ import annotations

from collections.abc import Callable

from runservice import jsonmap
from runservice.api import convert
from runservice.domain.model import Run

EVENT_TYPE = "run.completed"


def completion_body(default_retention: float) -> Callable[[Run], bytes]:
    """The body maker of a server whose runs are kept `default_retention` seconds unless
    they ask otherwise (the run's `expire_time` depends on it)."""

    def body(run: Run) -> bytes:
        message = convert.run_to_proto(run, default_retention)
        document = {
            "type": EVENT_TYPE,
            "timestamp": message.end_time.ToJsonString(),
            "data": {"run": jsonmap.to_dict(message)},
        }
        return jsonmap.dumps(document).encode()

    return body
