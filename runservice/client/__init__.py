"""The Python client of runservice."""

from runservice.client.aio import AsyncRunClient, RunServiceClientError

__all__ = ["AsyncRunClient", "RunServiceClientError"]
