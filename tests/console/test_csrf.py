"""No POST works without the right CSRF token: 403, and nothing changes."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

from .conftest import PASSWORD, Browser, account_of, api, create_key, grant

CUSTOMER_POSTS = [
    ("/console/signout", {}),
    ("/console/settings/password", {"current_password": PASSWORD, "new_password": "x" * 12,
                                    "new_password_confirm": "x" * 12}),
    ("/console/billing/checkout", {"pack": "starter"}),
    ("/console/billing/redeem", {"code": "MESH-AAAA-BBBB-CCCC"}),
    ("/console/keys", {"name": "sneaky"}),
]


@pytest.mark.parametrize(("path", "form"), CUSTOMER_POSTS)
@pytest.mark.parametrize("token", [None, "", "forged-token"])
async def test_post_without_valid_csrf_is_refused(customer: Browser, path: str, form: dict[str, str],
                                                  token: str | None) -> None:
    data = dict(form)
    if token is not None:
        data["csrf_token"] = token
    r = await customer.client.post(path, data=data)
    assert r.status_code == 403
    assert "Form expired" in r.text
    assert (await customer.get("/console/dashboard")).status_code == 200  # still signed in
    keys = await customer.get("/console/keys")
    assert "sneaky" not in keys.text


async def test_revoke_without_csrf_keeps_the_key(console_app: Starlette, customer: Browser) -> None:
    key_id, raw = await create_key(customer, "keep me")
    r = await customer.client.post(f"/console/keys/{key_id}/revoke", data={})
    assert r.status_code == 403
    async with api(console_app, raw) as client:
        assert (await client.get("/v1/models")).status_code == 200


async def test_token_of_another_session_is_refused(console_app: Starlette, customer: Browser) -> None:
    other = Browser(console_app)
    try:
        await other.sign_up()
        foreign = await other.csrf("/console/keys")
        r = await customer.client.post("/console/keys", data={"name": "sneaky", "csrf_token": foreign})
        assert r.status_code == 403
    finally:
        await other.aclose()


async def test_playground_chat_needs_the_csrf_header(console_app: Starlette, customer: Browser) -> None:
    await grant(console_app, await account_of(customer), "1")
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
    r = await customer.client.post("/console/playground/chat", json=body)
    assert r.status_code == 403
    r = await customer.client.post("/console/playground/chat", json=body, headers={"X-CSRF-Token": "nope"})
    assert r.status_code == 403


async def test_checkout_pay_without_csrf_credits_nothing(console_app: Starlette, customer: Browser) -> None:
    r = await customer.post("/console/billing/checkout", {"pack": "starter"}, token_from="/console/billing")
    checkout = r.headers["location"]
    assert (await customer.client.post(checkout + "/pay", data={})).status_code == 403
    services = console_app.state.gateway.services
    assert (await services.ledger.balance(await account_of(customer)))[0] == 0


async def test_signed_out_forms_need_their_token(console_app: Starlette, customer: Browser) -> None:
    b = Browser(console_app, ip="10.9.0.1")
    try:
        await b.get("/console/signin")  # gets the mesh_csrf cookie, but the form's token is missing
        r = await b.client.post("/console/signin", data={"email": customer.email, "password": PASSWORD})
        assert r.status_code == 403
        r = await b.client.post("/console/signup", data={"email": "x@example.com", "password": PASSWORD,
                                                         "password_confirm": PASSWORD, "csrf_token": "0" * 64})
        assert r.status_code == 403
        assert "mesh_session" not in b.client.cookies
    finally:
        await b.aclose()


async def test_operator_posts_need_csrf(console_app: Starlette, operator: Browser, customer: Browser) -> None:
    account_id = await account_of(customer)
    r = await operator.client.post(f"/console/admin/accounts/{account_id}/grant", data={"amount": "100"})
    assert r.status_code == 403
    r = await operator.client.post("/console/admin/codes", data={"amount": "100", "count": "3"})
    assert r.status_code == 403
    assert (await console_app.state.gateway.services.ledger.balance(account_id))[0] == 0
