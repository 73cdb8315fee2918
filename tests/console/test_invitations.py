"""Invitations: a link that works once, for one email, until it expires or is revoked;
accepted by signing up through it or by an existing, signed-in person. And the audit log
that records it all, in the console and through the admin API."""

from __future__ import annotations

import csv
import io
import re
from datetime import timedelta

import pytest
from sqlalchemy import update
from starlette.applications import Starlette

from mesh.app import create_app
from mesh.console.tables import invitations
from mesh.store import utcnow
from support.gateway import ADMIN_KEY
from testengine.harness import EngineProcess

from .conftest import PASSWORD, Browser, Mailbox, account_of, api, console_settings, create_key


async def _invite(owner: Browser, email: str, role: str) -> None:
    r = await owner.post("/console/members/invite", {"email": email, "role": role})
    assert r.status_code == 303 and r.headers["location"] == "/console/members", r.text


async def test_signing_up_through_the_link_joins_once(console_app: Starlette, mailbox: Mailbox) -> None:
    owner, newcomer, again = Browser(console_app), Browser(console_app), Browser(console_app)
    try:
        await owner.sign_up()
        org = await account_of(owner)
        email = f"dev-{org[-6:]}@example.com"
        await _invite(owner, email, "developer")
        assert email in (await owner.get("/console/members")).text
        link = mailbox.link_for(email)
        page = await newcomer.get(link)
        assert page.status_code == 200 and "developer" in page.text
        r = await newcomer.post(link, {"password": PASSWORD, "password_confirm": PASSWORD}, token_from=link)
        assert r.status_code == 303 and r.headers["location"] == "/console/dashboard", r.text
        assert await account_of(newcomer) == org
        _, raw = await create_key(newcomer, "through the invitation")
        async with api(console_app, raw) as client:
            models = await client.get("/v1/models")
            assert models.status_code == 200
        # The link is spent.
        assert (await again.get(link)).status_code == 404
        r = await again.post(link, {"password": PASSWORD, "password_confirm": PASSWORD}, token_from="/console/signin")
        assert r.status_code == 404
        # The newcomer has no organization of their own, only the one they joined.
        listing = (await newcomer.get("/console/organizations")).text
        assert listing.count("data-account-id=") == 1
        audit = (await owner.get("/console/audit")).text
        for action in ("member.invited", "member.joined", "key.created"):
            assert f'data-action="{action}"' in audit
    finally:
        for b in (owner, newcomer, again):
            await b.aclose()


async def test_an_existing_person_accepts_signed_in_with_the_invited_email(
    console_app: Starlette, mailbox: Mailbox
) -> None:
    owner, member, other = Browser(console_app), Browser(console_app), Browser(console_app)
    try:
        await owner.sign_up()
        await member.sign_up()
        await other.sign_up()
        org = await account_of(owner)
        await _invite(owner, member.email, "viewer")
        link = mailbox.link_for(member.email)
        r = await other.post(link, {}, token_from=link)
        assert r.status_code == 403 and "This invitation is for" in r.text
        # Signed out, an existing email must sign in first.
        anon = Browser(console_app)
        r = await anon.post(link, {"password": PASSWORD, "password_confirm": PASSWORD}, token_from=link)
        assert r.status_code == 400 and "sign in first" in r.text
        await anon.aclose()
        r = await member.post(link, {}, token_from=link)
        assert r.status_code == 303
        assert await account_of(member) == org
        assert (await member.get("/console/keys")).status_code == 403  # a viewer
        assert (await member.get("/console/dashboard")).status_code == 200
    finally:
        for b in (owner, member, other):
            await b.aclose()


async def test_revoked_and_expired_invitations_open_nothing(console_app: Starlette, mailbox: Mailbox) -> None:
    owner, anon = Browser(console_app), Browser(console_app)
    try:
        await owner.sign_up()
        org = await account_of(owner)
        await _invite(owner, f"late-{org[-6:]}@example.com", "viewer")
        await _invite(owner, f"gone-{org[-6:]}@example.com", "viewer")
        late, gone = mailbox.link_for(f"late-{org[-6:]}@example.com"), mailbox.link_for(f"gone-{org[-6:]}@example.com")
        members = (await owner.get("/console/members")).text
        inv_id = re.search(rf'data-invitation="gone-{org[-6:]}@example.com">.*?invitations/(inv_[0-9a-f]+)/revoke',
                           members, re.S)
        assert inv_id
        assert (await owner.post(f"/console/members/invitations/{inv_id.group(1)}/revoke")).status_code == 303
        assert (await anon.get(gone)).status_code == 404
        db = console_app.state.gateway.services.database
        async with db.write() as conn:
            await conn.execute(update(invitations).where(invitations.c.account_id == org)
                               .values(expires_at=utcnow() - timedelta(seconds=1)))
        assert (await anon.get(late)).status_code == 404
        r = await anon.post(late, {"password": PASSWORD, "password_confirm": PASSWORD}, token_from="/console/signin")
        assert r.status_code == 404
        assert 'data-action="member.invitation_revoked"' in (await owner.get("/console/audit")).text
    finally:
        await owner.aclose()
        await anon.aclose()


