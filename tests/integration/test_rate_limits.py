"""Rate limits through a real gateway process, with the in-process limiter and with Redis.

Every test makes its own account and key with its own limits (the admin API), then talks to
the gateway with the official SDKs and raw httpx (for headers). The gateway's configured
default gives every key 1000 requests a minute unless it says otherwise.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import httpx
import openai
import pytest

from conftest import engine_models
from support.gateway import Admin, GatewayProcess
from support.redis import require_redis, unique_prefix
from testengine.harness import EngineProcess

DEFAULT_KEY_RPM = 1000
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")


@pytest.fixture(scope="module", params=["memory", "redis"])
def limited(
    request: pytest.FixtureRequest, engine: EngineProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, Admin]]:
    work = tmp_path_factory.mktemp(f"limits-{request.param}")
    config: dict[str, Any] = {
        "database": f"sqlite:///{work}/mesh.db",
        "models": engine_models(engine.base_url),
        "limits": {"key": {"rpm": DEFAULT_KEY_RPM}},
    }
    if request.param == "redis":
        config |= {"redis": require_redis(request), "redis_prefix": unique_prefix()}
    with GatewayProcess(config, work) as gw, Admin(gw.url) as admin:
        yield gw, admin


def seconds(duration: str) -> float:
    """``1m2.5s`` → 62.5, ``12ms`` → 0.012."""
    if duration.endswith("ms"):
        return int(duration[:-2]) / 1000
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?([\d.]+)s", duration)
    assert match, duration
    h, m, sec = match.groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + float(sec)


def new_key(admin: Admin, credits: str | None = "10", **limits: int) -> tuple[str, dict[str, Any]]:
    account = admin.account("limited", credits=credits)
    return account, admin.key(account, rate_limits=limits)


def chat(gw: GatewayProcess, key: str, content: str = "hi", **body: Any) -> httpx.Response:
    return httpx.post(
        gw.base_url + "/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "test-model", "messages": [{"role": "user", "content": content}], **body},
        timeout=30,
    )


def test_429_in_openai_shape_with_retry_after_and_headers(limited: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = limited
    _, key = new_key(admin, rpm=2)
    first, second = chat(gw, key["key"]), chat(gw, key["key"])
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert [first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]] == [
        "1",
        "0",
    ]
    assert DURATION.match(first.headers["x-ratelimit-reset-requests"])
    assert 59 < seconds(second.headers["x-ratelimit-reset-requests"]) <= 60  # both back in a minute
    assert "x-ratelimit-limit-tokens" not in first.headers  # no token limit: no token headers

    with openai.OpenAI(base_url=gw.base_url, api_key=key["key"], max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as exc:
            client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "third"}])
    err = exc.value
    assert err.status_code == 429
    assert err.body == {
        "message": err.body["message"],  # type: ignore[index]  # a dict here
        "type": "rate_limit_error",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert re.search(r"requests per minute \(RPM\) on key key_\w+: limit 2\. Please try again in [\d.]+s\.$",
                     err.message)
    headers = err.response.headers
    assert 29 <= int(headers["retry-after"]) <= 30  # one request frees up every 30 s
    assert 29_000 < int(headers["retry-after-ms"]) <= 30_000
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-request-id"].startswith("req_")


def test_default_limits_and_lifting_them(limited: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = limited
    _, plain = new_key(admin)
    r = chat(gw, plain["key"])
    assert r.headers["x-ratelimit-limit-requests"] == str(DEFAULT_KEY_RPM)
    assert r.headers["x-ratelimit-remaining-requests"] == str(DEFAULT_KEY_RPM - 1)
    _, free = new_key(admin, rpm=0)  # 0 lifts the default: nothing to show
    assert not [h for h in chat(gw, free["key"]).headers if h.startswith("x-ratelimit")]


def test_streams_and_responses_carry_the_headers(limited: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = limited
    _, key = new_key(admin, rpm=10, tpm=100_000)
    auth = {"Authorization": f"Bearer {key['key']}"}
    body = {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": "s"}]}
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, headers=auth) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "9"
        assert int(resp.headers["x-ratelimit-remaining-tokens"]) < 100_000
        resp.read()
    r = httpx.post(gw.base_url + "/responses", headers=auth, json={"model": "test-model", "input": "r"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-remaining-requests"] == "8"
    assert DURATION.match(r.headers["x-ratelimit-reset-tokens"])


def test_anthropic_headers_and_429_shape(limited: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = limited
    _, key = new_key(admin, rpm=1, tpm=5000)
    client = anthropic.Anthropic(base_url=gw.url, api_key=key["key"], max_retries=0)
    raw = client.messages.with_raw_response.create(
        model="test-model", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
    )
    h = raw.headers
    assert (h["anthropic-ratelimit-requests-limit"], h["anthropic-ratelimit-requests-remaining"]) == ("1", "0")
    reset = datetime.strptime(h["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert timedelta(seconds=55) < reset - datetime.now(UTC) < timedelta(seconds=62)
    assert h["anthropic-ratelimit-tokens-limit"] == "5000"
    assert not [k for k in h if k.startswith("x-ratelimit")]
    with pytest.raises(anthropic.RateLimitError) as exc:
        client.messages.create(model="test-model", max_tokens=50, messages=[{"role": "user", "content": "again"}])
    body = exc.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert body["request_id"] == exc.value.response.headers["request-id"]
    assert int(exc.value.response.headers["retry-after"]) in (59, 60)
    assert exc.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    client.close()


def test_tokens_per_minute_count_real_usage(limited: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = limited
    _, key = new_key(admin, tpm=400)
    prompt = "[tokens:100] count me"
    first = chat(gw, key["key"], prompt)
    started = time.monotonic()
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    estimate = 400 - int(first.headers["x-ratelimit-remaining-tokens"])  # what admission charged
    second = chat(gw, key["key"], prompt)
    refill = (time.monotonic() - started) * 400 / 60
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    # Settlement replaced the first request's estimate by its real usage.
    assert 400 - used - estimate <= remaining <= 400 - used - estimate + refill + 1
    outcomes = [chat(gw, key["key"], prompt) for _ in range(4)]
    refused = [r for r in outcomes if r.status_code == 429]
    assert refused, [r.status_code for r in outcomes]
    err = refused[0]
    assert "tokens per minute (TPM)" in err.json()["error"]["message"]
    assert err.headers["x-ratelimit-remaining-tokens"] == "0"
    assert float(err.headers["retry-after-ms"]) > 0


def test_concurrency_limit_with_slow_streams(limited: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = limited
    _, key = new_key(admin, concurrent=2)

    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=key["key"], max_retries=0, timeout=30) as c:

            async def slow() -> str:
                stream = await c.chat.completions.create(
                    model="test-model", stream=True, messages=[{"role": "user", "content": "[delay:0.5] slow"}]
                )
                return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

            async def quick() -> int:
                try:
                    await c.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "q"}])
                    return 200
                except openai.RateLimitError as err:
                    assert "concurrent requests" in err.message
                    assert err.response.headers["retry-after"] == "1"
                    return 429

            slow_tasks = [asyncio.create_task(slow()) for _ in range(2)]
            await asyncio.sleep(0.25)
            during = await quick()
            done = await asyncio.gather(*slow_tasks)
            after = [await quick(), await quick()]
            return [during, done, after]

    during, done, after = asyncio.run(main())
    assert during == 429
    assert all(done)
    assert after == [200, 200]


def test_a_disconnect_and_a_402_free_their_slots(limited: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = limited
    _, key = new_key(admin, concurrent=1)
    body = {"model": "test-model", "stream": True,
            "messages": [{"role": "user", "content": "[tokens:300] [chunk_delay:0.02]"}]}
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key['key']}"}) as resp:
        lines = resp.iter_lines()
        for _ in range(5):
            next(lines)
        assert chat(gw, key["key"]).status_code == 429  # the stream holds the one slot
    deadline = time.monotonic() + 5
    while (status := chat(gw, key["key"]).status_code) == 429 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == 200

    _, broke = new_key(admin, credits=None, concurrent=1)
    assert [chat(gw, broke["key"]).status_code for _ in range(3)] == [402, 402, 402]


def test_account_limits_are_shared_by_its_keys_and_apply_at_once(limited: tuple[GatewayProcess, Admin]) -> None:
    gw, admin = limited
    account, one = new_key(admin)
    two = admin.key(account)
    assert chat(gw, one["key"]).status_code == 200  # both keys are cached now, unlimited account
    assert chat(gw, two["key"]).status_code == 200
    r = admin.client.patch(f"/admin/v1/accounts/{account}", json={"rate_limits": {"rpm": 3}})
    assert r.status_code == 200, r.text
    statuses = [chat(gw, k["key"]).status_code for k in (one, two, one, two, one)]
    assert statuses == [200, 200, 200, 429, 429]
    last = chat(gw, two["key"])
    assert last.headers["x-ratelimit-limit-requests"] == "3"  # the account is tighter than the key's 1000
    r = admin.client.patch(f"/admin/v1/keys/{one['id']}", json={"rate_limits": {"rpm": 0}})
    assert r.json()["rate_limits"]["rpm"] == 0
    admin.client.patch(f"/admin/v1/accounts/{account}", json={"rate_limits": None}).raise_for_status()
    assert chat(gw, one["key"]).status_code == 200


def test_bounded_load_admits_exactly_the_limit(limited: tuple[GatewayProcess, Admin]) -> None:
    """200 requests, 20 at a time, against 50 a minute: a full bucket lets 50 through and
    then one more every 1.2 s, so a load this short sees exactly 50 (a slower machine may
    see the few that the refill allows, and never more)."""
    gw, admin = limited
    _, key = new_key(admin, rpm=50)

    async def main() -> tuple[list[int], float]:
        limits = httpx.Limits(max_connections=20)
        auth = {"Authorization": f"Bearer {key['key']}"}
        body = {"model": "test-model", "messages": [{"role": "user", "content": "load"}], "max_tokens": 5}
        gate = asyncio.Semaphore(20)
        async with httpx.AsyncClient(base_url=gw.base_url, limits=limits, headers=auth, timeout=60) as client:

            async def one() -> int:
                async with gate:
                    r = await client.post("/chat/completions", json=body)
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-remaining-requests"]
                    return r.status_code

            started = time.monotonic()
            statuses = await asyncio.gather(*(one() for _ in range(200)))
            return list(statuses), time.monotonic() - started

    statuses, elapsed = asyncio.run(main())
    passed = statuses.count(200)
    assert statuses.count(200) + statuses.count(429) == 200, statuses
    print(f"load: {passed} of 200 passed in {elapsed:.2f}s")
    refills = int(elapsed / 1.2)
    assert 50 <= passed <= 50 + refills
    if elapsed < 1.2:
        assert passed == 50
