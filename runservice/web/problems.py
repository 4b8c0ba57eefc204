"""Errors over HTTP: `application/problem+json` (RFC 9457) made from api/status.py's one
description of an error, with the HTTP status Google's mapping gives its gRPC code.

A problem document:

    {"type": "about:blank", "title": "Not Found", "status": 404,
     "detail": "run '0190…' not found", "code": "NOT_FOUND",
     "reason": "RUN_NOT_FOUND", "domain": "runservice", "metadata": {"run_id": "0190…"}}

`type` is always `about:blank`: `reason` (the ErrorInfo reason a gRPC client branches on)
names the problem, and there is no page per problem to point at, so `title` is the HTTP
status phrase as RFC 9457 asks for `about:blank`. The HTTP layer's own refusals (no such
route, a method the route does not take, a body over the size limit) are like gRPC's own
statuses: a code, no reason, domain or metadata.
"""

from __future__ import annotations

import http
import json
from typing import Any

import grpc
from aiohttp import web

from runservice.api.status import DOMAIN, ErrorDescription, describe

PROBLEM_TYPE = "application/problem+json"

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
}
"""Google's mapping of gRPC codes to HTTP statuses (google.rpc.Code's comments)."""

CLIENT_CLOSED_REQUEST = 499  # nginx's, and Google's for CANCELLED; not in http.HTTPStatus


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status of a gRPC code (500 for any the mapping lacks)."""
    return HTTP_STATUS.get(code, 500)


def _title(status: int) -> str:
    if status == CLIENT_CLOSED_REQUEST:
        return "Client Closed Request"
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_document(found: ErrorDescription, status: int | None = None) -> dict[str, Any]:
    """The problem+json object of an error description (`status` overrides the mapping)."""
    status = status or http_status(found.code)
    document: dict[str, Any] = {
        "type": "about:blank",
        "title": _title(status),
        "status": status,
        "detail": found.message,
        "code": found.code.name,
    }
    if found.reason:
        document.update(reason=found.reason, domain=DOMAIN, metadata=found.metadata)
    return document


def problem_text(found: ErrorDescription, status: int | None = None) -> str:
    """The problem document as one line of JSON (an SSE `error` event carries it)."""
    return json.dumps(problem_document(found, status), separators=(",", ":"))


def problem_response(
    found: ErrorDescription, status: int | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """A problem+json response; 401s say `WWW-Authenticate: Bearer` (RFC 6750)."""
    status = status or http_status(found.code)
    headers = dict(headers or {})
    if status == http.HTTPStatus.UNAUTHORIZED:
        invalid = found.reason not in ("", "CREDENTIALS_MISSING")
        headers["WWW-Authenticate"] = (
            'Bearer realm="runservice", error="invalid_token"'
            if invalid
            else 'Bearer realm="runservice"'
        )
    headers["Content-Type"] = PROBLEM_TYPE
    return web.Response(status=status, body=problem_text(found, status).encode(), headers=headers)


def error_response(exc: BaseException) -> web.Response:
    """The problem+json response for any exception a handler raised (see
    api.status.describe: unknown ones are INTERNAL, logged with an error id)."""
    return problem_response(describe(exc))


def own_refusal(exc: web.HTTPException) -> web.Response:
    """The problem+json response for a refusal of aiohttp's own (no such route, a method
    the route does not take, a body over the size limit), keeping its status and `Allow`."""
    status = exc.status
    if status == http.HTTPStatus.NOT_FOUND:
        found = ErrorDescription(
            grpc.StatusCode.NOT_FOUND, "no such route; see docs/http.md for the routes", "", {}
        )
    elif status == http.HTTPStatus.METHOD_NOT_ALLOWED:
        allowed = exc.headers.get("Allow", "")
        found = ErrorDescription(
            grpc.StatusCode.UNIMPLEMENTED, f"this route takes only {allowed}", "", {}
        )
    elif status == http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        found = ErrorDescription(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the request body is larger than the server accepts (--max-receive-message-size)",
            "",
            {},
        )
    else:
        found = ErrorDescription(grpc.StatusCode.UNKNOWN, exc.reason, "", {})
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return problem_response(found, status, headers)
