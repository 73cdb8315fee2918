"""Single sign-on against a real OIDC provider on a local port (tests/support/oidc_provider):
a verified email whose domain an organization claims signs in and becomes a member with the
default role; an unverified one is refused; an organization that requires SSO refuses its
members' password sign-in; a forged state is refused."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette

from mesh.app import create_app
from support.gateway import ADMIN_KEY
from support.oidc_provider import CLIENT_ID, CLIENT_SECRET, OidcProvider
from testengine.harness import EngineProcess

from .conftest import PASSWORD, Browser, account_of, api, console_settings


@pytest.fixture(scope="module")
def oidc() -> Iterator[OidcProvider]:
    with OidcProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
async def sso_app(engine: EngineProcess, oidc: OidcProvider,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Starlette]:
    provider = {"id": "local", "name": "Local IdP", "issuer": oidc.issuer, "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET}
    app = create_app(console_settings(tmp_path_factory.mktemp("sso"), engine.base_url, sso=[provider]))
    async with app.router.lifespan_context(app):
        yield app


async def _sso_sign_in(b: Browser) -> httpx.Response:
    """Click "Sign in with Local IdP": to the provider over real HTTP, and back."""
    page = await b.get("/console/signin")
    assert 'data-sso="local"' in page.text
    start = await b.get("/console/sso/local")
    assert start.status_code == 303, start.text
    async with httpx.AsyncClient() as idp:
        back = await idp.get(start.headers["location"])
    assert back.status_code == 302, back.text
    target = urlsplit(back.headers["location"])
    assert target.path == "/console/sso/local/callback"
    return await b.get(f"{target.path}?{target.query}")


async def _claim(app: Starlette, org: str, **body: object) -> None:
    async with api(app, ADMIN_KEY) as admin:
        r = await admin.put(f"/admin/v1/accounts/{org}/sso", json=body)
        assert r.status_code == 200, r.text


async def test_a_verified_domain_joins_with_the_default_role(sso_app: Starlette, oidc: OidcProvider) -> None:
    owner, newcomer = Browser(sso_app), Browser(sso_app)
    try:
        await owner.sign_up()
        org = await account_of(owner)
        await _claim(sso_app, org, domains=["acme.test"], default_role="developer")
        oidc.user = {"sub": "u-new", "email": "New.Person@acme.test", "email_verified": True}
        r = await _sso_sign_in(newcomer)
        assert r.status_code == 303 and r.headers["location"] == "/console/dashboard", r.text
        assert await account_of(newcomer) == org
        assert (await newcomer.get("/console/keys")).status_code == 200  # a developer
        assert (await newcomer.get("/console/billing")).status_code == 403
        members = (await owner.get("/console/members")).text
        assert 'data-member="new.person@acme.test"' in members
        audit = (await owner.get("/console/audit")).text
        assert "via=sso:local" in audit and 'data-action="member.joined"' in audit
        # Signing in again neither duplicates the membership nor changes the role.
        again = Browser(sso_app)
        assert (await _sso_sign_in(again)).status_code == 303
        assert await account_of(again) == org
        await again.aclose()
    finally:
        await owner.aclose()
        await newcomer.aclose()


async def test_an_unverified_email_is_refused(sso_app: Starlette, oidc: OidcProvider) -> None:
    b = Browser(sso_app)
    try:
        oidc.user = {"sub": "u-unverified", "email": "mallory@acme.test", "email_verified": False}
        r = await _sso_sign_in(b)
        assert r.status_code == 400 and "verified email" in r.text
        assert (await b.get("/console/dashboard")).status_code == 303  # not signed in
    finally:
        await b.aclose()


async def test_an_organization_that_requires_sso_refuses_password_sign_in(
    sso_app: Starlette, oidc: OidcProvider
) -> None:
    owner, member, outsider = Browser(sso_app), Browser(sso_app), Browser(sso_app)
    try:
        await owner.sign_up()
        await member.sign_up("pat@strict.test")
        await outsider.sign_up()
        org = await account_of(owner)
        await _claim(sso_app, org, domains=["strict.test"], default_role="viewer", require_sso=True)
        oidc.user = {"sub": "u-pat", "email": "pat@strict.test", "email_verified": True}
        via_sso = Browser(sso_app)
        assert (await _sso_sign_in(via_sso)).status_code == 303  # joins by domain
        assert await account_of(via_sso) == org
        await via_sso.aclose()
        for who in (member, owner):
            fresh = Browser(sso_app)
            r = await fresh.sign_in(who.email, PASSWORD)
            if who is member:  # never verified (verify_email is off here): SSO voided that password
                assert r.status_code == 400 and "Wrong email or password" in r.text
            else:
                assert r.status_code == 403 and "requires single sign-on" in r.text
            assert (await fresh.get("/console/dashboard")).status_code == 303
            await fresh.aclose()
        # Someone in no such organization still signs in with a password.
        fresh = Browser(sso_app)
        assert (await fresh.sign_in(outsider.email, PASSWORD)).status_code == 303
        await fresh.aclose()
        async with api(sso_app, ADMIN_KEY) as admin:
            log = (await admin.get(f"/admin/v1/audit-log?account_id={org}")).json()["data"]
            assert any(e["action"] == "sso.settings_changed" and e["detail"]["require_sso"] for e in log)
    finally:
        for b in (owner, member, outsider):
            await b.aclose()


async def test_a_forged_or_replayed_state_is_refused(sso_app: Starlette, oidc: OidcProvider) -> None:
    b = Browser(sso_app)
    try:
        oidc.user = {"sub": "u-x", "email": "x@acme.test", "email_verified": True}
        start = await b.get("/console/sso/local")
        async with httpx.AsyncClient() as idp:
            back = await idp.get(start.headers["location"])
        target = urlsplit(back.headers["location"])
        forged = target.query.replace("state=", "state=x")
        r = await b.get(f"{target.path}?{forged}")
        assert r.status_code == 400 and "start again" in r.text
        # The state cookie went with that attempt: the genuine answer cannot be replayed.
        r = await b.get(f"{target.path}?{target.query}")
        assert r.status_code == 400
        assert (await b.get("/console/dashboard")).status_code == 303
        assert (await b.get("/console/sso/nobody")).status_code == 404
    finally:
        await b.aclose()


async def test_an_invitation_is_no_way_around_required_sso(sso_app: Starlette, oidc: OidcProvider) -> None:
    """Red team (issue 18): accepting an invitation to an organization that requires SSO
    must not hand out a password-made session in it, signed out (signing up through the
    link) or signed in with a password; the person joins and then signs in through SSO."""
    import logging
    import re

    mails: list[str] = []

    class Box(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            mails.append(record.getMessage())

    box = Box(logging.WARNING)
    logging.getLogger("mesh.console.mail").addHandler(box)
    owner, newcomer, existing = Browser(sso_app), Browser(sso_app), Browser(sso_app)
    try:
        await owner.sign_up()
        await existing.sign_up()
        org = await account_of(owner)
        for email in ("new@guarded.test", existing.email):
            r = await owner.post("/console/members/invite", {"email": email, "role": "developer"})
            assert r.status_code == 303, r.text
        await _claim(sso_app, org, domains=["guarded.test"], default_role="viewer", require_sso=True)

        def link(email: str) -> str:
            mail = next(m for m in reversed(mails) if f"mail to {email} " in m)
            found = re.search(r"(/console/invitations/[A-Za-z0-9_-]{20,})", mail)
            assert found, mail
            return found.group(1)

        # Signed out: signing up through the link joins, but opens no session.
        new_link = link("new@guarded.test")
        r = await newcomer.post(new_link, {"password": PASSWORD, "password_confirm": PASSWORD}, token_from=new_link)
        assert r.status_code == 303 and r.headers["location"] == "/console/signin", r.text
        assert (await newcomer.get("/console/dashboard")).status_code == 303
        fresh = Browser(sso_app)
        r = await fresh.sign_in("new@guarded.test", PASSWORD)
        assert r.status_code == 403 and "requires single sign-on" in r.text
        await fresh.aclose()
        # Signed in with a password: accepting joins, and that session ends.
        old_link = link(existing.email)
        r = await existing.post(old_link, {}, token_from=old_link)
        assert r.status_code == 303 and r.headers["location"] == "/console/signin", r.text
        assert (await existing.get("/console/keys")).status_code == 303
        # The owner's own password session ended when SSO became required: back through SSO.
        oidc.user = {"sub": "u-owner", "email": owner.email, "email_verified": True}
        assert (await _sso_sign_in(owner)).status_code == 303
        members = (await owner.get("/console/members")).text
        assert 'data-member="new@guarded.test"' in members and f'data-member="{existing.email}"' in members
        # Through SSO the newcomer works in the organization with the invited role.
        oidc.user = {"sub": "u-guarded", "email": "new@guarded.test", "email_verified": True}
        via_sso = Browser(sso_app)
        assert (await _sso_sign_in(via_sso)).status_code == 303
        assert await account_of(via_sso) == org
        assert (await via_sso.get("/console/keys")).status_code == 200
        await via_sso.aclose()
    finally:
        logging.getLogger("mesh.console.mail").removeHandler(box)
        for b in (owner, newcomer, existing):
            await b.aclose()


async def test_requiring_sso_ends_the_members_password_sessions(sso_app: Starlette, oidc: OidcProvider) -> None:
    """Red team (issue 18): a member signed in with a password before the operator required
    SSO must not keep working in the organization through that session."""
    owner, outsider = Browser(sso_app), Browser(sso_app)
    try:
        await owner.sign_up()
        await outsider.sign_up()
        org = await account_of(owner)
        assert (await owner.get("/console/keys")).status_code == 200
        await _claim(sso_app, org, domains=["late.test"], default_role="viewer", require_sso=True)
        assert (await owner.get("/console/keys")).status_code == 303  # signed out
        assert (await outsider.get("/console/keys")).status_code == 200  # another organization: untouched
        # Changing other settings while SSO stays required ends nothing more than needed.
        oidc.user = {"sub": "u-late", "email": "late@late.test", "email_verified": True}
        via_sso = Browser(sso_app)
        assert (await _sso_sign_in(via_sso)).status_code == 303
        assert await account_of(via_sso) == org
        await via_sso.aclose()
    finally:
        for b in (owner, outsider):
            await b.aclose()


async def test_a_provider_limited_to_domains_cannot_sign_in_anyone_else(
    engine: EngineProcess, oidc: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Red team (issue 18): accounts are matched by email, so an IdP the operator set up for
    one customer (its administrators choose any "verified" email) could sign in as anyone
    else, the operator included. A provider given ``domains`` vouches only for those."""
    provider = {"id": "local", "name": "Local IdP", "issuer": oidc.issuer, "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET, "domains": ["acme.test"]}
    app = create_app(console_settings(tmp_path_factory.mktemp("sso-domains"), engine.base_url, sso=[provider],
                                      admins=["boss@example.com"]))
    async with app.router.lifespan_context(app):
        boss, attacker, insider = Browser(app), Browser(app), Browser(app)
        try:
            await boss.sign_up("boss@example.com")
            for email in ("boss@example.com", "BOSS@Example.com", "boss@sub.acme.test.example.com"):
                oidc.user = {"sub": "u-evil", "email": email, "email_verified": True}
                r = await _sso_sign_in(attacker)
                assert r.status_code == 403 and "does not vouch" in r.text, (email, r.text)
                assert (await attacker.get("/console/dashboard")).status_code == 303
            oidc.user = {"sub": "u-ok", "email": "Someone@ACME.test", "email_verified": True}
            assert (await _sso_sign_in(insider)).status_code == 303
            assert (await insider.get("/console/dashboard")).status_code == 200
        finally:
            for b in (boss, attacker, insider):
                await b.aclose()


async def test_an_email_that_only_lowercases_into_someone_elses_is_refused(
    sso_app: Starlette, oidc: OidcProvider
) -> None:
    """Red team (issue 18): "\u212aate@…" (KELVIN SIGN) is another mailbox to the provider, but
    Python's lower() makes it "kate@…": it must not sign in as the account of kate@…, nor
    may a two-@ address pass for one at the last domain."""
    victim, attacker = Browser(sso_app), Browser(sso_app)
    try:
        await victim.sign_up("kate@lookalike.test")
        for email in ("\u212aate@lookalike.test", "kate@evil.test@lookalike.test"):
            oidc.user = {"sub": "u-kelvin", "email": email, "email_verified": True}
            r = await _sso_sign_in(attacker)
            assert r.status_code == 400 and "verified email" in r.text, (email, r.text)
            assert (await attacker.get("/console/dashboard")).status_code == 303
        oidc.user = {"sub": "u-kate", "email": "Kate@LookAlike.test", "email_verified": True}
        assert (await _sso_sign_in(attacker)).status_code == 303  # case alone is the same person
    finally:
        await victim.aclose()
        await attacker.aclose()


async def test_an_unverified_password_account_is_not_handed_over_by_sso(
    engine: EngineProcess, oidc: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Red team (issue 18), account pre-hijacking: someone signs up with another person's
    email and a password of their own (never verified). When the real person later signs in
    through SSO, which verifies the email, the stranger's password must not start working."""
    provider = {"id": "local", "name": "Local IdP", "issuer": oidc.issuer, "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET}
    app = create_app(console_settings(tmp_path_factory.mktemp("sso-prehijack"), engine.base_url, sso=[provider],
                                      verify_email=True))
    async with app.router.lifespan_context(app):
        attacker, victim = Browser(app), Browser(app)
        try:
            chosen = "attacker chose this"
            r = await attacker.post("/console/signup", {"email": "ann@prehijack.test", "password": chosen,
                                                        "password_confirm": chosen}, token_from="/console/signup")
            assert r.status_code == 303
            assert (await attacker.sign_in("ann@prehijack.test", "attacker chose this")).status_code == 403
            oidc.user = {"sub": "u-ann", "email": "ann@prehijack.test", "email_verified": True}
            assert (await _sso_sign_in(victim)).status_code == 303
            assert (await victim.get("/console/dashboard")).status_code == 200
            r = await attacker.sign_in("ann@prehijack.test", "attacker chose this")
            assert r.status_code == 400 and "Wrong email or password" in r.text
            assert (await attacker.get("/console/dashboard")).status_code == 303
        finally:
            await attacker.aclose()
            await victim.aclose()
