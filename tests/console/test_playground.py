"""The playground relays to /v1/chat/completions with the user's playground key: streamed,
metered, billed to the account, the key never in the page."""

from __future__ import annotations

import json
from typing import Any

import httpx
from starlette.applications import Starlette

from mesh.console.playground import PLAYGROUND_KEY_NAME

from .conftest import Browser, account_of, grant


async def chat(b: Browser, content: str = "hello playground", **extra: Any) -> httpx.Response:
    token = await b.csrf("/console/playground")
    body = {"model": "test-model", "messages": [{"role": "user", "content": content}], **extra}
    return await b.client.post("/console/playground/chat", json=body, headers={"X-CSRF-Token": token})


def events(r: httpx.Response) -> list[dict[str, Any]]:
    out = []
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


async def test_playground_streams_with_usage_and_cost(console_app: Starlette, customer: Browser) -> None:
    account_id = await account_of(customer)
    await grant(console_app, account_id, "1")
    r = await chat(customer, max_tokens=50, temperature=0.2)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    got = events(r)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in got if e.get("choices"))
    assert text == "Hello! You said: hello playground"
    usage = next(e["usage"] for e in got if e.get("usage"))
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["cost"] not in (None, "0.000000")
    await console_app.state.gateway.flush_billing()
    balance, held = await console_app.state.gateway.services.ledger.balance(account_id)
    assert held == 0 and balance < 1_000_000
    keys = await console_app.state.gateway.services.accounts.list_keys(account_id)
    [playground] = [k for k in keys if k.name == PLAYGROUND_KEY_NAME]
    assert playground.spent == 1_000_000 - balance
    dashboard = await customer.get("/console/dashboard")
    assert "test-model" in dashboard.text and "Playground" in dashboard.text


async def test_playground_reuses_its_key_and_never_shows_it(console_app: Starlette, customer: Browser) -> None:
    account_id = await account_of(customer)
    await grant(console_app, account_id, "1")
    assert (await chat(customer)).status_code == 200
    assert (await chat(customer, "again")).status_code == 200
    keys = await console_app.state.gateway.services.accounts.list_keys(account_id)
    assert [k.name for k in keys].count(PLAYGROUND_KEY_NAME) == 1
    for path in ("/console/playground", "/console/keys", "/console/dashboard"):
        page = await customer.get(path)
        assert "sk-mesh-" not in page.text.replace(keys[0].prefix, "")


async def test_revoked_playground_key_is_replaced(console_app: Starlette, customer: Browser) -> None:
    account_id = await account_of(customer)
    await grant(console_app, account_id, "1")
    assert (await chat(customer)).status_code == 200
    services = console_app.state.gateway.services
    [old] = [k for k in await services.accounts.list_keys(account_id) if k.name == PLAYGROUND_KEY_NAME]
    await services.authenticator.revoke(old.id)
    assert (await chat(customer)).status_code == 200
    active = [k for k in await services.accounts.list_keys(account_id)
              if k.name == PLAYGROUND_KEY_NAME and k.revoked_at is None]
    assert len(active) == 1 and active[0].id != old.id


async def test_playground_without_credits_says_so(customer: Browser) -> None:
    r = await chat(customer)
    assert r.status_code == 402
    assert "Insufficient credits" in r.json()["error"]["message"]


async def test_playground_refuses_malformed_conversations(customer: Browser) -> None:
    token = await customer.csrf("/console/playground")
    for body in ({"model": "test-model", "messages": []},
                 {"model": "test-model", "messages": [{"role": "tool", "content": "x"}]},
                 {"model": "test-model", "messages": [{"role": "user", "content": "x"}], "stream": False}):
        r = await customer.client.post("/console/playground/chat", json=body, headers={"X-CSRF-Token": token})
        assert r.status_code == 400


async def test_playground_unknown_model_is_the_apis_404(console_app: Starlette, customer: Browser) -> None:
    await grant(console_app, await account_of(customer), "1")
    r = await chat(customer, model="no-such-model")
    assert r.status_code == 404
    assert "does not exist" in r.json()["error"]["message"]


async def test_playground_page_lists_models(customer: Browser) -> None:
    page = await customer.get("/console/playground?model=test-reasoner")
    assert page.status_code == 200
    assert '<option value="test-reasoner" selected>' in page.text
    assert "/console/static/playground.js" in page.text


async def test_playground_key_is_not_derivable_from_a_database_dump(console_app: Starlette, customer: Browser) -> None:
    """An attacker with every row of every table (and the old HMAC(secret, key id) recipe)
    gets no key that answers."""
    import base64
    import hashlib
    import hmac

    from sqlalchemy import MetaData, select

    from mesh.accounts.keys import KEY_SCHEME, PREFIX_LENGTH
    from mesh.errors import AuthenticationFailed

    account_id = await account_of(customer)
    await grant(console_app, account_id, "1")
    assert (await chat(customer)).status_code == 200
    gateway = console_app.state.gateway
    [key] = [k for k in await gateway.services.accounts.list_keys(account_id) if k.name == PLAYGROUND_KEY_NAME]
    db = gateway.services.database
    dump: list[str] = []
    async with db.read() as conn:
        meta = MetaData()
        await conn.run_sync(meta.reflect)
        for table in meta.sorted_tables:
            for row in (await conn.execute(select(table))).all():
                dump.extend(str(v) for v in row if v is not None)
    assert not any(v.startswith(KEY_SCHEME) and len(v) > PREFIX_LENGTH for v in dump)  # prefixes only
    candidates = set(dump)
    for value in list(candidates):  # the old recipe: HMAC(a stored secret, the key id)
        mac = hmac.new(value.encode(), f"playground-key\x00{key.id}".encode(), hashlib.sha256).digest()
        candidates.add(KEY_SCHEME + base64.urlsafe_b64encode(mac).rstrip(b"=").decode())
    for candidate in candidates:
        if candidate.startswith(KEY_SCHEME):
            try:
                await gateway.services.authenticator.authenticate(candidate)
            except AuthenticationFailed:
                continue
            raise AssertionError("a key taken from the database dump answered")
    assert console_app.state.gateway is gateway and key.revoked_at is None  # the real key still works
