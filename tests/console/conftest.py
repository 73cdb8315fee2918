"""The console in process: the real app (lifespan and all) on a SQLite file, driven by httpx
through ASGI, with the session-scoped test engine behind its models. One app for the
session; every test signs up its own users, so tests never share accounts."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from conftest import engine_models
from mesh.app import create_app
from mesh.config import Settings
from support.gateway import ADMIN_KEY
from testengine.harness import EngineProcess

WEBHOOK_SECRET = "whsec_console_tests_0123456789abcdef"
ADMIN_EMAIL = "operator@example.com"
PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_META = re.compile(r'<meta name="csrf-token" content="([^"]+)"')


def console_settings(work: Path, engine_url: str, **console: Any) -> Settings:
    return Settings.model_validate({
        "database": f"sqlite:///{work}/mesh.db",
        "admin_key": ADMIN_KEY,
        "models": engine_models(engine_url),
        "billing": {"usage_flush_interval": 0.05},
        "logging": {"level": "WARNING"},
        "console": {
            "payments": {"provider": "test", "stripe_webhook_secret": WEBHOOK_SECRET},
            "admins": [ADMIN_EMAIL],
            "signups_per_ip_per_hour": 10_000,  # the suite signs many users up from one address
            "invitations_per_hour": 10_000,  # and invites many from it
            # Sign-up signs in at once here; test_email.py runs its own app with verification.
            "verify_email": False,
            **console,
        },
    })


@pytest.fixture(scope="session")
async def console_app(engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Starlette]:
    app = create_app(console_settings(tmp_path_factory.mktemp("console"), engine.base_url))
    async with app.router.lifespan_context(app):
        yield app


class Browser:
    """One visitor: a cookie jar, a client address, and the forms a person would fill in."""

    def __init__(self, app: Starlette, ip: str = "127.0.0.1") -> None:
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=(ip, 50000)), base_url="http://testserver"
        )
        self.email = ""

    async def aclose(self) -> None:
        await self.client.aclose()

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(path, **kw)

    async def csrf(self, path: str = "/console/signin") -> str:
        page = await self.client.get(path, follow_redirects=True)
        found = _CSRF.search(page.text) or _META.search(page.text)
        assert found, f"no CSRF token on {path} ({page.status_code})"
        return found.group(1)

    async def post(self, path: str, data: dict[str, Any] | None = None, *, token_from: str | None = None,
                   csrf: bool = True) -> httpx.Response:
        form = dict(data or {})
        if csrf:
            form["csrf_token"] = await self.csrf(token_from or _form_page(path))
        return await self.client.post(path, data=form)

    async def sign_up(self, email: str | None = None, password: str = PASSWORD) -> httpx.Response:
        """Sign up, then sign in (sign-up answers alike for free and taken emails, so it
        never starts a session); returns the sign-in's answer."""
        self.email = email or f"user-{secrets.token_hex(6)}@example.com"
        r = await self.post("/console/signup", {"email": self.email, "password": password,
                                                "password_confirm": password}, token_from="/console/signup")
        assert r.status_code == 303 and r.headers["location"] == "/console/signin", r.text
        r = await self.sign_in(self.email, password)
        assert r.status_code == 303, r.text
        return r

    async def sign_in(self, email: str, password: str = PASSWORD) -> httpx.Response:
        return await self.post("/console/signin", {"email": email, "password": password},
                               token_from="/console/signin")


def _form_page(path: str) -> str:
    """The page whose form posts to ``path`` (its CSRF token is the session's anyway)."""
    if path.startswith("/console/signup"):
        return "/console/signup"
    if path.startswith("/console/signin"):
        return "/console/signin"
    return "/console/settings"


@pytest.fixture
async def browser(console_app: Starlette) -> AsyncIterator[Browser]:
    b = Browser(console_app)
    yield b
    await b.aclose()


@pytest.fixture
async def customer(console_app: Starlette) -> AsyncIterator[Browser]:
    """A signed-in customer with a fresh account."""
    b = Browser(console_app)
    await b.sign_up()
    yield b
    await b.aclose()


@pytest.fixture
async def operator(console_app: Starlette) -> AsyncIterator[Browser]:
    """The operator named by ``console.admins`` (signed up once, signed in per test)."""
    b = Browser(console_app)
    page = await b.get("/console/signin")
    assert page.status_code == 200
    r = await b.sign_in(ADMIN_EMAIL)
    if r.status_code != 303:
        await b.sign_up(ADMIN_EMAIL)
    yield b
    await b.aclose()


_ACCOUNT = re.compile(r"<code>(acct_[0-9a-f]+)</code>")
_NEW_KEY = re.compile(r'id="new-key-value">(sk-mesh-[A-Za-z0-9_-]+)<')


async def account_of(b: Browser) -> str:
    page = await b.get("/console/settings")
    found = _ACCOUNT.search(page.text)
    assert found, page.text
    return found.group(1)


async def create_key(b: Browser, name: str = "test key", **fields: Any) -> tuple[str, str]:
    """Create a key through the form; returns (key id, the full key shown once)."""
    r = await b.post("/console/keys", {"name": name, **fields}, token_from="/console/keys")
    assert r.status_code == 201, r.text
    raw = _NEW_KEY.search(r.text)
    assert raw, r.text
    key_id = re.search(r'data-key-id="(key_[0-9a-f]+)"', r.text)
    assert key_id
    return key_id.group(1), raw.group(1)


def api(app: Starlette, key: str | None = None) -> httpx.AsyncClient:
    """The public API of the same app, as a customer's backend calls it."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=headers)


async def grant(app: Starlette, account_id: str, credits: str) -> None:
    from mesh.billing.money import parse_credits

    await app.state.gateway.services.ledger.grant(account_id, parse_credits(credits))


class Mailbox(logging.Handler):
    """The quick start's mail: written to the log (no SMTP configured)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.mails: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.mails.append(record.getMessage())

    def link_for(self, email: str) -> str:
        mail = next(m for m in reversed(self.mails) if f"mail to {email} " in m)
        found = re.search(r"(/console/[a-z]+/[A-Za-z0-9_-]{20,})", mail)
        assert found, mail
        return found.group(1)


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    logger = logging.getLogger("mesh.console.mail")
    logger.addHandler(box)
    try:
        yield box
    finally:
        logger.removeHandler(box)
