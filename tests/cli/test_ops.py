"""The operator CLI contracts, run through the real ``mesh`` Typer app on real databases."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mesh.accounts.invalidation import RedisInvalidator
from mesh.cli import app

CLEAN_ENV: dict[str, str | None] = {"MESH_CONFIG": None, "MESH_DATABASE": None, "MESH_REDIS": None}


@pytest.fixture
def config(database_url: str, tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"database": database_url}))
    return path


def mesh(config: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, ["--config", str(config), *args], env=CLEAN_ENV)
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def mesh_json(config: Path, *args: str) -> Any:
    return json.loads(mesh(config, *args, "--json"))


def test_accounts_credits_keys_contracts(config: Path) -> None:
    acct = mesh_json(config, "accounts", "create", "Acme")["id"]
    assert acct.startswith("acct_")

    grant = mesh_json(config, "credits", "grant", acct, "12.5", "--idempotency-key", "pay_1")
    assert grant["balance"] == "12.500000"
    mesh_json(config, "credits", "grant", acct, "12.5", "--idempotency-key", "pay_1")  # a retry
    mesh_json(config, "credits", "grant", acct, "0.345678")
    assert mesh_json(config, "credits", "balance", acct) == {
        "balance": "12.845678",
        "held": "0.000000",
        "available": "12.845678",
    }

    key = mesh_json(
        config,
        "keys",
        "create",
        acct,
        "--name",
        "ci",
        "--models",
        "a,b",
        "--expires-in-days",
        "3",
        "--spend-limit",
        "2",
    )
    assert key["id"].startswith("key_") and key["key"].startswith("sk-mesh-")
    assert key["allowed_models"] == ["a", "b"] and key["spend_limit"] == "2.000000" and key["expires_at"]
    listed = mesh_json(config, "keys", "list", acct)["data"]
    assert [k["id"] for k in listed] == [key["id"]]
    assert key["key"] not in mesh(config, "keys", "list", acct)

    assert "revoked" in mesh(config, "keys", "revoke", key["id"])
    assert mesh_json(config, "keys", "list", acct)["data"][0]["revoked"] is True
    assert "already revoked" in mesh(config, "keys", "revoke", key["id"])

    accounts = mesh_json(config, "accounts", "list")["data"]
    assert [(a["id"], a["balance"]) for a in accounts] == [(acct, "12.845678")]
    assert "Acme" in mesh(config, "accounts", "list")


def test_usage_and_redeem_commands(config: Path) -> None:
    minted = mesh_json(config, "redeem", "mint", "5", "--count", "3")
    assert minted["amount"] == "5.000000" and len(minted["codes"]) == 3
    assert len(mesh(config, "redeem", "mint", "1").split()) == 1
    assert mesh_json(config, "usage", "--days", "7") == {"object": "list", "days": 7, "data": []}
    mesh(config, "usage", "--account", "acct_x")


def test_plain_output(config: Path) -> None:
    acct = mesh(config, "accounts", "create", "plain").strip()
    assert acct.startswith("acct_")
    assert "balance 0.000000" in mesh(config, "credits", "balance", acct)
    assert mesh(config, "keys", "create", acct).strip().startswith("sk-mesh-")


def test_errors_exit_nonzero_with_message(config: Path) -> None:
    out = mesh(config, "credits", "balance", "acct_missing", code=1)
    assert "not found" in out
    mesh(config, "credits", "grant", "acct_missing", "1.0000001", code=2)
    mesh(config, "credits", "grant", "acct_missing", "1", code=1)
    mesh(config, "keys", "revoke", "key_missing", code=1)


def test_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("database: mysql://nope/x\n")
    result = CliRunner().invoke(app, ["--config", str(path), "accounts", "list"], env=CLEAN_ENV)
    assert result.exit_code == 2


async def test_keys_revoke_publishes_invalidation(database_url: str, redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump({"database": database_url, "redis": redis_url}))
    acct = (await asyncio.to_thread(mesh_json, path, "accounts", "create", "a"))["id"]
    key_id = (await asyncio.to_thread(mesh_json, path, "keys", "create", acct))["id"]
    heard: list[str] = []
    listener = RedisInvalidator(redis_url, heard.append)  # the default channel, as a gateway uses
    await listener.start()
    try:
        await asyncio.to_thread(mesh, path, "keys", "revoke", key_id)
        for _ in range(200):
            if key_id in heard:
                break
            await asyncio.sleep(0.01)
    finally:
        await listener.aclose()
    assert key_id in heard


def test_key_budget_command(config: Path) -> None:
    acct = mesh_json(config, "accounts", "create", "Budgets")["id"]
    key = mesh_json(config, "keys", "create", acct, "--spend-limit", "3", "--period", "weekly", "--reset-day", "4")
    assert (key["budget_period"], key["budget_reset_day"], key["spend_limit"]) == ("weekly", 4, "3.000000")
    shown = mesh_json(config, "keys", "budget", key["id"])
    assert shown["budget_remaining"] == "3.000000" and shown["budget_resets_at"] == key["budget_resets_at"]
    changed = mesh_json(config, "keys", "budget", key["id"], "--limit", "7.5", "--period", "monthly")
    assert (changed["budget_period"], changed["budget_reset_day"], changed["spend_limit"]) == ("monthly", 1, "7.500000")
    assert changed["budget_resets_at"].split("T")[0].endswith("-01")
    cleared = mesh_json(config, "keys", "budget", key["id"], "--limit", "none", "--period", "none")
    assert (cleared["spend_limit"], cleared["budget_period"], cleared["budget_resets_at"]) == (None, "none", None)
    assert "budget_period" in mesh(config, "keys", "budget", key["id"], "--period", "hourly", code=1)
    assert "daily" in mesh(config, "keys", "budget", key["id"], "--period", "daily")
