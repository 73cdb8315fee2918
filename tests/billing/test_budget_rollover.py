"""A key budget's period rolls over exactly once inside the settlement core, however many
holds race across the boundary (both backends)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select, update

from mesh.accounts.auth import KeyAuthenticator
from mesh.accounts.service import Accounts
from mesh.billing import budgets
from mesh.billing.ledger import Ledger
from mesh.billing.money import MicroCredits
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.errors import InsufficientCredits, KeyBudgetExceeded
from mesh.store import Database
from mesh.store.tables import api_keys

PRICING = Pricing(input=Decimal("1"), cached_input=Decimal("0.5"), output=Decimal("2"))


async def test_rollover_happens_once_and_the_new_period_is_exact(db: Database) -> None:
    accounts = Accounts(db)
    account = await accounts.create("a")
    created = await accounts.create_key(account.id, spend_limit=MicroCredits(1_000), budget_period="daily")
    book = Ledger(db)
    await book.grant(account.id, MicroCredits(1_000_000), idempotency_key="seed")
    who = await KeyAuthenticator(db).authenticate(created.key)

    spent = await book.admit(who, PRICING, "r0", 100, 450)  # 100 + 900 = the whole budget
    await book.settle(spent, Usage(input_tokens=100, output_tokens=450), status="ok", model="m", pricing=PRICING)
    with pytest.raises(KeyBudgetExceeded) as exc:
        await book.admit(who, PRICING, "r1", 10, 1)
    assert exc.value.headers and exc.value.headers["x-mesh-budget-remaining"] == "0.000000"
    assert "daily budget" in exc.value.message

    # The period ended: 40 holds of 30 race across the boundary; the new 1000 covers 33.
    async with db.write() as conn:
        await conn.execute(
            update(api_keys).where(api_keys.c.id == who.key_id).values(
                budget_resets_at=budgets.now() - timedelta(seconds=1)
            )
        )

    async def one(i: int) -> int:
        try:
            return int((await book.admit(who, PRICING, f"n{i}", 10, 10)).held)
        except InsufficientCredits:
            return 0

    held = await asyncio.gather(*(one(i) for i in range(40)))
    assert sum(held) <= 1_000 and sum(1 for h in held if h) == 33
    async with db.read() as conn:
        row = (await conn.execute(select(api_keys).where(api_keys.c.id == who.key_id))).one()
    assert row.spent == 0 and row.held == sum(held)  # zeroed once: no hold was lost to a second reset
    assert row.budget_resets_at > budgets.now()
    balance, _ = await book.balance(account.id)
    assert balance == 1_000_000 - 1_000  # refusals and rollovers took nothing from the account