async def test_only_owners_invite_owners(console_app: Starlette, mailbox: Mailbox) -> None:
    owner, admin = Browser(console_app), Browser(console_app)
    try:
        await owner.sign_up()
        await admin.sign_up()
        await _invite(owner, admin.email, "admin")
        link = mailbox.link_for(admin.email)
        assert (await admin.post(link, {}, token_from=link)).status_code == 303
        r = await admin.post("/console/members/invite", {"email": "boss@example.com", "role": "owner"})
        assert r.status_code == 403
        await _invite(admin, "dev@example.com", "developer")
    finally:
        await owner.aclose()
        await admin.aclose()


async def test_audit_csv_export_quotes_formulas(console_app: Starlette) -> None:
    owner = Browser(console_app)
    try:
        await owner.sign_up()
        await create_key(owner, "=HYPERLINK(\"http://evil\")")
        r = await owner.get("/console/audit.csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(r.text)))
        assert rows[0] == ["time", "actor", "ip", "request_id", "action", "target", "detail"]
        created = next(row for row in rows[1:] if row[4] == "key.created")
        assert created[1] == owner.email and created[3].startswith("req_") and created[2]
        assert not any(cell.startswith("=") for row in rows for cell in row)
    finally:
        await owner.aclose()


async def test_admin_api_actions_are_in_the_operator_log_and_the_organizations(console_app: Starlette) -> None:
    owner = Browser(console_app)
    try:
        await owner.sign_up()
        org = await account_of(owner)
        async with api(console_app, ADMIN_KEY) as admin:
            r = await admin.post(f"/admin/v1/accounts/{org}/credits", json={"amount": "2", "kind": "grant"})
            assert r.status_code == 200
            rid = r.headers["x-request-id"]
            log = (await admin.get("/admin/v1/audit-log")).json()["data"]
            mine = [e for e in log if e["request_id"] == rid]
            assert [e["action"] for e in mine] == ["admin.add_credits"] and mine[0]["account_id"] is None
            org_log = (await admin.get(f"/admin/v1/audit-log?account_id={org}")).json()["data"]
            assert org_log[0]["action"] == "credits.grant" and org_log[0]["request_id"] == rid
            assert org_log[0]["actor"] == "operator (admin key)"
        # The customer's audit page shows the grant too; a customer key cannot read the log.
        assert 'data-action="credits.grant"' in (await owner.get("/console/audit")).text
        _, raw = await create_key(owner)
        async with api(console_app, raw) as client:
            assert (await client.get("/admin/v1/audit-log")).status_code == 401
    finally:
        await owner.aclose()


async def test_invitations_are_throttled_per_person_and_address(
    engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory, mailbox: Mailbox
) -> None:
    """Red team (issue 18): anyone may sign up and own an organization, and its name goes
    into every invitation mail: without a limit the console mails any address, unboundedly,
    through the operator's SMTP."""
    app = create_app(console_settings(tmp_path_factory.mktemp("invite-flood"), engine.base_url,
                                      invitations_per_hour=3))
    async with app.router.lifespan_context(app):
        spammer, same_address, elsewhere = Browser(app), Browser(app), Browser(app, ip="10.9.8.7")
        try:
            for b in (spammer, same_address, elsewhere):
                await b.sign_up()
            for n in range(3):
                await _invite(spammer, f"target{n}@example.com", "viewer")
            r = await spammer.post("/console/members/invite", {"email": "target9@example.com", "role": "viewer"})
            assert r.status_code == 429 and "Too many invitations" in r.text
            assert not any("target9@example.com" in m for m in mailbox.mails)
            assert "target9@example.com" not in (await spammer.get("/console/members")).text
            # Another person from the same address shares its limit; another address does not.
            r = await same_address.post("/console/members/invite", {"email": "t@example.com", "role": "viewer"})
            assert r.status_code == 429
            await _invite(elsewhere, "colleague@example.com", "developer")
        finally:
            for b in (spammer, same_address, elsewhere):
                await b.aclose()
