"""The webhook options checked together, before the server opens its store."""

from __future__ import annotations

from dataclasses import dataclass

from runservice.config import Settings
from runservice.domain.errors import InvalidArgumentError
from runservice.domain.webhooks import WebhookPolicy, check_url
from runservice.webhooks.signing import MAKE_ONE, read_secrets


class WebhookConfigError(ValueError):
    """The webhook options do not fit together; the message says what to change."""


@dataclass(frozen=True)
class WebhookSetup:
    """What the options ask for: the secrets to sign with (none: this server sends
    nothing) and the URLs runs may name."""

    secrets: tuple[bytes, ...]
    policy: WebhookPolicy

    @property
    def sends(self) -> bool:
        """True when this server stores and sends deliveries."""
        return bool(self.secrets)


def webhook_setup(settings: Settings) -> WebhookSetup:
    """The webhook options, checked; WebhookConfigError (or WebhookSecretError, a
    ValueError too) naming the option at fault."""
    for prefix in settings.webhook_allow:
        try:
            check_url(prefix, "--webhook-allow")
        except InvalidArgumentError as exc:
            raise WebhookConfigError(f"{exc.message} (got {prefix!r})") from None
    wanted = settings.webhook_url or settings.webhook_allow
    if settings.webhook_secret_file is None:
        if wanted:
            raise WebhookConfigError(
                "--webhook-url and --webhook-allow need --webhook-secret-file, the file of the "
                f"secret that signs every delivery (whsec_ and base64); {MAKE_ONE}"
            )
        return WebhookSetup((), WebhookPolicy())
    secrets = read_secrets(settings.webhook_secret_file)
    return WebhookSetup(secrets, WebhookPolicy(settings.webhook_allow))
