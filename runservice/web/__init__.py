"""The HTTP edge (`--http-listen`): the run API over HTTP/JSON and every run's events as a
durable stream (docs/http.md). A layer beside `api`: it calls the same servicer, manager
and authentication, and never the store."""

from runservice.web.events import StreamSettings
from runservice.web.server import WebEdge, WebSettings, parse_address

__all__ = ["StreamSettings", "WebEdge", "WebSettings", "parse_address"]
