"""Sign-up, sign-in, sessions and their cookies, sign-out, password change, throttling."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette

from mesh.app import create_app
from mesh.console.tables import console_sessions, console_users
from mesh.gateway import Gateway
from testengine.harness import EngineProcess

from .conftest import PASSWORD, Browser, console_settings

PAGES = [
    "/console/dashboard",
    "/console/billing",
    "/console/keys",
    "/console/models",
    "/console/playground",
    "/console/quickstart",
    "/console/settings",
    "/console/admin/accounts",
    "/console/admin/usage",
    "/console/admin/models",
    "/console/admin/workers",
    "/console/admin/codes",
]


def gateway(app: Starlette) -> Gateway:
    gw: Gateway = app.state.gateway
    return gw


@pytest.mark.parametrize("path", PAGES)
async def test_page_without_session_redirects_to_signin(browser: Browser, path: str) -> None:
    r = await browser.get(path)
    assert r.status_code == 303
    assert r.headers["location"] == f"/console/signin?next={path}"


async def test_signin_and_signup_pages_render_with_csrf_cookie(browser: Browser) -> None:
    for path in ("/console/signin", "/console/signup"):
        r = await browser.get(path)
        assert r.status_code == 200
        assert 'name="csrf_token"' in r.text
    assert "mesh_csrf" in browser.client.cookies


async def test_signup_stores_an_argon2_hash_not_the_password(console_app: Starlette, browser: Browser) -> None:
    await browser.sign_up(password=PASSWORD)
    async with gateway(console_app).services.database.read() as conn:
        stored = (
            await conn.execute(select(console_users.c.password_hash).where(console_users.c.email == browser.email))
        ).scalar_one()
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    dashboard = await browser.get("/console/dashboard")
    assert dashboard.status_code == 200
    assert browser.email in dashboard.text


async def test_signup_creates_its_own_account(console_app: Starlette, browser: Browser) -> None:
    await browser.sign_up()
    settings = await browser.get("/console/settings")
    account_id = settings.text.split("<code>acct_")[1].split("<")[0]
    account = await gateway(console_app).services.accounts.get("acct_" + account_id)
    assert account.name == browser.email
    assert account.balance == 0


@pytest.mark.parametrize(
    ("email", "password", "confirm", "message"),
    [
        ("not-an-email", PASSWORD, PASSWORD, "valid email"),
        ("short@example.com", "short", "short", "at least 10"),
        ("differ@example.com", PASSWORD, PASSWORD + "x", "differ"),
    ],
)
async def test_signup_shows_form_errors(browser: Browser, email: str, password: str, confirm: str,
                                        message: str) -> None:
    r = await browser.post("/console/signup", {"email": email, "password": password, "password_confirm": confirm})
    assert r.status_code == 400
    assert message in r.text
    assert "mesh_session" not in browser.client.cookies


async def test_signup_does_not_reveal_registered_emails(console_app: Starlette, browser: Browser) -> None:
    await browser.sign_up()
    answers = []
    for email in (browser.email.upper(), f"fresh-{secrets.token_hex(4)}@example.com"):
        visitor = Browser(console_app)
        try:
            r = await visitor.post("/console/signup", {"email": email, "password": PASSWORD + "-other",
                                                       "password_confirm": PASSWORD + "-other"})
            flash = (await visitor.get("/console/signin")).text
            answers.append((r.status_code, r.headers["location"], "mesh_session" in visitor.client.cookies,
                            "Your account is ready" in flash))
        finally:
            await visitor.aclose()
    assert answers[0] == answers[1] == (303, "/console/signin", False, True)
    # The taken email's owner is untouched: the old password still works, the new one does not.
    again = Browser(console_app)
    try:
        assert (await again.sign_in(browser.email, PASSWORD + "-other")).status_code == 400
        assert (await again.sign_in(browser.email)).status_code == 303
    finally:
        await again.aclose()


async def test_session_cookie_is_httponly_lax_and_scoped(browser: Browser) -> None:
    r = await browser.sign_up()
    cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith("mesh_session="))
    parts = {p.strip().split("=")[0].lower() for p in cookie.split(";")}
    assert {"httponly", "path", "max-age"} <= parts
    assert "samesite=lax" in cookie.lower()
    assert "path=/console" in cookie.lower()
    assert "secure" not in parts  # plain http and no secure_cookies: a browser would drop it otherwise


async def test_session_cookie_is_secure_over_https(console_app: Starlette) -> None:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=console_app), base_url="https://testserver")
    try:
        email = f"tls-{secrets.token_hex(4)}@example.com"
        for path, form in (("/console/signup", {"password_confirm": PASSWORD}), ("/console/signin", {})):
            page = await client.get(path)
            token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
            r = await client.post(path, data={"email": email, "password": PASSWORD, "csrf_token": token, **form})
            assert r.status_code == 303
        cookie = next(v for v in r.headers.get_list("set-cookie") if v.startswith("mesh_session="))
        assert "secure" in cookie.lower()
    finally:
        await client.aclose()


async def test_pages_carry_security_headers(customer: Browser) -> None:
    r = await customer.get("/console/dashboard")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-frame-options"] == "DENY"


async def test_signin_with_right_and_wrong_password(console_app: Starlette, customer: Browser) -> None:
    b = Browser(console_app, ip="10.1.0.1")
    try:
        wrong = await b.sign_in(customer.email, "not the password")
        assert wrong.status_code == 400
        assert "Wrong email or password" in wrong.text
        right = await b.sign_in(customer.email.upper())
        assert right.status_code == 303 and right.headers["location"] == "/console/dashboard"
        assert (await b.get("/console/keys")).status_code == 200
    finally:
        await b.aclose()


async def test_signin_returns_to_next_but_never_off_site(console_app: Starlette, customer: Browser) -> None:
    b = Browser(console_app, ip="10.1.0.2")
    try:
        r = await b.post("/console/signin", {"email": customer.email, "password": PASSWORD, "next": "/console/keys"},
                         token_from="/console/signin")
        assert r.headers["location"] == "/console/keys"
        for evil in ("https://evil.example/", "//evil.example/console/x", "/console/../x\\y"):
            r = await b.post("/console/signin", {"email": customer.email, "password": PASSWORD, "next": evil},
                             token_from="/console/signin")
            assert r.headers["location"] == "/console/dashboard"
    finally:
        await b.aclose()


async def test_signin_is_throttled_per_email(console_app: Starlette, customer: Browser) -> None:
    attacker = Browser(console_app, ip="10.2.0.1")
    other_ip = Browser(console_app, ip="10.2.0.2")
    try:
        for _ in range(5):
            assert (await attacker.sign_in(customer.email, "guess")).status_code == 400
        blocked = await attacker.sign_in(customer.email, "guess")
        assert blocked.status_code == 429
        assert "Too many attempts, try again in" in blocked.text
        # The right password from elsewhere is refused too while the email is locked.
        locked = await other_ip.sign_in(customer.email)
        assert locked.status_code == 429
    finally:
        await attacker.aclose()
        await other_ip.aclose()


async def test_a_throttled_address_still_signs_in_with_the_right_password(
    console_app: Starlette, customer: Browser
) -> None:
    """20 failures from one address (a NAT: an attacker behind it) do not lock out the
    people behind the same address; the attacker's further guesses are throttled."""
    attacker = Browser(console_app, ip="10.3.0.1")
    neighbour = Browser(console_app, ip="10.3.0.1")
    try:
        for i in range(20):
            r = await attacker.sign_in(f"nobody-{i}@example.com", "guess")
            assert r.status_code == 400
        r = await attacker.sign_in(customer.email, "guess")
        assert r.status_code == 429 and "Too many attempts" in r.text
        r = await neighbour.sign_in(customer.email)
        assert r.status_code == 303 and r.headers["location"] == "/console/dashboard"
        assert "mesh_session" in neighbour.client.cookies
    finally:
        await attacker.aclose()
        await neighbour.aclose()


