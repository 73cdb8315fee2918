"""Per end user caps on a key (``user_budget``) through a real gateway on SQLite and
PostgreSQL: each end user (the request's ``user``) of the key is stopped at the cap, however
many of its requests race, with 402 ``user_budget_exceeded``; other end users, requests
without a user and the account's balance are unaffected; lifting the cap admits again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

CAP = Decimal("0.0003")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def capped(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin]]:
    work = tmp_path_factory.mktemp(f"user-budgets-{request.param}")
    with temporary_database(request, request.param, work) as url:
        config = {"database": url, "models": engine_models(engine.base_url), "billing": {"usage_flush_interval": 0.05}}
        with GatewayProcess(config, work) as gw, Admin(gw.url) as admin:
            yield gw, admin


def _body(user: str | None, i: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "test-model", "messages": [{"role": "user", "content": f"cap {i}"}],
                            "max_tokens": 8}
    if user is not None:
        body["user"] = user
    return body


async def _race(gw: GatewayProcess, key: str, user: str | None, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=gw.base_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=60) as client:
        return list(await asyncio.gather(*(client.post("/chat/completions", json=_body(user, i)) for i in range(n))))


def _spent_by_user(gw: GatewayProcess, key: str) -> dict[str | None, Decimal]:
    r = httpx.get(gw.base_url + "/usage", params={"group_by": "user"}, headers={"Authorization": f"Bearer {key}"})
    r.raise_for_status()
    return {d["value"]: Decimal(d["cost"]) for d in r.json()["data"]}


def test_each_end_user_is_stopped_at_the_cap_under_concurrency(capped: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = capped
    account = admin.account("capped", credits="1")
    created = admin.key(account, user_budget=str(CAP))
    assert created["user_budget"] == "0.000300"
    key = created["key"]

    answers = asyncio.run(_race(gw, key, "alice", 40))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 402} and 200 in codes and 402 in codes, codes
    refused = [r.json()["error"] for r in answers if r.status_code == 402]
    assert all(e["code"] == "user_budget_exceeded" for e in refused), refused
    assert all(r.headers.get("x-mesh-user-budget-remaining") for r in answers if r.status_code == 402)
    # Bob has his own cap; requests without a user are not capped; the balance pays for all.
    assert all(r.status_code == 200 for r in asyncio.run(_race(gw, key, "bob", 3)))
    assert all(r.status_code == 200 for r in asyncio.run(_race(gw, key, None, 3)))
    gw.admin_call("POST", "/admin/v1/flush")
    deadline = time.monotonic() + 10
    while True:  # usage rows are written in batches
        spent = _spent_by_user(gw, key)
        total = sum(spent.values(), Decimal(0))
        if total == Decimal(1) - Decimal(admin.balance(account)["balance"]) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert Decimal(0) < spent["alice"] <= CAP
    assert spent["alice"] > CAP / 2  # stopped at the cap, not long before it
    assert spent["bob"] > 0 and spent[None] > 0
    assert total == Decimal(1) - Decimal(admin.balance(account)["balance"])

    # Lifting the cap admits alice again; setting one again starts counting from what she spent.
    r = admin.client.patch(f"/admin/v1/keys/{created['id']}", json={"user_budget": None})
    r.raise_for_status()
    assert r.json()["user_budget"] is None
    time.sleep(0.1)
    assert asyncio.run(_race(gw, key, "alice", 1))[0].status_code == 200
    # The key's own status shows the cap.
    r = httpx.get(gw.base_url + "/key", headers={"Authorization": f"Bearer {key}"})
    assert r.json()["budget"]["user_budget"] is None
