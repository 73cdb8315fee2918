"""Organizations: a person in several switches between them; members, roles, the last owner;
a removed member is signed out at once and the keys they made stay with the organization."""

from __future__ import annotations

from starlette.applications import Starlette

from mesh.accounts.members import Members
from mesh.accounts.roles import Role
from mesh.console.users import Users

from .conftest import Browser, account_of, api, create_key, grant


async def _join(app: Starlette, org: str, b: Browser, role: Role, switch: bool = True) -> str:
    db = app.state.gateway.services.database
    user = await Users(db).by_email(b.email)
    assert user is not None
    assert await Members(db).add(org, user.id, role)
    if switch:
        r = await b.post("/console/organizations/switch", {"account_id": org})
        assert r.status_code == 303 and r.headers["location"] == "/console/dashboard", r.text
    return user.id


async def _person(app: Starlette) -> Browser:
    b = Browser(app)
    await b.sign_up()
    return b


async def test_a_person_switches_between_organizations(console_app: Starlette) -> None:
    alice, bob = await _person(console_app), await _person(console_app)
    try:
        home = await account_of(bob)
        await create_key(bob, "bob's own key")
        org = await account_of(alice)
        await create_key(alice, "team key")
        await _join(console_app, org, bob, "developer")
        assert await account_of(bob) == org
        keys = (await bob.get("/console/keys")).text
        assert "team key" in keys and "bob&#39;s own key" not in keys and "bob's own key" not in keys
        listing = (await bob.get("/console/organizations")).text
        assert home in listing and org in listing
        r = await bob.post("/console/organizations/switch", {"account_id": home})
        assert r.status_code == 303
        assert await account_of(bob) == home
        assert "team key" not in (await bob.get("/console/keys")).text
        # A later sign-in opens where the person worked last.
        again = Browser(console_app)
        await again.sign_in(bob.email)
        assert await account_of(again) == home
        await again.aclose()
    finally:
        await alice.aclose()
        await bob.aclose()


async def test_switching_to_an_organization_one_is_not_in_is_404(console_app: Starlette) -> None:
    alice, mallory = await _person(console_app), await _person(console_app)
    try:
        org = await account_of(alice)
        r = await mallory.post("/console/organizations/switch", {"account_id": org})
        assert r.status_code == 404
        assert await account_of(mallory) != org
    finally:
        await alice.aclose()
        await mallory.aclose()


async def test_a_new_organization_starts_empty_with_its_creator_as_owner(console_app: Starlette) -> None:
    alice = await _person(console_app)
    try:
        first = await account_of(alice)
        await grant(console_app, first, "3")
        r = await alice.post("/console/organizations", {"name": "Side project"})
        assert r.status_code == 303
        second = await account_of(alice)
        assert second != first
        assert (await console_app.state.gateway.services.ledger.balance(second))[0] == 0
        assert "owner" in (await alice.get("/console/members")).text
        bad = await alice.post("/console/organizations", {"name": " "})
        assert bad.status_code == 303 and await account_of(alice) == second
    finally:
        await alice.aclose()


async def test_the_last_owner_cannot_leave_be_demoted_or_removed(console_app: Starlette) -> None:
    alice, bob = await _person(console_app), await _person(console_app)
    try:
        org = await account_of(alice)
        db = console_app.state.gateway.services.database
        alice_id = (await Users(db).by_email(alice.email)).id  # type: ignore[union-attr]
        await _join(console_app, org, bob, "admin")
        r = await alice.post("/console/organizations/leave")
        assert r.status_code == 303 and r.headers["location"] == "/console/organizations"
        r = await alice.post(f"/console/members/{alice_id}/role", {"role": "admin"})
        assert r.status_code == 303
        assert (await Members(db).get(org, alice_id)).role == "owner"  # type: ignore[union-attr]
        # An admin touches no owner.
        assert (await bob.post(f"/console/members/{alice_id}/remove")).status_code == 403
        assert (await bob.post(f"/console/members/{alice_id}/role", {"role": "viewer"})).status_code == 403
        bob_id = (await Users(db).by_email(bob.email)).id  # type: ignore[union-attr]
        assert (await bob.post(f"/console/members/{bob_id}/role", {"role": "owner"})).status_code == 403
        # With a second owner, the first may go.
        assert (await alice.post(f"/console/members/{bob_id}/role", {"role": "owner"})).status_code == 303
        r = await alice.post("/console/organizations/leave")
        assert r.headers["location"] == "/console/signin"
        assert await Members(db).get(org, alice_id) is None
    finally:
        await alice.aclose()
        await bob.aclose()