async def test_signout_ends_the_session_for_good(console_app: Starlette, customer: Browser) -> None:
    stolen = customer.client.cookies["mesh_session"]
    r = await customer.post("/console/signout")
    assert r.status_code == 303 and r.headers["location"] == "/console/signin"
    replay = httpx.AsyncClient(transport=httpx.ASGITransport(app=console_app), base_url="http://testserver",
                               cookies={"mesh_session": stolen})
    try:
        assert (await replay.get("/console/dashboard")).status_code == 303
    finally:
        await replay.aclose()


async def test_sessions_are_stored_hashed(console_app: Starlette, customer: Browser) -> None:
    token = customer.client.cookies["mesh_session"]
    async with gateway(console_app).services.database.read() as conn:
        hashes = list((await conn.execute(select(console_sessions.c.token_hash))).scalars())
    assert token not in hashes and len(hashes) >= 1


async def test_password_change(console_app: Starlette, customer: Browser) -> None:
    second = Browser(console_app, ip="10.4.0.1")
    try:
        assert (await second.sign_in(customer.email)).status_code == 303
        bad = await customer.post("/console/settings/password", {
            "current_password": "wrong one", "new_password": "a brand new password",
            "new_password_confirm": "a brand new password"})
        assert bad.status_code == 400 and "current password is not right" in bad.text
        weak = await customer.post("/console/settings/password", {
            "current_password": PASSWORD, "new_password": "short", "new_password_confirm": "short"})
        assert weak.status_code == 400
        ok = await customer.post("/console/settings/password", {
            "current_password": PASSWORD, "new_password": "a brand new password",
            "new_password_confirm": "a brand new password"})
        assert ok.status_code == 303
        assert (await customer.get("/console/dashboard")).status_code == 200  # this session stays
        assert (await second.get("/console/dashboard")).status_code == 303  # the other one ended
        assert (await second.sign_in(customer.email)).status_code == 400
        assert (await second.sign_in(customer.email, "a brand new password")).status_code == 303
    finally:
        await second.aclose()


