"""Two gateway processes on one PostgreSQL and one Redis, with nothing in front but this test.

What one gateway knows, the other must honour: rate limits (Redis), credit (PostgreSQL),
and key revocations and limit changes (Redis pub/sub to each process's key cache). The
gateways share a fresh database and a Redis namespace of their own (``redis_prefix``), so
parallel runs never see each other's counters or invalidations.
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
from support.redis import require_redis, unique_prefix
from testengine.harness import EngineProcess

Pair = tuple[GatewayProcess, GatewayProcess, Admin]


@pytest.fixture(scope="module")
def pair(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    work = tmp_path_factory.mktemp("scale-out")
    redis_url = require_redis(request)
    with temporary_database(request, "postgresql", work) as url:
        config = {
            "database": url,
            "redis": redis_url,
            "redis_prefix": unique_prefix(),
            "models": engine_models(engine.base_url),
            "billing": {"usage_flush_interval": 0.05},
        }
        # One after the other: the first one migrates the new database.
        with GatewayProcess(config, work) as a, GatewayProcess(config, work) as b:
            admin = Admin(a.url)
            try:
                yield a, b, admin
            finally:
                admin.close()


def chat(gw: GatewayProcess, key: str, content: str = "hi") -> httpx.Response:
    return httpx.post(
        gw.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "test-model", "messages": [{"role": "user", "content": content}], "max_tokens": 5},
        timeout=30,
    )


def test_a_rate_limit_holds_across_both_gateways(pair: Pair) -> None:
    a, b, admin = pair
    key = admin.key(admin.account("rpm", credits="10"), rate_limits={"rpm": 10})["key"]
    responses = [chat((a, b)[i % 2], key, f"alternating {i}") for i in range(20)]
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10 and statuses.count(429) == 10, statuses
    assert statuses[:10] == [200] * 10  # nothing refills in the second this takes
    for r in responses[10:]:
        assert 1 <= int(r.headers["retry-after"]) <= 6  # one request frees up every 6 s
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # Each gateway counted the other's requests: both refused, and both admitted.
    assert {r.status_code for r in responses[0::2]} == {200, 429}
    assert {r.status_code for r in responses[1::2]} == {200, 429}


def test_a_concurrency_limit_holds_across_both_gateways(pair: Pair) -> None:
    a, b, admin = pair
    key = admin.key(admin.account("conc", credits="10"), rate_limits={"concurrent": 1})["key"]
    slow = "[tokens:40] [chunk_delay:0.02]"
    body = {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": slow}]}
    with httpx.stream("POST", a.base_url + "/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200
        refused = chat(b, key)
        resp.read()
    assert refused.status_code == 429 and "concurrent requests" in refused.json()["error"]["message"]
    assert chat(b, key).status_code == 200  # the stream on a settled: its slot is free on b too


def test_limits_changed_through_one_gateway_apply_on_the_other(pair: Pair) -> None:
    a, b, admin = pair
    account = admin.account("changed", credits="10")
    created = admin.key(account)
    assert chat(b, created["key"]).status_code == 200  # cached on b, unlimited
    admin.client.patch(f"/admin/v1/keys/{created['id']}", json={"rate_limits": {"rpm": 1}}).raise_for_status()
    statuses = _until(lambda: chat(b, created["key"]), lambda r: "x-ratelimit-limit-requests" in r.headers)
    assert statuses[-1] == 200
    assert chat(b, created["key"]).status_code == 429
    assert chat(a, created["key"]).status_code == 429


def test_a_key_revoked_through_one_gateway_is_refused_by_the_other_at_once(pair: Pair) -> None:
    """The revoking gateway publishes the key id on Redis after its database commit, before
    its admin API answers; the other gateway's listener drops its cached copy when the
    message arrives, which takes well under a millisecond on loopback. The first request
    sent after the admin call returned is refused in practice; the test allows 1 s of
    5 ms retries so that a scheduler hiccup on a loaded machine cannot fail it, and prints
    how many attempts it took. Without the message, b would serve the key from its cache
    for 30 s (``CACHE_TTL``)."""
    a, b, admin = pair
    created = admin.key(admin.account("revoked", credits="10"))
    assert chat(b, created["key"]).status_code == 200  # b caches the key now
    assert chat(b, created["key"]).status_code == 200
    admin.revoke(created["id"])
    revoked_at = time.monotonic()
    statuses = _until(lambda: chat(b, created["key"]), lambda r: r.status_code == 401)
    elapsed = time.monotonic() - revoked_at
    print(f"revocation seen by the other gateway after {len(statuses)} request(s), {elapsed * 1000:.1f} ms")
    assert statuses[-1] == 401 and elapsed < 1.0
    assert chat(b, created["key"]).json()["error"]["message"] == "API key revoked"
    assert chat(a, created["key"]).status_code == 401


def _until(call: Any, done: Any, timeout: float = 1.0) -> list[int]:
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        r = call()
        statuses.append(r.status_code)
        if done(r) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.005)


def test_credit_holds_across_both_gateways(pair: Pair) -> None:
    a, b, admin = pair
    start = Decimal("0.000500")  # about a dozen of these requests
    account = admin.account("race", credits=str(start))
    key = admin.key(account)["key"]
    outcomes = asyncio.run(_race((a.base_url, b.base_url), key, 160))
    ok = [o for o in outcomes if isinstance(o, Decimal)]
    assert len(ok) + outcomes.count(402) == len(outcomes), outcomes
    assert 0 < len(ok) < 80
    acct = _settled(admin, account)
    balance = Decimal(acct["balance"])
    assert balance >= 0 and Decimal(acct["held"]) == 0
    assert balance == start - sum(ok, Decimal(0))
    entries = admin.ledger(account)
    assert sum((Decimal(e["amount"]) for e in entries), Decimal(0)) == balance
    other = Admin(b.url)  # b reads the same balance: one database behind both
    try:
        assert other.balance(account)["balance"] == acct["balance"]
    finally:
        other.close()


async def _race(urls: tuple[str, str], key: str, n: int) -> list[Decimal | int]:
    clients = [openai.AsyncOpenAI(base_url=u, api_key=key, max_retries=0, timeout=120) for u in urls]

    async def one(i: int) -> Decimal | int:
        try:
            stream = await clients[i % 2].chat.completions.create(
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

    try:
        return list(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        for c in clients:
            await c.close()


def _settled(admin: Admin, account: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        acct = admin.balance(account)
        if Decimal(acct["held"]) == 0 or time.monotonic() > deadline:
            return acct
        time.sleep(0.05)
