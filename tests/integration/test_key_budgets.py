"""Key budgets that reset, and a key's own status, through real gateway processes on
SQLite and PostgreSQL.

A daily budget must stop its key exactly at the budget however many streams race for it,
leave the account's balance alone when it refuses, and admit again once the period has
rolled over: a second gateway on the same database runs "tomorrow"
(``MESH_CLOCK_OFFSET_SECONDS``, the budgets' test clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

from .test_billing_e2e import ledger_sum, settled

DAY = 86_400


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def budgeted(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin, dict[str, Any], Path]]:
    work = tmp_path_factory.mktemp(f"budgets-{request.param}")
    with temporary_database(request, request.param, work) as url:
        config = {
            "database": url,
            "models": engine_models(engine.base_url),
            "billing": {"usage_flush_interval": 0.05},
        }
        with GatewayProcess(config, work) as gw:
            admin = Admin(gw.url)
            try:
                yield gw, admin, config, work
            finally:
                admin.close()


async def _race(base_url: str, key: str, n: int) -> list[Decimal | tuple[int, str, dict[str, str]]]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120) as client:

        async def one(i: int) -> Decimal | tuple[int, str, dict[str, str]]:
            try:
                stream = await client.chat.completions.create(
                    model="test-model", messages=[{"role": "user", "content": f"budget {i}"}], max_tokens=10,
                    stream=True, stream_options={"include_usage": True},
                )
                usage = None
                async for chunk in stream:
                    usage = chunk.usage or usage
                assert usage is not None
                return Decimal((usage.model_extra or {})["cost"])
            except openai.APIStatusError as err:
                body = err.body if isinstance(err.body, dict) else {}
                return err.status_code, str(body.get("code")), dict(err.response.headers)

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def _key_row(admin: Admin, account: str, key_id: str) -> dict[str, Any]:
    r = admin.client.get(f"/admin/v1/accounts/{account}/keys")
    r.raise_for_status()
    row: dict[str, Any] = next(k for k in r.json()["data"] if k["id"] == key_id)
    return row


def _status(gw: GatewayProcess, key: str, *, anthropic_style: bool = False) -> dict[str, Any]:
    headers = {"x-api-key": key} if anthropic_style else {"Authorization": f"Bearer {key}"}
    r = httpx.get(gw.base_url + "/key", headers=headers)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_daily_budget_stops_exactly_under_100_streams_and_resets_next_day(
    budgeted: tuple[GatewayProcess, Admin, dict[str, Any], Path],
) -> None:
    gw, admin, config, work = budgeted
    start = Decimal("1")
    limit = Decimal("0.000600")  # about a dozen of these requests
    account = admin.account("budget-race", credits=str(start))
    created = admin.key(account)
    # Set through PATCH, as an operator changes an existing key.
    patch = {"spend_limit": str(limit), "budget_period": "daily"}
    r = admin.client.patch(f"/admin/v1/keys/{created['id']}", json=patch)
    assert r.status_code == 200, r.text
    assert r.json()["budget_period"] == "daily" and Decimal(r.json()["spend_limit"]) == limit

    outcomes = asyncio.run(_race(gw.base_url, created["key"], 100))
    ok = [o for o in outcomes if isinstance(o, Decimal)]
    refused = [o for o in outcomes if isinstance(o, tuple)]
    assert len(ok) + len(refused) == 100
    assert 0 < len(ok) < 100, len(ok)
    assert {(status, code) for status, code, _ in refused} == {(402, "key_budget_exceeded")}
    assert all("x-mesh-budget-remaining" in headers for _, _, headers in refused)

    acct = settled(admin, account)
    spent = sum(ok, Decimal(0))
    assert spent <= limit
    assert Decimal(acct["held"]) == 0
    assert Decimal(acct["balance"]) == start - spent  # refusals took nothing from the account
    assert ledger_sum(admin, account) == Decimal(acct["balance"])
    row = _key_row(admin, account, created["id"])
    assert Decimal(row["spent"]) == spent and Decimal(row["held"]) == 0

    # Exactly at the budget: what is left cannot pay for one more such request.
    with openai.OpenAI(base_url=gw.base_url, api_key=created["key"], max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "one more"}])
    assert exc.value.status_code == 402
    assert "budget" in exc.value.message and "daily" in exc.value.message
    assert Decimal(exc.value.response.headers["x-mesh-budget-remaining"]) == limit - spent
    assert Decimal(admin.balance(account)["balance"]) == start - spent

    # The key's own status holds the ledger's numbers, with either header style.
    for style in (False, True):
        status = _status(gw, created["key"], anthropic_style=style)
        budget = status["budget"]
        assert budget["period"] == "daily"
        assert Decimal(budget["limit"]) == limit and Decimal(budget["spent"]) == spent
        assert Decimal(budget["remaining"]) == limit - spent
        tomorrow = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        assert datetime.fromisoformat(budget["resets_at"]) == tomorrow
        assert Decimal(status["balance"]) == start - spent and status["models"] is None

    # Tomorrow, on another gateway of the same database: the budget admits again.
    with GatewayProcess(config, work, env={"MESH_CLOCK_OFFSET_SECONDS": str(DAY)}) as later:
        with openai.OpenAI(base_url=later.base_url, api_key=created["key"], max_retries=0) as client:
            done = client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "a new day"}], max_tokens=10
            )
        cost = Decimal(((done.usage and done.usage.model_extra) or {})["cost"])
        assert cost > 0
        settled(admin, account)
        status = _status(later, created["key"])
        assert Decimal(status["budget"]["spent"]) == cost
        assert Decimal(status["budget"]["remaining"]) == limit - cost
        assert datetime.fromisoformat(status["budget"]["resets_at"]) == tomorrow + timedelta(days=1)
    assert Decimal(admin.balance(account)["balance"]) == start - spent - cost
    assert ledger_sum(admin, account) == start - spent - cost


def test_budget_changes_are_validated(budgeted: tuple[GatewayProcess, Admin, dict[str, Any], Path]) -> None:
    _, admin, _, _ = budgeted
    account = admin.account("budget-bad", credits="1")
    key = admin.key(account, spend_limit="5", budget_period="monthly", budget_reset_day=15)
    assert key["budget_period"] == "monthly" and key["budget_reset_day"] == 15
    assert datetime.fromisoformat(key["budget_resets_at"]).day == 15
    for body in (
        {"budget_period": "hourly"},
        {"budget_period": "weekly", "budget_reset_day": 7},
        {"budget_period": "daily", "budget_reset_day": 3},
        {"spend_limit": "-1"},
        {"budget_reset_day": "x"},
        {},
    ):
        r = admin.client.patch(f"/admin/v1/keys/{key['id']}", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = admin.client.patch(f"/admin/v1/keys/{key['id']}", json={"budget_period": "weekly", "budget_reset_day": 2})
    assert r.status_code == 200
    assert datetime.fromisoformat(r.json()["budget_resets_at"]).weekday() == 2
    assert admin.client.patch("/admin/v1/keys/key_nope", json={"spend_limit": "1"}).status_code == 404


def test_key_status_needs_a_valid_key(budgeted: tuple[GatewayProcess, Admin, dict[str, Any], Path]) -> None:
    gw, _, _, _ = budgeted
    assert httpx.get(gw.base_url + "/key").status_code == 401
    assert httpx.get(gw.base_url + "/key", headers={"Authorization": "Bearer mesh-nope"}).status_code == 401
