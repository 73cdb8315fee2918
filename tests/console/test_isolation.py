"""A customer sees and touches only their own account: keys, usage, checkouts; operator
pages are for operators."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

from .conftest import Browser, account_of, api, create_key, grant

ADMIN_PAGES = ["/console/admin/accounts", "/console/admin/usage", "/console/admin/models",
               "/console/admin/workers", "/console/admin/codes"]


@pytest.fixture
async def victim(console_app: Starlette) -> Browser:
    b = Browser(console_app, ip="10.5.0.1")
    await b.sign_up()
    await grant(console_app, await account_of(b), "5")
    return b


async def test_customer_cannot_revoke_anothers_key(console_app: Starlette, customer: Browser,
                                                   victim: Browser) -> None:
    try:
        key_id, raw = await create_key(victim, "victim key")
        r = await customer.post(f"/console/keys/{key_id}/revoke", token_from="/console/keys")
        assert r.status_code == 404
        async with api(console_app, raw) as client:
            reply = await client.post("/v1/chat/completions", json={
                "model": "test-model", "messages": [{"role": "user", "content": "still mine"}]})
            assert reply.status_code == 200
        own = await victim.get("/console/keys")
        assert "victim key" in own.text and "revoked" not in own.text
    finally:
        await victim.aclose()


async def test_customer_sees_only_their_keys_and_usage(console_app: Starlette, customer: Browser,
                                                       victim: Browser) -> None:
    try:
        _, raw = await create_key(victim, "victim key")
        async with api(console_app, raw) as client:
            reply = await client.post("/v1/chat/completions", json={
                "model": "test-reasoner", "messages": [{"role": "user", "content": "private words"}]})
            assert reply.status_code == 200
        await console_app.state.gateway.flush_billing()
        assert "test-reasoner" in (await victim.get("/console/dashboard")).text
        keys = await customer.get("/console/keys")
        assert "victim key" not in keys.text and raw[:12] not in keys.text
        dashboard = await customer.get("/console/dashboard")
        assert "test-reasoner" not in dashboard.text and "victim key" not in dashboard.text
        assert "No usage yet" in dashboard.text
        # Query strings naming the other account change nothing.
        victim_account = await account_of(victim)
        page = await customer.get(f"/console/keys?account_id={victim_account}")
        assert "victim key" not in page.text and raw[:12] not in page.text
        page = await customer.get(f"/console/dashboard?account_id={victim_account}")
        assert "victim key" not in page.text and "test-reasoner" not in page.text
    finally:
        await victim.aclose()


async def test_customer_cannot_open_or_pay_anothers_checkout(console_app: Starlette, customer: Browser,
                                                             victim: Browser) -> None:
    try:
        r = await victim.post("/console/billing/checkout", {"pack": "starter"}, token_from="/console/billing")
        checkout = r.headers["location"]
        assert (await customer.get(checkout)).status_code == 404
        assert (await customer.post(checkout + "/pay", token_from="/console/billing")).status_code == 404
        balance, _ = await console_app.state.gateway.services.ledger.balance(await account_of(victim))
        assert balance == 5_000_000
    finally:
        await victim.aclose()


@pytest.mark.parametrize("path", ADMIN_PAGES)
async def test_operator_pages_are_403_for_customers(customer: Browser, path: str) -> None:
    r = await customer.get(path)
    assert r.status_code == 403
    assert "Operators only" in r.text


async def test_operator_posts_are_403_for_customers(console_app: Starlette, customer: Browser) -> None:
    account_id = await account_of(customer)
    r = await customer.post(f"/console/admin/accounts/{account_id}/grant", {"amount": "1000"})
    assert r.status_code == 403
    r = await customer.post("/console/admin/codes", {"amount": "1000", "count": "1"})
    assert r.status_code == 403
    assert (await console_app.state.gateway.services.ledger.balance(account_id))[0] == 0
    assert "Operator" not in (await customer.get("/console/dashboard")).text
