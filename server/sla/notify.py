"""Delivering escalation messages: a webhook (httpx) and an email (aiosmtplib).

The only module that talks to the outside for the SLA engine; both channels map their
libraries' errors to `NotifyError`, which the engine counts and retries.
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any, Protocol

import aiosmtplib
import httpx

from server.sla.config import SlaSettings
from server.sla.errors import NotifyError


class Sender(Protocol):
    """Delivers one message on one channel."""

    async def send(self, channel: str, recipient: str, subject: str,
                   payload: dict[str, Any]) -> None:
        """Deliver or raise NotifyError."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class Notifier:
    """Webhooks as JSON POSTs, emails over SMTP, configured by the `[sla]` settings."""

    def __init__(self, settings: SlaSettings) -> None:
        self.settings = settings
        self._http: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        """Close the webhook connection pool."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def send(self, channel: str, recipient: str, subject: str,
                   payload: dict[str, Any]) -> None:
        """Deliver one message (NotifyError if it cannot be delivered now)."""
        if channel == "webhook":
            await self._webhook(recipient, payload)
        elif channel == "email":
            await self._email(recipient, subject, payload)
        else:
            raise NotifyError(f"unknown channel {channel!r}")

    async def _webhook(self, url: str, payload: dict[str, Any]) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s)
        try:
            response = await self._http.post(url, json=payload)
        except httpx.HTTPError as exc:
            raise NotifyError(f"webhook {url}: {exc!r}") from exc
        if response.status_code >= 300:
            raise NotifyError(f"webhook {url} answered {response.status_code}")

    async def _email(self, to: str, subject: str, payload: dict[str, Any]) -> None:
        smtp = self.settings.smtp
        if smtp.host is None:
            raise NotifyError("no SMTP host configured ([sla.smtp] host)")
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = smtp.sender, to, subject
        msg.set_content(payload.get("text") or subject)
        try:
            await aiosmtplib.send(
                msg, hostname=smtp.host, port=smtp.port, username=smtp.username,
                password=smtp.password, start_tls=smtp.starttls, use_tls=smtp.use_tls,
                timeout=smtp.timeout_s,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise NotifyError(f"email to {to}: {exc}") from exc
