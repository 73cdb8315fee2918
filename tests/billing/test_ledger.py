"""The ledger: idempotent grants, hold -> settle arithmetic, shortfalls and stale holds."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select, update

from mesh.accounts.auth import KeyAuthenticator
from mesh.accounts.principal import Principal
from mesh.accounts.service import Accounts
from mesh.billing.ledger import Ledger
from mesh.billing.money import MicroCredits
from mesh.billing.usage import UsageWriter
from mesh.canonical import Usage
from mesh.config import Pricing
from mesh.errors import InsufficientCredits, InvalidRequest, NotFound
from mesh.store import Database, utcnow
from mesh.store.tables import api_keys, holds, ledger

# 1 micro-credit per input token, 2 per output token.
PRICING = Pricing(input=Decimal("1"), cached_input=Decimal("0.5"), output=Decimal("2"))


async def setup(db: Database, balance: int, *, spend_limit: int | None = None) -> tuple[Ledger, Principal, UsageWriter]:
    accounts = Accounts(db)
    account = await accounts.create("a")
    limit = None if spend_limit is None else MicroCredits(spend_limit)
    created = await accounts.create_key(account.id, spend_limit=limit)
    writer = UsageWriter(db)
    book = Ledger(db, writer)
    if balance:
        await book.grant(account.id, MicroCredits(balance), idempotency_key="seed")
    principal = await KeyAuthenticator(db).authenticate(created.key)
    return book, principal, writer


async def check_invariants(db: Database, book: Ledger, account_id: str) -> tuple[int, int]:
    balance, held = await book.balance(account_id)
    assert balance >= held >= 0
    assert await book.ledger_sum(account_id) == balance
    return balance, held


async def test_grant_is_idempotent(db: Database) -> None:
    book, p, _ = await setup(db, 0)
    first = await book.grant(p.account_id, MicroCredits(5_000_000), idempotency_key="pay_1", memo="stripe")
    again = await book.grant(p.account_id, MicroCredits(5_000_000), idempotency_key="pay_1")
    assert again == first
    assert first.balance_after == 5_000_000 and first.kind == "grant" and first.memo == "stripe"
    assert await book.balance(p.account_id) == (5_000_000, 0)
    await check_invariants(db, book, p.account_id)


async def test_concurrent_grants_with_one_key_credit_once(db: Database) -> None:
    book, p, _ = await setup(db, 0)
    rows = await asyncio.gather(*(book.grant(p.account_id, MicroCredits(7), idempotency_key="same") for _ in range(20)))
    assert len({r.id for r in rows}) == 1
    assert await book.balance(p.account_id) == (7, 0)
    await check_invariants(db, book, p.account_id)


async def test_grant_key_reuse_for_other_operation_is_refused(db: Database) -> None:
    book, p, _ = await setup(db, 0)
    await book.grant(p.account_id, MicroCredits(1), idempotency_key="k")
    with pytest.raises(InvalidRequest) as exc:
        await book.grant(p.account_id, MicroCredits(2), idempotency_key="k")
    assert exc.value.code == "idempotency_key_reused"


async def test_grant_validation(db: Database) -> None:
    book, p, _ = await setup(db, 10)
    with pytest.raises(InvalidRequest):
        await book.grant(p.account_id, MicroCredits(0))
    with pytest.raises(InvalidRequest):
        await book.grant(p.account_id, MicroCredits(-1))
    with pytest.raises(InvalidRequest):
        await book.grant(p.account_id, MicroCredits(1), kind="usage")
    with pytest.raises(TypeError):
        await book.grant(p.account_id, 1.5)  # type: ignore[arg-type]  # floats never reach billing
    with pytest.raises(NotFound):
        await book.grant("acct_missing", MicroCredits(1))
    with pytest.raises(NotFound):
        await book.balance("acct_missing")


async def test_negative_adjustment_cannot_overdraw(db: Database) -> None:
    book, p, _ = await setup(db, 10)
    entry = await book.grant(p.account_id, MicroCredits(-4), kind="adjustment")
    assert entry.amount == -4 and entry.balance_after == 6
    with pytest.raises(InsufficientCredits):
        await book.grant(p.account_id, MicroCredits(-7), kind="adjustment")
    assert (await check_invariants(db, book, p.account_id))[0] == 6


async def test_admit_holds_prompt_and_output(db: Database) -> None:
    book, p, _ = await setup(db, 10_000)
    adm = await book.admit(p, PRICING, "req_1", prompt_tokens_estimate=100, max_output_tokens=50)
    assert adm.held == 100 + 50 * 2 and adm.max_output_tokens == 50
    assert await book.balance(p.account_id) == (10_000, 200)
    async with db.read() as conn:
        assert (await conn.execute(select(api_keys.c.held))).scalar_one() == 200
        assert (await conn.execute(select(func.count()).select_from(ledger))).scalar_one() == 1  # the seed only


async def test_settle_charges_real_usage_and_releases_hold(db: Database) -> None:
    book, p, writer = await setup(db, 10_000)
    adm = await book.admit(p, PRICING, "req_1", 100, 50)
    usage = Usage(input_tokens=90, cached_tokens=10, output_tokens=20, reasoning_tokens=5)
    charged = await book.settle(adm, usage, status="ok", model="m", pricing=PRICING, replica="r1", protocol="chat")
    # 80 * 1 + 10 * 0.5 + 20 * 2 = 125
    assert charged == 125
    assert await book.balance(p.account_id) == (10_000 - 125, 0)
    rows, _ = await book.entries(p.account_id)
    assert rows[0].kind == "usage" and rows[0].amount == -125 and rows[0].idempotency_key == "usage:req_1"
    assert rows[0].request_id == "req_1" and rows[0].key_id == p.key_id
    async with db.read() as conn:
        key = (await conn.execute(select(api_keys.c.spent, api_keys.c.held))).one()
        assert tuple(key) == (125, 0)
        assert (await conn.execute(select(func.count()).select_from(holds))).scalar_one() == 0
    assert writer.pending == 1
    await check_invariants(db, book, p.account_id)


async def test_settle_twice_charges_once(db: Database) -> None:
    book, p, writer = await setup(db, 10_000)
    adm = await book.admit(p, PRICING, "req_1", 100, 50)
    usage = Usage(input_tokens=100, output_tokens=10)
    results = await asyncio.gather(
        *(book.settle(adm, usage, status="ok", model="m", pricing=PRICING) for _ in range(5))
    )
    assert results == [120] * 5
    assert await book.balance(p.account_id) == (10_000 - 120, 0)
    assert writer.pending == 1
    await check_invariants(db, book, p.account_id)


async def test_settle_twice_charges_once_when_nothing_is_left(db: Database) -> None:
    book, p, writer = await setup(db, 300)
    adm = await book.admit(p, PRICING, "req_1", 100, 100)  # holds all 300
    usage = Usage(input_tokens=100, output_tokens=100)
    results = await asyncio.gather(
        *(book.settle(adm, usage, status="ok", model="m", pricing=PRICING) for _ in range(5))
    )
    assert results == [300] * 5
    assert writer.pending == 1
    assert await check_invariants(db, book, p.account_id) == (0, 0)


async def test_failed_request_pays_nothing(db: Database) -> None:
    book, p, writer = await setup(db, 10_000)
    adm = await book.admit(p, PRICING, "req_1", 100, 50)
    assert await book.settle(adm, None, status="error", model="m", pricing=PRICING) == 0
    adm2 = await book.admit(p, PRICING, "req_2", 100, 50)
    assert await book.settle(adm2, Usage(), status="error", model="m", pricing=PRICING) == 0
    assert await book.balance(p.account_id) == (10_000, 0)
    assert len((await book.entries(p.account_id))[0]) == 1
    assert writer.pending == 2


async def test_admit_lowers_max_output_tokens_to_what_is_affordable(db: Database) -> None:
    book, p, _ = await setup(db, 1_000)
    adm = await book.admit(p, PRICING, "req_1", 100, 10_000)
    assert adm.max_output_tokens == 450  # (1000 - 100) / 2
    assert adm.held == 1_000
    with pytest.raises(InsufficientCredits):
        await book.admit(p, PRICING, "req_2", 1, 1)


async def test_admit_402_when_prompt_unaffordable(db: Database) -> None:
    book, p, _ = await setup(db, 101)
    with pytest.raises(InsufficientCredits) as exc:
        await book.admit(p, PRICING, "req_1", 100, 10)  # 100 + 2 for one output token > 101
    err = exc.value
    assert err.status == 402 and err.should_retry is False
    assert err.message.startswith("Insufficient credits: ")
    assert await book.balance(p.account_id) == (101, 0)
    adm = await book.admit(p, PRICING, "req_2", 99, 10)  # 99 + 2 fits: one token
    assert adm.max_output_tokens == 1


async def test_admit_respects_key_spend_limit(db: Database) -> None:
    book, p, _ = await setup(db, 10_000, spend_limit=300)
    adm = await book.admit(p, PRICING, "req_1", 100, 1_000)
    assert adm.max_output_tokens == 100 and adm.held == 300
    with pytest.raises(InsufficientCredits) as exc:
        await book.admit(p, PRICING, "req_2", 1, 1)
    assert "spend limit" in exc.value.message
    await book.settle(adm, Usage(input_tokens=100, output_tokens=50), status="ok", model="m", pricing=PRICING)
    adm3 = await book.admit(p, PRICING, "req_3", 0, 1_000)
    assert adm3.max_output_tokens == 50  # 300 - 200 spent = 100 left


async def test_free_model_needs_no_credit(db: Database) -> None:
    book, p, _ = await setup(db, 0)
    adm = await book.admit(p, Pricing(), "req_1", 100, 100)
    assert adm.held == 0 and adm.max_output_tokens == 100
    assert (
        await book.settle(adm, Usage(input_tokens=5, output_tokens=5), status="ok", model="m", pricing=Pricing()) == 0
    )


async def test_duplicate_request_id_is_refused(db: Database) -> None:
    book, p, _ = await setup(db, 10_000)
    await book.admit(p, PRICING, "req_1", 1, 1)
    with pytest.raises(InvalidRequest) as exc:
        await book.admit(p, PRICING, "req_1", 1, 1)
    assert exc.value.code == "duplicate_request_id"
    assert await book.balance(p.account_id) == (10_000, 3)


async def test_settle_shortfall_charges_what_balance_has(db: Database) -> None:
    book, p, _ = await setup(db, 1_000)
    adm = await book.admit(p, PRICING, "req_1", 10, 10)  # holds 30
    other = await book.admit(p, PRICING, "req_2", 100, 100)  # holds 300
    # The prompt was far longer than estimated: 5000 micro due, 700 available + 30 held.
    charged = await book.settle(adm, Usage(input_tokens=5_000), status="ok", model="m", pricing=PRICING)
    assert charged == 700
    balance, held = await check_invariants(db, book, p.account_id)
    assert (balance, held) == (300, 300)  # the other request's hold is untouched
    assert "shortfall" in ((await book.entries(p.account_id))[0][0].memo or "")
    assert (
        await book.settle(other, Usage(input_tokens=100, output_tokens=100), status="ok", model="m", pricing=PRICING)
        == 300
    )
    assert await check_invariants(db, book, p.account_id) == (0, 0)


async def test_release_stale_holds(db: Database) -> None:
    book, p, _ = await setup(db, 10_000)
    old = await book.admit(p, PRICING, "req_old", 100, 100)
    await book.admit(p, PRICING, "req_new", 10, 10)
    async with db.write() as conn:
        await conn.execute(
            update(holds).where(holds.c.request_id == "req_old").values(created_at=utcnow() - timedelta(hours=3))
        )
    assert await book.release_stale_holds(timedelta(hours=2)) == 1
    assert await book.balance(p.account_id) == (10_000, 30)
    async with db.read() as conn:
        assert (await conn.execute(select(api_keys.c.held))).scalar_one() == 30
    # A late settle of the swept request still pays for what it used, from the balance.
    assert (
        await book.settle(old, Usage(input_tokens=100, output_tokens=1), status="ok", model="m", pricing=PRICING) == 102
    )
    assert await check_invariants(db, book, p.account_id) == (10_000 - 102, 30)


async def test_concurrent_admit_settle_never_overspends(db: Database) -> None:
    """300 concurrent requests on an account that can afford exactly 7 of them."""
    per_request = 100 + 10 * 2  # prompt 100, 10 output tokens: every request uses its whole hold
    affordable = 7
    leftover = 101  # less than the prompt plus one output token: no lowered 8th request either
    book, p, writer = await setup(db, per_request * affordable + leftover)

    async def one(i: int) -> bool:
        try:
            adm = await book.admit(p, PRICING, f"req_{i}", 100, 10)
        except InsufficientCredits:
            return False
        assert adm.max_output_tokens == 10  # one output token costs 2; 10 always fit once admitted
        await asyncio.sleep(0)
        await book.settle(adm, Usage(input_tokens=100, output_tokens=10), status="ok", model="m", pricing=PRICING)
        return True

    results = await asyncio.gather(*(one(i) for i in range(300)))
    assert sum(results) == affordable
    balance, held = await check_invariants(db, book, p.account_id)
    assert (balance, held) == (leftover, 0)
    assert writer.pending == affordable
    async with db.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(holds))).scalar_one() == 0
        usage_rows = (await conn.execute(select(func.count()).where(ledger.c.kind == "usage"))).scalar_one()
    assert usage_rows == affordable


async def test_concurrent_mixed_usage_keeps_invariants(db: Database) -> None:
    """Requests that use less than they hold, or fail: the books still balance."""
    book, p, _ = await setup(db, 20_000)

    async def one(i: int) -> int:
        try:
            adm = await book.admit(p, PRICING, f"req_{i}", 50, 200)
        except InsufficientCredits:
            return 0
        usage = None if i % 5 == 0 else Usage(input_tokens=50, output_tokens=i % adm.max_output_tokens)
        return await book.settle(adm, usage, status="ok", model="m", pricing=PRICING)

    charged = await asyncio.gather(*(one(i) for i in range(300)))
    balance, held = await check_invariants(db, book, p.account_id)
    assert held == 0
    assert balance == 20_000 - sum(charged) >= 0


async def test_concurrent_admits_from_two_engines_never_overspend(db: Database) -> None:
    """Two engines on one database, as two gateway processes would be: no in-process lock
    helps here, only BEGIN IMMEDIATE (SQLite) and the conditional updates (PostgreSQL)."""
    per_request = 120
    book, p, _ = await setup(db, per_request * 5 + 101)
    second = Database(db.url)
    try:
        books = [book, Ledger(second)]

        async def one(i: int) -> bool:
            try:
                adm = await books[i % 2].admit(p, PRICING, f"req_{i}", 100, 10)
            except InsufficientCredits:
                return False
            await books[(i + 1) % 2].settle(
                adm, Usage(input_tokens=100, output_tokens=10), status="ok", model="m", pricing=PRICING
            )
            return True

        results = await asyncio.gather(*(one(i) for i in range(120)))
    finally:
        await second.aclose()
    assert sum(results) == 5
    assert await check_invariants(db, book, p.account_id) == (101, 0)
