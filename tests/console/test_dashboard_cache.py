"""The dashboard shows the prefix-cache hit rate per model and per key, from real usage."""

from __future__ import annotations

import asyncio
import re

from starlette.applications import Starlette

from console.conftest import Browser, account_of, api, create_key, grant

PREAMBLE = "You are a coding agent working in a repository. Follow the rules. " * 40


async def test_the_dashboard_shows_what_the_prefix_cache_saved(console_app: Starlette, customer: Browser) -> None:
    account = await account_of(customer)
    await grant(console_app, account, "10")
    _, key = await create_key(customer, "agent")
    history = [{"role": "system", "content": PREAMBLE}, {"role": "user", "content": "[tokens:3] first"}]
    cached = []
    async with api(console_app, key) as client:
        for turn in range(3):
            r = await client.post("/v1/chat/completions", json={"model": "test-model", "messages": history})
            assert r.status_code == 200, r.text
            body = r.json()
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
            history += [body["choices"][0]["message"], {"role": "user", "content": f"[tokens:3] turn {turn}"}]
        assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]  # the engine saw the prefix
        for _ in range(400):  # usage rows are written in batches: wait for all three
            usage = (await client.get("/v1/usage")).json()
            rows = usage["cache"]["by_model"]
            if rows and rows[0]["cached_tokens"] == sum(cached):
                break
            await asyncio.sleep(0.05)
    [model] = usage["cache"]["by_model"]
    assert model["model"] == "test-model" and model["cached_tokens"] == sum(cached)
    assert 0 < model["cache_hit_rate"] < 1
    assert model["cache_hit_rate"] == round(sum(cached) / model["input_tokens"], 4)
    [by_key] = usage["cache"]["by_key"]
    assert by_key["key_id"].startswith("key_") and by_key["cached_tokens"] == sum(cached)
    page = await customer.get("/console/dashboard")
    assert page.status_code == 200
    section = page.text[page.text.index('id="prefix-cache"') :]
    rates = re.findall(r'class="num cache-rate">([0-9.]+)%<', section)
    assert rates and rates[0] == f"{model['cache_hit_rate'] * 100:.1f}" and len(rates) == 2, rates
    assert "agent" in section  # the key's name
