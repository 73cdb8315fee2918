"""Mail for invitations, email verification and password resets.

With ``console.smtp.host`` set, mail goes out through that server (STARTTLS unless turned
off), in a worker thread so the event loop never blocks on SMTP. Without it (the quick
start) each mail is written to the gateway's log at WARNING, link and all, for the
operator to pass on. Mails carry links, never passwords.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from email.message import EmailMessage

from mesh.config import ConsoleMailConfig

log = logging.getLogger("mesh.console.mail")


class Mailer:
    def __init__(self, config: ConsoleMailConfig) -> None:
        self.config = config
        self._sending: set[asyncio.Task[None]] = set()

    def post(self, to: str, subject: str, body: str) -> None:
        """Send without waiting: an answer that waited for the mail server only when the
        email has an account would tell, by its time, which emails do. (Without a host the
        mail is logged at once: that costs no wait worth measuring.)"""
        if not self.config.host:
            log.warning("mail to %s (no SMTP configured, so it is logged): %s\n%s", to, subject, body)
            return
        task = asyncio.create_task(self.send(to, subject, body))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def send(self, to: str, subject: str, body: str) -> None:
        if not self.config.host:
            log.warning("mail to %s (no SMTP configured, so it is logged): %s\n%s", to, subject, body)
            return
        message = EmailMessage()
        message["From"] = self.config.sender
        message["To"] = to
        # The subject carries an organization's name (its owner's text): one line, always.
        message["Subject"] = " ".join(subject.split())
        message.set_content(body)
        try:
            await asyncio.to_thread(self._send, message)
        except (OSError, smtplib.SMTPException):
            log.exception("could not send mail to %s (%s)", to, subject)

    def _send(self, message: EmailMessage) -> None:
        cfg = self.config
        assert cfg.host is not None
        with smtplib.SMTP(cfg.host, cfg.port, timeout=30) as smtp:
            if cfg.starttls:
                smtp.starttls()
            if cfg.username:
                smtp.login(cfg.username, cfg.password.get_secret_value() if cfg.password else "")
            smtp.send_message(message)
