"""open_services / aclose: one way to build the billing services, with a clean shutdown."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from mesh.billing.money import MicroCredits
from mesh.billing.services import open_services
from mesh.billing.usage import daily_usage
from mesh.canonical import Usage
from mesh.config import Pricing, Settings
from mesh.store import Database, head_revision


async def test_open_services_round_trip(database_url: str, redis_url: str) -> None:
    settings = Settings(database=database_url, redis=redis_url)
    services = await open_services(settings)
    try:
        account = await services.accounts.create("a")
        key = await services.accounts.create_key(account.id)
        await services.ledger.grant(account.id, MicroCredits(1_000))
        principal = await services.authenticator.authenticate(key.key)
        pricing = Pricing(input=Decimal("1"), output=Decimal("1"))
        adm = await services.ledger.admit(principal, pricing, "req_1", 10, 10)
        await services.ledger.settle(
            adm, Usage(input_tokens=10, output_tokens=3), status="ok", model="m", pricing=pricing
        )
    finally:
        await services.aclose()  # flushes the queued usage record
    db = Database(database_url)
    try:
        (row,) = await daily_usage(db, account_id=account.id)
        assert row.cost == 13
    finally:
        await db.aclose()


async def test_open_services_migrates(tmp_path: Path) -> None:
    services = await open_services(Settings(database=f"sqlite:///{tmp_path}/m.db"), background=False)
    try:
        assert await services.database.current_revision() == head_revision()
    finally:
        await services.aclose()


async def test_open_services_fails_cleanly_when_redis_is_down(tmp_path: Path) -> None:
    settings = Settings(database=f"sqlite:///{tmp_path}/m.db", redis="redis://127.0.0.1:1/0")
    with pytest.raises(OSError):
        await open_services(settings)
