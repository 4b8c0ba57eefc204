"""Messages in the proto's JSON mapping, as grpcurl prints them: proto field names, int64
as strings, enums by name, RFC 3339 times, default values left out, and JSON numbers of a
Struct that are whole written as integers (`3`, not Python's `3.0`). The HTTP edge answers
in it, and the CLI prints it."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

JSON_TYPE = "application/json"
_EXACT = 2**53  # doubles hold every whole number up to here


def to_dict(message: Message) -> dict[str, Any]:
    """`message` as a JSON object."""
    document: dict[str, Any] = whole_numbers(
        json_format.MessageToDict(message, preserving_proto_field_name=True)
    )
    return document


def to_text(message: Message) -> str:
    """`message` as one line of JSON."""
    return dumps(to_dict(message))


def dumps(value: object) -> str:
    """Compact JSON, UTF-8 left as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def whole_numbers(value: Any) -> Any:
    """`value` with its whole floats as ints: JSON numbers arrive as floats
    (google.protobuf.Value), and 2.0 is shown as 2."""
    if isinstance(value, float) and value.is_integer() and -_EXACT <= value <= _EXACT:
        return int(value)
    if isinstance(value, dict):
        return {key: whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers(item) for item in value]
    return value
