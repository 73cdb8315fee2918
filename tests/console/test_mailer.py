"""The mailer over real SMTP: a tiny SMTP server on a local port receives the invitation
mail (sender, recipient, subject, the link); without a host the mail goes to the log."""

from __future__ import annotations

import asyncio
import logging

from pydantic import SecretStr

from mesh.config import ConsoleMailConfig
from mesh.console.mailer import Mailer


class SmtpSink:
    """Just enough SMTP (RFC 5321, plain, AUTH PLAIN accepted) to receive messages."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], str]] = []
        self.auth: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(line: str) -> None:
            writer.write((line + "\r\n").encode())

        say("220 sink ready")
        sender, rcpts, data = "", [], []
        while line := (await reader.readline()).decode().rstrip("\r\n"):
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                say("250-sink")
                say("250 AUTH PLAIN")
            elif verb == "AUTH":
                self.auth.append(line)
                say("235 ok")
            elif verb == "MAIL":
                sender = line.split(":", 1)[1].strip()
                say("250 ok")
            elif verb == "RCPT":
                rcpts.append(line.split(":", 1)[1].strip())
                say("250 ok")
            elif verb == "DATA":
                say("354 go on")
                while (body := (await reader.readline()).decode()) != ".\r\n":
                    data.append(body)
                self.messages.append((sender, rcpts, "".join(data)))
                say("250 queued")
            elif verb == "QUIT":
                say("221 bye")
                await writer.drain()
                break
            else:
                say("250 ok")
            await writer.drain()
        writer.close()


async def test_mail_goes_out_through_smtp() -> None:
    sink = SmtpSink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        mailer = Mailer(ConsoleMailConfig(host="127.0.0.1", port=port, starttls=False, username="mesh",
                                   password=SecretStr("pw"), sender="Mesh <mesh@example.com>"))
        await mailer.send("dev@example.com", "You are invited", "Open https://mesh.example/console/invitations/abc\n")
    finally:
        server.close()
        await server.wait_closed()
    [(sender, rcpts, data)] = sink.messages
    assert sender == "<mesh@example.com>" and rcpts == ["<dev@example.com>"]
    assert "Subject: You are invited" in data and "/console/invitations/abc" in data
    assert sink.auth


async def test_without_a_host_the_mail_is_logged() -> None:
    logger = logging.getLogger("mesh.console.mail")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        await Mailer(ConsoleMailConfig()).send("x@example.com", "Hello", "the link\n")
    finally:
        logger.removeHandler(handler)
    assert any("mail to x@example.com" in r and "the link" in r for r in records)


async def test_a_name_with_line_breaks_neither_breaks_nor_injects_headers() -> None:
    """Red team (issue 18): an organization's name (its owner's text, with inner line breaks
    allowed) goes into the invitation's subject; it must neither add headers nor make the
    mail fail (which answered the invitation with a 500). Without a host the body, link and
    all, is logged on purpose; with one, a failing send logs no link."""
    sink = SmtpSink()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = ConsoleMailConfig(host="127.0.0.1", port=port, starttls=False, sender="Mesh <mesh@example.com>")
    try:
        await Mailer(config).send("dev@example.com", "You are invited to Acme\r\nBcc: victim@example.com",
                                  "Open https://mesh.example/console/invitations/abc\n")
    finally:
        server.close()
        await server.wait_closed()
    [(_, rcpts, data)] = sink.messages
    assert rcpts == ["<dev@example.com>"] and "\nBcc:" not in data
    assert "Subject: You are invited to Acme Bcc: victim@example.com" in data
    # Now nothing listens on that port: the failure is logged without the link.
    logger = logging.getLogger("mesh.console.mail")
    records: list[str] = []

    class Records(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage() + (self.formatter or logging.Formatter()).formatException(
                record.exc_info) if record.exc_info else record.getMessage())

    handler = Records()
    logger.addHandler(handler)
    try:
        await Mailer(config).send("dev@example.com", "Reset", "Open https://mesh.example/console/reset/secret-token\n")
    finally:
        logger.removeHandler(handler)
    assert records and not any("secret-token" in r for r in records)
