"""API keys in the console: created and shown once, listed by prefix, restricted, revoked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from starlette.applications import Starlette

from .conftest import Browser, account_of, api, create_key, grant


async def test_key_is_shown_once_and_listed_by_prefix(console_app: Starlette, customer: Browser) -> None:
    key_id, raw = await create_key(customer, "backend", spend_limit="2.5")
    listing = await customer.get("/console/keys")
    assert raw not in listing.text
    assert raw[:12] in listing.text and "backend" in listing.text and "2.50" in listing.text
    info = await console_app.state.gateway.services.accounts.get_key(key_id)
    assert info.spend_limit == 2_500_000 and info.allowed_models is None


async def test_key_restrictions_apply_to_the_api(console_app: Starlette, customer: Browser) -> None:
    await grant(console_app, await account_of(customer), "1")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    key_id, raw = await create_key(customer, "only test-model", restrict="yes", models=["test-model"],
                                   expires=tomorrow)
    info = await console_app.state.gateway.services.accounts.get_key(key_id)
    assert info.allowed_models == ("test-model",)
    assert info.expires_at is not None and info.expires_at.date().isoformat() > tomorrow
    async with api(console_app, raw) as client:
        ok = await client.post("/v1/chat/completions", json={
            "model": "test-model", "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200
        refused = await client.post("/v1/chat/completions", json={
            "model": "test-reasoner", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 403


async def test_key_form_errors(customer: Browser) -> None:
    yesterday = (datetime.now(UTC) - timedelta(days=2)).date().isoformat()
    cases = [
        ({"spend_limit": "lots"}, "Enter an amount"),
        ({"spend_limit": "0.0000001"}, "Enter an amount"),
        ({"expires": yesterday}, "future"),
        ({"expires": "soon"}, "Enter a date"),
        ({"restrict": "yes"}, "Pick at least one model"),
        ({"restrict": "yes", "models": ["no-such-model"]}, "Pick at least one model"),
    ]
    for fields, message in cases:
        r = await customer.post("/console/keys", {"name": "bad", **fields}, token_from="/console/keys")
        assert r.status_code == 400, fields
        assert message in r.text, fields
        assert "new-key-value" not in r.text


async def test_revoke_stops_the_key_at_once(console_app: Starlette, customer: Browser) -> None:
    await grant(console_app, await account_of(customer), "1")
    key_id, raw = await create_key(customer, "short-lived")
    async with api(console_app, raw) as client:
        assert (await client.get("/v1/models")).status_code == 200  # now cached by the authenticator
        r = await customer.post(f"/console/keys/{key_id}/revoke", token_from="/console/keys")
        assert r.status_code == 303
        refused = await client.post("/v1/chat/completions", json={
            "model": "test-model", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 401
    page = await customer.get("/console/keys")
    assert "revoked" in page.text and "Revoked and expired keys" in page.text


async def test_revoke_unknown_key_is_404(customer: Browser) -> None:
    r = await customer.post("/console/keys/key_000000000000000000000000/revoke", token_from="/console/keys")
    assert r.status_code == 404


async def test_last_used_comes_from_usage(console_app: Starlette, customer: Browser) -> None:
    await grant(console_app, await account_of(customer), "1")
    _, raw = await create_key(customer, "busy")
    async with api(console_app, raw) as client:
        assert (await client.post("/v1/chat/completions", json={
            "model": "test-model", "messages": [{"role": "user", "content": "hi"}]})).status_code == 200
    await console_app.state.gateway.flush_billing()
    page = await customer.get("/console/keys")
    row = page.text.split("busy", 1)[1].split("</tr>", 1)[0]
    assert "just now" in row
