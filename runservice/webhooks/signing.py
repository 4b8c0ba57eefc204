"""Standard Webhooks signatures (https://www.standardwebhooks.com): the secret's format and
the three headers every attempt carries.

The signed content is `<webhook-id>.<webhook-timestamp>.<body>`; the signature is its
HMAC-SHA256 under the secret, base64, prefixed `v1,`. A secret is written `whsec_` and the
base64 of its bytes. A secrets file may hold several, one a line (a rotation): each
attempt is then signed with each, the signatures separated by spaces, and a receiver that
knows any one of them accepts it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from pathlib import Path

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24  # the Standard Webhooks specification's least
MAX_SECRET_BYTES = 64
MAKE_ONE = (
    "make one with: python3 -c \"import base64, secrets; print('whsec_' + "
    'base64.b64encode(secrets.token_bytes(32)).decode())"'
)


class WebhookSecretError(ValueError):
    """The webhook secrets file cannot be used; the message names it and says why."""


def read_secrets(path: Path) -> tuple[bytes, ...]:
    """The secrets in `path`, one `whsec_...` a line (blank lines and `#` comments
    skipped), the one to sign with first; WebhookSecretError if there is none or one is
    malformed."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise WebhookSecretError(f"cannot read the webhook secret file {path}: {why}") from None
    lines = [line.strip() for line in text.splitlines()]
    secrets = [line for line in lines if line and not line.startswith("#")]
    if not secrets:
        raise WebhookSecretError(f"the webhook secret file {path} holds no secret; {MAKE_ONE}")
    return tuple(_parse(secret, path, n) for n, secret in enumerate(secrets, 1))


def _parse(secret: str, path: Path, n: int) -> bytes:
    where = f"the webhook secret file {path} (secret {n})"
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookSecretError(f"{where} does not start with {SECRET_PREFIX}; {MAKE_ONE}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise WebhookSecretError(f"{where} is not base64 after {SECRET_PREFIX}") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise WebhookSecretError(
            f"{where} is {len(key)} bytes; a secret is {MIN_SECRET_BYTES} to "
            f"{MAX_SECRET_BYTES} random bytes; {MAKE_ONE}"
        )
    return key


def signature(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `v1,<base64>` signature of one attempt under one secret."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(
    secrets: tuple[bytes, ...], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The `webhook-id`, `webhook-timestamp` (seconds since the epoch) and
    `webhook-signature` headers of one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in secrets),
    }
