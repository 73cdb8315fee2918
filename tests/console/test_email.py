"""Password accounts done properly: sign-up waits for the mailed verification link; a
password reset by a mailed, single-use, expiring link; both throttled and both answering
alike for registered and unknown emails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import update
from starlette.applications import Starlette

from mesh.app import create_app
from mesh.console.tables import email_tokens
from mesh.store import utcnow
from testengine.harness import EngineProcess

from .conftest import PASSWORD, Browser, Mailbox, console_settings

NEW_PASSWORD = "another long password"


@pytest.fixture(scope="module")
async def strict_app(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Starlette]:
    settings = console_settings(tmp_path_factory.mktemp("email"), engine.base_url, verify_email=True,
                                mails_per_email_per_hour=3, mails_per_ip_per_hour=1000)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


async def _sign_up(b: Browser, email: str) -> None:
    r = await b.post("/console/signup", {"email": email, "password": PASSWORD, "password_confirm": PASSWORD},
                     token_from="/console/signup")
    assert r.status_code == 303 and r.headers["location"] == "/console/signin", r.text


async def test_sign_in_waits_for_the_verification_link(strict_app: Starlette, mailbox: Mailbox) -> None:
    b = Browser(strict_app)
    try:
        email = "verify-me@example.com"
        await _sign_up(b, email)
        r = await b.sign_in(email)
        assert r.status_code == 403 and "Verify your email first" in r.text
        link = mailbox.link_for(email)
        assert link.startswith("/console/verify/")
        # Opening the link (as a mail scanner does, or twice) uses nothing up: it shows a button.
        for _ in range(2):
            r = await b.get(link)
            assert r.status_code == 200 and f'action="{link}"' in r.text
        assert (await b.sign_in(email)).status_code == 403
        r = await b.post(link, {}, token_from=link)
        assert r.status_code == 303 and r.headers["location"] == "/console/signin"
        assert (await b.get(link)).status_code == 404  # single-use
        assert (await b.post(link, {}, token_from="/console/signin")).status_code == 404
        assert (await b.sign_in(email)).status_code == 303
        assert (await b.get("/console/dashboard")).status_code == 200
        # A taken email gets the same answer and no mail.
        before = len(mailbox.mails)
        await _sign_up(Browser(strict_app), email)
        assert len(mailbox.mails) == before
    finally:
        await b.aclose()


async def test_password_reset_by_a_single_use_expiring_link(strict_app: Starlette, mailbox: Mailbox) -> None:
    b, other_session = Browser(strict_app), Browser(strict_app)
    try:
        email = "forgetful@example.com"
        await _sign_up(b, email)
        link = mailbox.link_for(email)
        await b.post(link, {}, token_from=link)
        assert (await other_session.sign_in(email)).status_code == 303
        r = await b.post("/console/reset", {"email": email}, token_from="/console/reset")
        assert r.status_code == 200 and "If that email has an account" in r.text
        unknown = await b.post("/console/reset", {"email": "nobody@example.com"}, token_from="/console/reset")
        assert unknown.status_code == 200 and "If that email has an account" in unknown.text
        link = mailbox.link_for(email)
        assert link.startswith("/console/reset/")
        assert (await b.get(link)).status_code == 200
        r = await b.post(link, {"password": "short", "password_confirm": "short"}, token_from=link)
        assert r.status_code == 400
        r = await b.post(link, {"password": NEW_PASSWORD, "password_confirm": NEW_PASSWORD}, token_from=link)
        assert r.status_code == 303, r.text
        assert (await b.get(link)).status_code == 404  # used
        assert (await other_session.get("/console/dashboard")).status_code == 303  # every session ended
        assert (await b.sign_in(email, PASSWORD)).status_code == 400
        assert (await b.sign_in(email, NEW_PASSWORD)).status_code == 303
        # An expired link opens nothing.
        await b.post("/console/reset", {"email": email}, token_from="/console/reset")
        late = mailbox.link_for(email)
        db = strict_app.state.gateway.services.database
        async with db.write() as conn:
            await conn.execute(update(email_tokens).where(email_tokens.c.used_at.is_(None))
                               .values(expires_at=utcnow() - timedelta(seconds=1)))
        assert (await b.get(late)).status_code == 404
    finally:
        await b.aclose()
        await other_session.aclose()


async def test_mails_are_throttled_per_email(strict_app: Starlette, mailbox: Mailbox) -> None:
    b = Browser(strict_app)
    try:
        email = "flooded@example.com"
        answers = [(await b.post("/console/reset", {"email": email}, token_from="/console/reset")).status_code
                   for _ in range(4)]
        assert answers == [200, 200, 200, 429]
    finally:
        await b.aclose()


async def test_mail_is_sent_after_the_answer_so_its_time_tells_nothing(
    engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Red team (issue 18): over SMTP, a reset (or sign-up, or a new verification link) for a
    registered email waited for the mail server and one for an unknown email did not, so the
    answer's time said which emails have accounts. Here the SMTP server says nothing until the
    answer has arrived; a mailer that makes the answer wait gives up first (its own timeout)."""
    import asyncio

    answered = asyncio.Event()
    order: list[str] = []
    reported = asyncio.Event()

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gave_up = asyncio.ensure_future(reader.read())
        first = asyncio.ensure_future(answered.wait())
        done, _ = await asyncio.wait({gave_up, first}, return_when=asyncio.FIRST_COMPLETED)
        order.append("answered first" if first in done else "mailer gave up first")
        reported.set()
        gave_up.cancel()
        first.cancel()
        writer.close()

    server = await asyncio.start_server(stalled, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = console_settings(tmp_path_factory.mktemp("email-timing"), engine.base_url, verify_email=True,
                                smtp={"host": "127.0.0.1", "port": port, "starttls": False})
    app = create_app(settings)
    email = "known@example.com"
    steps = [("/console/signup", {"email": email, "password": PASSWORD, "password_confirm": PASSWORD},
              "/console/signup", 303),
             ("/console/reset", {"email": email}, "/console/reset", 200),
             ("/console/verify", {"email": email}, "/console/reset", 303)]
    try:
        async with app.router.lifespan_context(app):
            b = Browser(app)
            try:
                for path, form, token_from, status in steps:
                    answered.clear()
                    reported.clear()
                    r = await b.post(path, form, token_from=token_from)
                    assert r.status_code == status, r.text
                    answered.set()
                    await reported.wait()  # the mail's connection reports which came first
                assert order == ["answered first"] * 3
            finally:
                answered.set()
                await b.aclose()
    finally:
        server.close()
        await server.wait_closed()