async def test_a_removed_member_is_signed_out_at_once_and_their_keys_stay(console_app: Starlette) -> None:
    owner, dev = await _person(console_app), await _person(console_app)
    try:
        org = await account_of(owner)
        await grant(console_app, org, "5")
        dev_id = await _join(console_app, org, dev, "developer")
        key_id, raw = await create_key(dev, "dev key")
        info = await console_app.state.gateway.services.accounts.get_key(key_id)
        assert info.created_by == dev_id and info.account_id == org
        listing = (await owner.get("/console/keys")).text
        assert f"by {dev.email}" in listing
        r = await owner.post(f"/console/members/{dev_id}/remove")
        assert r.status_code == 303
        page = await dev.get("/console/keys")
        assert page.status_code == 303 and page.headers["location"].startswith("/console/signin")
        async with api(console_app, raw) as client:
            reply = await client.post("/v1/chat/completions", json={
                "model": "test-model", "messages": [{"role": "user", "content": "still the org's key"}]})
            assert reply.status_code == 200
        assert "no longer a member" in (await owner.get("/console/keys")).text
    finally:
        await owner.aclose()
        await dev.aclose()


async def test_a_developer_revokes_their_own_key_but_not_others(console_app: Starlette) -> None:
    owner, dev = await _person(console_app), await _person(console_app)
    try:
        org = await account_of(owner)
        theirs, _ = await create_key(owner, "owner key")
        await _join(console_app, org, dev, "developer")
        mine, _ = await create_key(dev, "dev key")
        assert (await dev.post(f"/console/keys/{theirs}/revoke")).status_code == 403
        assert (await dev.post(f"/console/keys/{mine}/revoke")).status_code == 303
        accounts = console_app.state.gateway.services.accounts
        assert (await accounts.get_key(mine)).revoked_at is not None
        assert (await accounts.get_key(theirs)).revoked_at is None
    finally:
        await owner.aclose()
        await dev.aclose()


async def test_an_owner_deletes_an_organization_without_credit(console_app: Starlette) -> None:
    owner, dev = await _person(console_app), await _person(console_app)
    try:
        org = await account_of(owner)
        await _join(console_app, org, dev, "developer")
        _, raw = await create_key(dev, "doomed")
        assert (await dev.post("/console/organizations/delete", {"confirm": org})).status_code == 403
        await grant(console_app, org, "1")
        r = await owner.post("/console/organizations/delete", {"confirm": org})
        assert r.status_code == 303 and r.headers["location"] == "/console/organizations"
        assert await Members(console_app.state.gateway.services.database).get(org, (await Users(
            console_app.state.gateway.services.database).by_email(dev.email)).id) is not None  # type: ignore[union-attr]
        ledger = console_app.state.gateway.services.ledger
        await ledger.grant(org, -(await ledger.balance(org))[0], kind="adjustment")
        assert (await owner.post("/console/organizations/delete", {"confirm": "wrong"})).status_code == 303
        r = await owner.post("/console/organizations/delete", {"confirm": org})
        assert r.status_code == 303 and r.headers["location"] == "/console/signin"
        assert (await dev.get("/console/dashboard")).status_code == 303  # signed out of it
        async with api(console_app, raw) as client:
            reply = await client.get("/v1/models")
            assert reply.status_code == 401
    finally:
        await owner.aclose()
        await dev.aclose()
