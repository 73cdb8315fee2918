"""Money through the real gateway, on SQLite and PostgreSQL: holds, settlement, 402s, races.

Every request here goes through a gateway process to the test engine; balances are read
back through the admin API. The invariant under any concurrency: a balance never goes
below zero, nothing stays held, and the ledger sums to the balance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.postgres import temporary_database
from testengine.harness import EngineProcess

MICRO = Decimal("0.000001")
PRICE_IN, PRICE_OUT = Decimal("1.0"), Decimal("2.0")  # credits per million tokens (tests/conftest.py)


# Every database with streamed Chat Completions on the relay path (the default) and on the
# canonical path (routing.relay: false): the money must come out the same on both.
@pytest.fixture(
    scope="module",
    params=[("sqlite", True), ("postgresql", True), ("sqlite", False), ("postgresql", False)],
    ids=["sqlite-relay", "postgresql-relay", "sqlite-canonical", "postgresql-canonical"],
)
def billed(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin]]:
    backend, relay = request.param
    work = tmp_path_factory.mktemp(f"billing-{backend}")
    with temporary_database(request, backend, work) as url:
        config = {
            "database": url,
            "models": engine_models(engine.base_url),
            "logging": {"level": "INFO"},
            "billing": {"usage_flush_interval": 0.05},
            "routing": {"relay": relay},
        }
        with GatewayProcess(config, work) as gw, Admin(gw.url) as admin:
            yield gw, admin


def credits(text: str) -> Decimal:
    return Decimal(text)


def cost_of(usage: Any) -> Decimal:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    # Credits per million tokens times tokens is micro-credits; rounded up once per request.
    micro = (usage.prompt_tokens - cached) * PRICE_IN + cached * Decimal("0.5") + usage.completion_tokens * PRICE_OUT
    return (micro.to_integral_value(rounding="ROUND_CEILING") * MICRO).quantize(MICRO)


def ledger_sum(admin: Admin, account: str) -> Decimal:
    return sum((Decimal(e["amount"]) for e in admin.ledger(account)), Decimal(0))


def settled(admin: Admin, account: str, timeout: float = 10.0) -> dict[str, Any]:
    """The account once nothing is held any more (settlement of a cancelled stream is async)."""
    deadline = time.monotonic() + timeout
    while True:
        acct = admin.balance(account)
        if Decimal(acct["held"]) == 0 or time.monotonic() > deadline:
            return acct
        time.sleep(0.05)


def test_request_without_valid_key_never_reaches_engine(
    billed: tuple[GatewayProcess, Admin], engine: EngineProcess
) -> None:
    gw, _ = billed
    before = httpx.get(engine.url + "/control/stats").json()["requests"]
    for headers in ({}, {"Authorization": "Bearer sk-mesh-forged"}, {"x-api-key": "nope"}):
        r = httpx.post(gw.base_url + "/chat/completions", headers=headers,
                       json={"model": "test-model", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401
    assert httpx.get(engine.url + "/control/stats").json()["requests"] == before


def test_requests_are_billed_to_the_micro_credit(billed: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = billed
    account = admin.account("exact", credits="5")
    key = admin.key(account)["key"]
    expected = Decimal(0)
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        for i in range(3):
            c = client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": f"exact billing {i} " * (i + 1)}]
            )
            assert c.usage is not None
            expected += cost_of(c.usage)
        chunks = list(client.chat.completions.create(
            model="test-reasoner", messages=[{"role": "user", "content": "streamed and billed"}],
            stream=True, stream_options={"include_usage": True},
        ))
        usage = chunks[-1].usage
        assert usage is not None
        expected += cost_of(usage)
        assert Decimal((usage.model_extra or {})["cost"]) == cost_of(usage)
    acct = settled(admin, account)
    assert Decimal(acct["balance"]) == Decimal(5) - expected
    assert Decimal(acct["held"]) == 0
    assert ledger_sum(admin, account) == Decimal(acct["balance"])


def test_no_credit_is_402_and_never_reaches_engine(
    billed: tuple[GatewayProcess, Admin], engine: EngineProcess
) -> None:
    gw, admin = billed
    account = admin.account("broke", credits=None)
    key = admin.key(account)["key"]
    before = httpx.get(engine.url + "/control/stats").json()["requests"]
    r = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "test-model", "messages": [{"role": "user", "content": "free lunch?"}]})
    assert r.status_code == 402
    assert r.json()["error"]["code"] == "insufficient_credits"
    assert r.headers["x-should-retry"] == "false"
    assert httpx.get(engine.url + "/control/stats").json()["requests"] == before


def test_short_balance_lowers_max_tokens_instead_of_refusing(billed: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = billed
    account = admin.account("short", credits="0.000200")  # 200 micro-credits
    key = admin.key(account)["key"]
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        c = client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "[tokens:500]"}], max_tokens=500
        )
    assert c.choices[0].finish_reason == "length"
    assert c.usage is not None and 0 < c.usage.completion_tokens < 100
    acct = settled(admin, account)
    assert Decimal(acct["balance"]) >= 0
    assert Decimal(acct["balance"]) == Decimal("0.0002") - cost_of(c.usage)


def test_failure_before_first_token_pays_nothing(billed: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = billed
    account = admin.account("fails", credits="1")
    key = admin.key(account)["key"]
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "[fault:500]"}])
    acct = settled(admin, account)
    assert Decimal(acct["balance"]) == 1 and Decimal(acct["held"]) == 0


def test_disconnect_pays_for_what_was_generated(billed: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = billed
    account = admin.account("leaver", credits="1")
    key = admin.key(account)["key"]
    body = {"model": "test-model", "stream": True,
            "messages": [{"role": "user", "content": "[tokens:300] [chunk_delay:0.02]"}]}
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}) as resp:
        lines = resp.iter_lines()
        for _ in range(10):
            next(lines)
    acct = settled(admin, account)
    charged = Decimal(1) - Decimal(acct["balance"])
    full = (Decimal(300) * PRICE_OUT) * MICRO
    assert Decimal(acct["held"]) == 0
    assert 0 < charged < full, charged
    assert ledger_sum(admin, account) == Decimal(acct["balance"])


def test_hundreds_of_concurrent_streams_never_overspend(billed: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = billed
    start = Decimal("0.000600")  # about a dozen of these requests
    account = admin.account("race", credits=str(start))
    key = admin.key(account)["key"]
    outcomes = asyncio.run(_fire(gw.base_url, key, 250))
    ok = [o for o in outcomes if isinstance(o, Decimal)]
    refused = [o for o in outcomes if o == 402]
    assert len(ok) + len(refused) == len(outcomes), outcomes
    assert 0 < len(ok) < 100, len(ok)
    print(f"race: {len(ok)} served, {len(refused)} refused")
    acct = settled(admin, account)
    balance = Decimal(acct["balance"])
    assert balance >= 0
    assert Decimal(acct["held"]) == 0
    assert balance == start - sum(ok, Decimal(0))
    assert ledger_sum(admin, account) == balance


async def _fire(base_url: str, key: str, n: int) -> list[Decimal | int]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120) as client:

        async def one(i: int) -> Decimal | int:
            try:
                stream = await client.chat.completions.create(
                    model="test-model", messages=[{"role": "user", "content": f"race {i}"}], max_tokens=10,
                    stream=True, stream_options={"include_usage": True},
                )
                usage = None
                async for chunk in stream:
                    usage = chunk.usage or usage
                assert usage is not None
                return Decimal((usage.model_extra or {})["cost"])
            except openai.APIStatusError as err:
                return err.status_code

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_keys_restricted_revoked_and_expired(billed: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = billed
    account = admin.account("keys", credits="1")
    only_reasoner = admin.key(account, allowed_models=["test-reasoner"])
    msg = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=gw.base_url, api_key=only_reasoner["key"], max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="test-model", messages=msg)
        assert client.chat.completions.create(model="test-reasoner", messages=msg).choices
        assert [m.id for m in client.models.list()] == ["test-reasoner"]
        admin.revoke(only_reasoner["id"])
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="test-reasoner", messages=msg)
    expired = admin.key(account, expires_at="2020-01-01T00:00:00+00:00")
    with openai.OpenAI(base_url=gw.base_url, api_key=expired["key"], max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="test-model", messages=msg)


def test_usage_endpoint_shows_only_own_account(billed: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = billed
    mine, theirs = admin.account("mine", credits="1"), admin.account("theirs", credits="1")
    my_key, their_key = admin.key(mine)["key"], admin.key(theirs)["key"]
    with openai.OpenAI(base_url=gw.base_url, api_key=their_key, max_retries=0) as client:
        client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "theirs"}])
    with openai.OpenAI(base_url=gw.base_url, api_key=my_key, max_retries=0) as client:
        client.chat.completions.create(model="test-reasoner", messages=[{"role": "user", "content": "mine"}])
    deadline = time.monotonic() + 5
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        r = httpx.get(gw.base_url + "/usage", headers={"Authorization": f"Bearer {my_key}"})
        assert r.status_code == 200
        rows = r.json()["data"]
        if rows:
            break
        time.sleep(0.05)
    assert [row["model"] for row in rows] == ["test-reasoner"]
    assert rows[0]["requests"] == 1


def test_logs_hold_no_keys_or_prompts(billed: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = billed
    account = admin.account("quiet", credits="1")
    key = admin.key(account)["key"]
    secret_prompt = "my-very-private-prompt-4711"
    with openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0) as client:
        client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": secret_prompt}])
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": secret_prompt + " [fault:500]"}]
            )
    httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": "Bearer sk-mesh-wrong-key-123"}, json={})
    log = gw.log()
    assert log, "the gateway logs at INFO here, so the log is not empty"
    assert key not in log and key[8:20] not in log
    assert secret_prompt not in log and "Hello! You said" not in log
    assert "sk-mesh-wrong-key-123" not in log