async def test_unknown_console_path_is_an_html_404(customer: Browser) -> None:
    r = await customer.get("/console/nope")
    assert r.status_code == 404
    assert "text/html" in r.headers["content-type"]


async def test_oversized_or_garbled_forms_are_refused(customer: Browser) -> None:
    token = await customer.csrf("/console/keys")
    big = await customer.client.post("/console/keys", data={"name": "x" * 100_000, "csrf_token": token})
    assert big.status_code == 413
    garbled = await customer.client.post(
        "/console/keys", content=b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n",
        headers={"content-type": "multipart/form-data; boundary=b", "x-csrf-token": token},
    )
    assert garbled.status_code == 400
    assert "new-key-value" not in garbled.text


async def test_signups_are_limited_per_address(engine: EngineProcess, tmp_path: Path) -> None:
    app = create_app(console_settings(tmp_path, engine.base_url, signups_per_ip_per_hour=2))
    async with app.router.lifespan_context(app):
        visitors = [Browser(app, ip="10.9.0.1") for _ in range(3)]
        elsewhere = Browser(app, ip="10.9.0.2")
        try:
            await visitors[0].sign_up()
            await visitors[1].sign_up()
            form = {"email": "third@example.com", "password": PASSWORD, "password_confirm": PASSWORD}
            third = await visitors[2].post("/console/signup", form, token_from="/console/signup")
            assert third.status_code == 429 and "Too many new accounts" in third.text
            await elsewhere.sign_up()  # another address is not affected
        finally:
            for b in (*visitors, elsewhere):
                await b.aclose()


async def test_static_files_carry_nosniff_and_a_csp(browser: Browser) -> None:
    for name in ("console.css", "playground.js"):
        r = await browser.get(f"/console/static/{name}")
        assert r.status_code == 200, name
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'none'" in r.headers["content-security-policy"]


async def test_secure_cookie_follows_public_url(engine: EngineProcess, tmp_path: Path) -> None:
    """Behind a TLS-terminating ingress the request looks like http; public_url says https."""
    settings = console_settings(tmp_path, engine.base_url)
    settings = settings.model_copy(update={"server": settings.server.model_copy(
        update={"public_url": "https://mesh.example.com"})})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        b = Browser(app)  # plain http, as the proxy forwards it
        try:
            r = await b.get("/console/signin")
        finally:
            await b.aclose()
    cookies = r.headers.get_list("set-cookie")
    assert cookies and all("; secure" in c.lower() for c in cookies)
