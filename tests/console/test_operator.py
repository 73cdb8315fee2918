"""Operator pages: accounts and grants (once per form), platform usage, fleet, workers,
redeem codes; operators named in the config or made with ``mesh console make-admin``."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import yaml
from starlette.applications import Starlette
from typer.testing import CliRunner, Result

from mesh.cli import app as cli
from mesh.console.users import Users

from .conftest import Browser, account_of


async def test_accounts_and_grant_once_per_form(console_app: Starlette, operator: Browser,
                                                customer: Browser) -> None:
    account_id = await account_of(customer)
    listing = await operator.get("/console/admin/accounts?offset=0")
    assert listing.status_code == 200
    page = await operator.get(f"/console/admin/accounts/{account_id}")
    assert customer.email in page.text
    key = re.search(r'name="idempotency_key" value="([^"]+)"', page.text)
    assert key
    token = await operator.csrf(f"/console/admin/accounts/{account_id}")
    form = {"amount": "12.5", "kind": "grant", "memo": "welcome", "idempotency_key": key.group(1), "csrf_token": token}
    for _ in range(2):  # a double submit grants once
        r = await operator.client.post(f"/console/admin/accounts/{account_id}/grant", data=form)
        assert r.status_code == 303
    balance, _ = await console_app.state.gateway.services.ledger.balance(account_id)
    assert balance == 12_500_000
    page = await operator.get(f"/console/admin/accounts/{account_id}")
    assert "welcome" in page.text and "12.50" in page.text


async def test_grant_form_errors(operator: Browser, customer: Browser) -> None:
    account_id = await account_of(customer)
    for form, message in (({"amount": "ten"}, "Enter an amount"), ({"amount": "-5"}, "Enter an amount"),
                          ({"amount": "5", "kind": "gift"}, "Pick a kind")):
        r = await operator.post(f"/console/admin/accounts/{account_id}/grant", form,
                                token_from=f"/console/admin/accounts/{account_id}")
        assert r.status_code == 400 and message in r.text
    missing = await operator.get("/console/admin/accounts/acct_000000000000000000000000")
    assert missing.status_code == 404


async def test_usage_fleet_and_workers_pages(operator: Browser) -> None:
    usage = await operator.get("/console/admin/usage")
    assert usage.status_code == 200
    fleet = await operator.get("/console/admin/models")
    assert fleet.status_code == 200
    assert 'data-pool="test-model"' in fleet.text and "closed" in fleet.text
    workers = await operator.get("/console/admin/workers")
    assert workers.status_code == 200 and "From the configuration" in workers.text


async def test_mint_codes_shows_them_once(console_app: Starlette, operator: Browser, customer: Browser) -> None:
    r = await operator.post("/console/admin/codes", {"amount": "4", "count": "3"}, token_from="/console/admin/codes")
    assert r.status_code == 201
    codes = re.findall(r"MESH-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", r.text)
    assert len(set(codes)) == 3
    assert not re.search(r"MESH-[0-9A-Z]{4}-", (await operator.get("/console/admin/codes")).text)
    await customer.post("/console/billing/redeem", {"code": codes[0]}, token_from="/console/billing")
    balance, _ = await console_app.state.gateway.services.ledger.balance(await account_of(customer))
    assert balance == 4_000_000
    bad = await operator.post("/console/admin/codes", {"amount": "4", "count": "5000"},
                              token_from="/console/admin/codes")
    assert bad.status_code == 400


async def test_make_admin_cli(console_app: Starlette, customer: Browser, tmp_path: Path) -> None:
    gateway = console_app.state.gateway
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump({"database": gateway.settings.database}))
    assert (await customer.get("/console/admin/accounts")).status_code == 403
    env: dict[str, str | None] = {"MESH_CONFIG": None, "MESH_DATABASE": None}

    async def mesh(*args: str) -> Result:  # the CLI runs its own event loop: give it a thread
        return await asyncio.to_thread(CliRunner().invoke, cli, ["--config", str(config), "console", *args], env=env)

    result = await mesh("make-admin", customer.email)
    assert result.exit_code == 0, result.output
    assert "is now an operator" in result.output
    assert (await customer.get("/console/admin/accounts")).status_code == 200
    result = await mesh("make-admin", "--revoke", customer.email)
    assert result.exit_code == 0
    assert (await customer.get("/console/admin/accounts")).status_code == 403
    result = await mesh("make-admin", "nobody@example.com")
    assert result.exit_code == 1 and "no console user" in result.output
    assert not await Users(gateway.services.database).set_admin("not an email")
