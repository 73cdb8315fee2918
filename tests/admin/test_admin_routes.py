"""The admin API and the customer billing routes, over ASGI with real databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from mesh.accounts.principal import Principal
from mesh.admin.routes import admin_routes
from mesh.billing.routes import customer_routes
from mesh.billing.services import Services, open_services
from mesh.canonical import Usage
from mesh.config import Pricing, Settings
from mesh.errors import AuthenticationFailed

ADMIN_KEY = "adm-" + "x" * 28
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PRICING = Pricing(input=Decimal("1"), output=Decimal("2"))


def _app(services: Services) -> Starlette:
    async def authenticate(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            raise AuthenticationFailed("Missing API key")
        return await services.authenticator.authenticate(token.strip())

    return Starlette(routes=[*admin_routes(services), *customer_routes(services, authenticate)])


@pytest.fixture
async def services(database_url: str) -> AsyncIterator[Services]:
    svc = await open_services(Settings(database=database_url, admin_key=ADMIN_KEY), background=False)
    try:
        yield svc
    finally:
        await svc.aclose()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://mesh.test", headers=ADMIN) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


async def test_admin_requires_the_admin_key(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/admin/v1/accounts", headers={"Authorization": ""}), 401, "invalid_admin_key")
    r = await client.get("/admin/v1/accounts", headers={"Authorization": "Bearer wrong"})
    assert_error(r, 401)
    assert r.json()["error"]["type"] == "authentication_error"
    assert_error(await client.post("/admin/v1/accounts", json={"name": "x"}, headers={"Authorization": "Basic x"}), 401)


async def test_routes_find_services_per_request(services: Services) -> None:
    app = Starlette(routes=admin_routes(lambda request: services))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mesh.test") as c:
        r = await c.post("/admin/v1/accounts", json={"name": "lazy"}, headers=ADMIN)
    assert r.status_code == 201


async def test_admin_disabled_without_configured_key(database_url: str) -> None:
    svc = await open_services(Settings(database=database_url), background=False)
    try:
        transport = httpx.ASGITransport(app=_app(svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://mesh.test") as c:
            r = await c.get("/admin/v1/accounts", headers={"Authorization": "Bearer "})
            assert_error(r, 403, "admin_api_disabled")
    finally:
        await svc.aclose()


async def test_accounts_and_credits(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/v1/accounts", json={"name": "Acme"})
    assert r.status_code == 201
    account = r.json()
    assert account["id"].startswith("acct_") and account["balance"] == "0.000000"
    acct = account["id"]

    r = await client.post(f"/admin/v1/accounts/{acct}/credits", json={"amount": "12.5", "idempotency_key": "p1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["balance"] == "12.500000" and body["entry"]["amount"] == "12.500000"
    again = await client.post(f"/admin/v1/accounts/{acct}/credits", json={"amount": "12.5", "idempotency_key": "p1"})
    assert again.json()["entry"]["id"] == body["entry"]["id"] and again.json()["balance"] == "12.500000"

    r = await client.post(f"/admin/v1/accounts/{acct}/credits", content=b'{"amount": 0.1}')
    assert r.json()["balance"] == "12.600000"  # a JSON number is read exactly, never as a float
    r = await client.post(
        f"/admin/v1/accounts/{acct}/credits", json={"amount": "-0.6", "kind": "adjustment", "memo": "fix"}
    )
    assert r.json()["balance"] == "12.000000" and r.json()["entry"]["kind"] == "adjustment"

    r = await client.get(f"/admin/v1/accounts/{acct}")
    assert r.json() | {"created_at": None} == {
        "id": acct,
        "object": "account",
        "name": "Acme",
        "balance": "12.000000",
        "held": "0.000000",
        "available": "12.000000",
        "rate_limits": {"rpm": None, "tpm": None, "concurrent": None},
        "created_at": None,
    }
    listed = (await client.get("/admin/v1/accounts")).json()["data"]
    assert [a["id"] for a in listed] == [acct]
    ledger = (await client.get(f"/admin/v1/accounts/{acct}/ledger")).json()["data"]
    assert [e["amount"] for e in ledger] == ["-0.600000", "0.100000", "12.500000"]


async def test_the_ledger_listing_pages_by_cursor_through_every_row(client: httpx.AsyncClient) -> None:
    acct = (await client.post("/admin/v1/accounts", json={"name": "paged"})).json()["id"]
    other = (await client.post("/admin/v1/accounts", json={"name": "other"})).json()["id"]
    for i in range(7):
        await client.post(f"/admin/v1/accounts/{acct}/credits", json={"amount": str(i + 1)})
        await client.post(f"/admin/v1/accounts/{other}/credits", json={"amount": "100"})
    url = f"/admin/v1/accounts/{acct}/ledger"
    seen: list[str] = []
    params: dict[str, object] = {"limit": 3}
    pages = 0
    while True:
        body = (await client.get(url, params=params)).json()
        pages += 1
        assert len(body["data"]) <= 3
        assert {e["account_id"] for e in body["data"]} <= {acct}  # another account's rows never show
        if body["data"]:
            assert (body["first_id"], body["last_id"]) == (body["data"][0]["id"], body["data"][-1]["id"])
        seen += [e["amount"] for e in body["data"]]
        if not body["has_more"]:
            break
        params["after"] = body["last_id"]
    assert pages == 3  # 3 + 3 + 1
    assert seen == [f"{i}.000000" for i in range(7, 0, -1)]  # newest first, each row once
    # A row written while paging does not shift the pages still to come.
    first = (await client.get(url, params={"limit": 2})).json()
    await client.post(f"/admin/v1/accounts/{acct}/credits", json={"amount": "50"})
    second = (await client.get(url, params={"limit": 2, "after": first["last_id"]})).json()
    assert [e["amount"] for e in second["data"]] == ["5.000000", "4.000000"]
    past = (await client.get(url, params={"after": 1})).json()
    assert past == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    assert_error(await client.get(url, params={"after": "abc"}), 400, param="after")
    assert_error(await client.get(url, params={"after": "-5"}), 400, param="after")
    assert_error(await client.get(url, params={"limit": 0}), 400, param="limit")


async def test_admin_bad_input_is_400_never_500(client: httpx.AsyncClient) -> None:
    acct = (await client.post("/admin/v1/accounts", json={"name": "a"})).json()["id"]
    url = f"/admin/v1/accounts/{acct}/credits"
    assert_error(await client.post(url, json={"amount": "1.0000001"}), 400, param="amount")
    assert_error(await client.post(url, json={"amount": "-1"}), 400, param="amount")
    assert_error(await client.post(url, json={"amount": "ten"}), 400, param="amount")
    assert_error(await client.post(url, json={"amount": "1", "kind": "usage"}), 400, param="kind")
    assert_error(await client.post(url, json={"amount": "1", "bogus": 1}), 400, param="bogus")
    assert_error(await client.post(url, content=b"{not json"), 400)
    assert_error(await client.post(url, content=b"[1]"), 400)
    assert_error(await client.post("/admin/v1/accounts", json={"name": ""}), 400, param="name")
    assert_error(
        await client.post("/admin/v1/accounts/acct_nope/credits", json={"amount": "1"}), 404, "account_not_found"
    )
    assert_error(await client.get("/admin/v1/accounts/acct_nope"), 404)
    assert_error(await client.get("/admin/v1/accounts?limit=zero"), 400, param="limit")
    assert_error(await client.delete("/admin/v1/keys/key_nope"), 404, "key_not_found")
    assert_error(
        await client.post(f"/admin/v1/accounts/{acct}/keys", json={"expires_at": "2030-01-01T00:00"}),
        400,
        param="expires_at",
    )


async def test_keys_create_list_revoke(client: httpx.AsyncClient) -> None:
    acct = (await client.post("/admin/v1/accounts", json={"name": "a"})).json()["id"]
    r = await client.post(
        f"/admin/v1/accounts/{acct}/keys",
        json={"name": "ci", "allowed_models": ["m"], "expires_at": "2099-01-01T00:00:00Z", "spend_limit": "1.5"},
    )
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("sk-mesh-") and created["prefix"] == key[:12]
    assert created["spend_limit"] == "1.500000" and created["allowed_models"] == ["m"]
    listed = (await client.get(f"/admin/v1/accounts/{acct}/keys")).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    assert key not in (await client.get(f"/admin/v1/accounts/{acct}/keys")).text

    assert (await client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})).status_code == 200
    r = await client.delete(f"/admin/v1/keys/{created['id']}")
    assert r.status_code == 200 and r.json()["revoked"] is True
    r = await client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert_error(r, 401)
    assert r.json()["error"]["message"] == "API key revoked"


async def test_usage_and_redeem(client: httpx.AsyncClient, services: Services) -> None:
    acct = (await client.post("/admin/v1/accounts", json={"name": "a"})).json()["id"]
    other = (await client.post("/admin/v1/accounts", json={"name": "b"})).json()["id"]
    key = (await client.post(f"/admin/v1/accounts/{acct}/keys", json={})).json()["key"]
    other_key = (await client.post(f"/admin/v1/accounts/{other}/keys", json={})).json()["key"]
    await client.post(f"/admin/v1/accounts/{acct}/credits", json={"amount": "1"})
    await client.post(f"/admin/v1/accounts/{other}/credits", json={"amount": "1"})

    for k in (key, other_key):
        p = await services.authenticator.authenticate(k)
        adm = await services.ledger.admit(p, PRICING, f"req_{p.key_id}", 10, 10)
        await services.ledger.settle(
            adm, Usage(input_tokens=10, output_tokens=5), status="ok", model="m", pricing=PRICING
        )
    await services.usage.flush()

    r = await client.get(f"/admin/v1/usage?account_id={acct}&days=7")
    (row,) = r.json()["data"]
    assert row["account_id"] == acct and row["cost"] == "0.000020" and row["requests"] == 1
    assert len((await client.get("/admin/v1/usage")).json()["data"]) == 2

    mine = await client.get("/v1/usage?days=30", headers={"Authorization": f"Bearer {key}"})
    assert mine.status_code == 200
    assert [(d["model"], d["cost"]) for d in mine.json()["data"]] == [("m", "0.000020")]
    assert "account_id" not in mine.json()["data"][0] and mine.json()["account_id"] == acct

    r = await client.post("/admin/v1/redeem-codes", json={"amount": "2.5", "count": 2})
    assert r.status_code == 201
    codes = r.json()["codes"]
    assert len(codes) == 2 and r.json()["amount"] == "2.500000"
    customer = {"Authorization": f"Bearer {key}"}
    r = await client.post("/v1/redeem", json={"code": codes[0]}, headers=customer)
    assert r.status_code == 200, r.text
    assert r.json()["credited"] == "2.500000" and r.json()["balance"] == "3.499980"
    r = await client.post("/v1/redeem", json={"code": codes[0]}, headers=customer)
    assert_error(r, 400, "invalid_redeem_code", "code")
    assert_error(await client.post("/v1/redeem", json={"code": codes[1]}, headers={"Authorization": ""}), 401)
