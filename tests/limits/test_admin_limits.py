"""Setting rate limits through the admin API (over ASGI, on real databases)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from mesh.admin.routes import admin_routes
from mesh.billing.services import Services, open_services
from mesh.config import LimitsConfig, RateLimitConfig, Settings

ADMIN_KEY = "adm-" + "y" * 28
NONE = {"rpm": None, "tpm": None, "concurrent": None}


@pytest.fixture
async def services(database_url: str) -> AsyncIterator[Services]:
    settings = Settings(
        database=database_url, admin_key=ADMIN_KEY, limits=LimitsConfig(key=RateLimitConfig(rpm=100))
    )
    svc = await open_services(settings, background=False)
    try:
        yield svc
    finally:
        await svc.aclose()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=Starlette(routes=admin_routes(services)))
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://mesh.test", headers=headers) as c:
        yield c


async def test_key_limits_on_creation_and_patch(client: httpx.AsyncClient, services: Services) -> None:
    acct = (await client.post("/admin/v1/accounts", json={"name": "a"})).json()
    assert acct["rate_limits"] == NONE
    r = await client.post(f"/admin/v1/accounts/{acct['id']}/keys", json={"rate_limits": {"rpm": 5, "tpm": None}})
    assert r.status_code == 201, r.text
    key = r.json()
    assert key["rate_limits"] == {**NONE, "rpm": 5}
    principal = await services.authenticator.authenticate(key["key"])
    assert principal.limits[0].limits.rpm == 5
    r = await client.patch(f"/admin/v1/keys/{key['id']}", json={"rate_limits": {"tpm": 1000, "concurrent": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["rate_limits"] == {"rpm": 5, "tpm": 1000, "concurrent": 0}
    (scope,) = (await services.authenticator.authenticate(key["key"])).limits  # the cache was dropped
    assert (scope.limits.rpm, scope.limits.tpm, scope.limits.concurrent) == (5, 1000, None)
    r = await client.patch(f"/admin/v1/keys/{key['id']}", json={"rate_limits": None})
    assert r.json()["rate_limits"] == NONE
    (scope,) = (await services.authenticator.authenticate(key["key"])).limits
    assert scope.limits.rpm == 100  # the configured default again


async def test_account_limits_patch(client: httpx.AsyncClient, services: Services) -> None:
    acct = (await client.post("/admin/v1/accounts", json={"name": "b"})).json()
    key = (await client.post(f"/admin/v1/accounts/{acct['id']}/keys", json={})).json()
    assert len((await services.authenticator.authenticate(key["key"])).limits) == 1
    r = await client.patch(f"/admin/v1/accounts/{acct['id']}", json={"rate_limits": {"concurrent": 3}})
    assert r.status_code == 200, r.text
    assert r.json()["rate_limits"] == {**NONE, "concurrent": 3}
    assert (await client.get(f"/admin/v1/accounts/{acct['id']}")).json()["rate_limits"]["concurrent"] == 3
    scopes = (await services.authenticator.authenticate(key["key"])).limits
    assert [s.kind for s in scopes] == ["key", "account"]
    listed = (await client.get(f"/admin/v1/accounts/{acct['id']}/keys")).json()["data"]
    assert listed[0]["rate_limits"] == NONE


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"rate_limits": {"rpm": -1}},
        {"rate_limits": {"rpm": "5"}},
        {"rate_limits": {"rpm": True}},
        {"rate_limits": {"rpm": 1.5}},
        {"rate_limits": {"rph": 5}},
        {"rate_limits": {"rpm": 5}, "name": "x"},
        {"rate_limits": 5},
    ],
)
async def test_bad_limit_bodies_are_400(client: httpx.AsyncClient, body: dict[str, object]) -> None:
    acct = (await client.post("/admin/v1/accounts", json={"name": "c"})).json()
    r = await client.patch(f"/admin/v1/accounts/{acct['id']}", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_targets_are_404(client: httpx.AsyncClient) -> None:
    r = await client.patch("/admin/v1/accounts/acct_nope", json={"rate_limits": {"rpm": 1}})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "account_not_found")
    r = await client.patch("/admin/v1/keys/key_nope", json={"rate_limits": {"rpm": 1}})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "key_not_found")
