"""Delivering an alert to the operator: a signed webhook and/or an email.

The webhook is ``POST`` JSON with ``mesh-signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>" under billing.alerts.webhook_secret>`` (Stripe's scheme: check the time too).
The email goes through the configured SMTP server (``smtplib`` on a worker thread, so the
event loop never waits on it). Each channel is tried a few times with backoff and then
logged; :meth:`Notifier.send` never raises. Alerts are sent from background tasks only,
never on a request's path.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import smtplib
import ssl
import time
from email.message import EmailMessage
from typing import Any

from mesh.config import AlertsConfig, SmtpConfig

log = logging.getLogger("mesh.billing.notify")

ATTEMPTS = 3
BACKOFF = 0.5  # seconds before the second attempt; doubled each time


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The ``mesh-signature`` header of ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def _send_mail(smtp: SmtpConfig, message: EmailMessage) -> None:
    """Blocking: runs on a worker thread."""
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if smtp.tls == "ssl":
        client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
    with client:
        if smtp.tls == "starttls":
            client.starttls(context=context)
        if smtp.username:
            client.login(smtp.username, smtp.secret() or "")
        client.send_message(message)


class Notifier:
    def __init__(self, config: AlertsConfig) -> None:
        self.config = config

    async def send(self, kind: str, data: dict[str, Any], subject: str, text: str) -> dict[str, Any]:
        """Deliver one event on every configured channel; returns the event."""
        event = {"id": "evt_" + secrets.token_hex(12), "type": kind, "created": int(time.time()), "data": data}
        await asyncio.gather(self._webhook(event), self._email(event, subject, text))
        return event

    async def _webhook(self, event: dict[str, Any]) -> None:
        url = self.config.webhook_url
        if url is None:
            return
        body = json.dumps(event).encode()
        secret = "" if self.config.webhook_secret is None else self.config.webhook_secret.get_secret_value()
        import httpx  # only when an alert is sent: a gateway starts without it

        async with httpx.AsyncClient(timeout=10) as client:
            for attempt in range(ATTEMPTS):
                headers = {"content-type": "application/json", "mesh-signature": sign(body, secret)}
                try:
                    r = await client.post(url, content=body, headers=headers)
                    if r.status_code < 300:
                        return
                    log.warning("%s webhook answered %d (attempt %d)", event["type"], r.status_code, attempt + 1)
                except httpx.HTTPError as exc:
                    log.warning("%s webhook failed (attempt %d): %s", event["type"], attempt + 1, exc)
                await asyncio.sleep(BACKOFF * 2**attempt)
        log.error("%s webhook %s not delivered", event["type"], event["id"])

    async def _email(self, event: dict[str, Any], subject: str, text: str) -> None:
        smtp, to = self.config.smtp, self.config.email_to
        if smtp is None or not to:
            return
        message = EmailMessage()
        message["Subject"] = subject
        message["From"] = self.config.email_from or ""
        message["To"] = ", ".join(to)
        message["Message-ID"] = f"<{event['id']}@mesh>"  # one id per event: a retried send is recognisable
        message.set_content(f"{text}\n\n{json.dumps(event, indent=2)}\n")
        for attempt in range(ATTEMPTS):
            try:
                await asyncio.to_thread(_send_mail, smtp, message)
                return
            except (OSError, smtplib.SMTPException) as exc:
                log.warning("%s email failed (attempt %d): %s", event["type"], attempt + 1, exc)
            await asyncio.sleep(BACKOFF * 2**attempt)
        log.error("%s email %s not delivered", event["type"], event["id"])
