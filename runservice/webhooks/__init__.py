"""Completion webhooks (`--webhook-url`, StartRunRequest.webhook_url): each run's end is
POSTed, signed per Standard Webhooks, until the receiver answers 2xx or --webhook-max-age
passes. A part beside `api` and `web`: the deliveries live in the store
(store/webhooks.py), this package signs and sends them (docs/operations.md, "Webhooks")."""

from runservice.webhooks.payload import EVENT_TYPE, completion_body
from runservice.webhooks.sender import SenderSettings, WebhookSender
from runservice.webhooks.signing import WebhookSecretError, read_secrets, signed_headers

__all__ = [
    "EVENT_TYPE",
    "SenderSettings",
    "WebhookSecretError",
    "WebhookSender",
    "completion_body",
    "read_secrets",
    "signed_headers",
]
