"""Redeem codes credit exactly once."""

from __future__ import annotations

import asyncio
import re

import pytest
from sqlalchemy import select

from mesh.accounts.service import Accounts
from mesh.billing.ledger import Ledger
from mesh.billing.money import MicroCredits
from mesh.billing.redeem import RedeemCodes, normalize_code
from mesh.errors import InvalidRequest, NotFound
from mesh.store import Database
from mesh.store.tables import redeem_codes

CODE = re.compile(r"^MESH-[2-9A-HJ-NP-Z]{4}-[2-9A-HJ-NP-Z]{4}-[2-9A-HJ-NP-Z]{4}$")


async def test_mint_codes_are_random_and_stored_hashed(db: Database) -> None:
    minted = await RedeemCodes(db).mint(MicroCredits(5_000_000), count=20)
    assert len({m.code for m in minted}) == 20
    assert all(CODE.match(m.code) for m in minted)
    assert all(m.code not in repr(m) for m in minted)
    async with db.read() as conn:
        rows = (await conn.execute(select(redeem_codes))).all()
    stored = repr(rows)
    assert len(rows) == 20
    assert all(m.code not in stored and m.prefix in stored for m in minted)


async def test_redeem_credits_once(db: Database) -> None:
    account = await Accounts(db).create("a")
    codes = RedeemCodes(db)
    (minted,) = await codes.mint(MicroCredits(2_500_000))
    entry = await codes.redeem(account.id, minted.code.lower().replace("-", " "))
    assert entry.kind == "redeem" and entry.amount == 2_500_000 and entry.balance_after == 2_500_000
    with pytest.raises(InvalidRequest) as exc:
        await codes.redeem(account.id, minted.code)
    assert exc.value.code == "invalid_redeem_code" and exc.value.status == 400
    book = Ledger(db)
    assert await book.balance(account.id) == (2_500_000, 0)
    assert await book.ledger_sum(account.id) == 2_500_000


async def test_redeem_unknown_code(db: Database) -> None:
    account = await Accounts(db).create("a")
    for text in ("MESH-2222-3333-4444", "garbage", ""):
        with pytest.raises(InvalidRequest) as exc:
            await RedeemCodes(db).redeem(account.id, text)
        assert exc.value.code == "invalid_redeem_code"


async def test_redeem_for_unknown_account_leaves_code_unused(db: Database) -> None:
    account = await Accounts(db).create("a")
    codes = RedeemCodes(db)
    (minted,) = await codes.mint(MicroCredits(1))
    with pytest.raises(NotFound):
        await codes.redeem("acct_missing", minted.code)
    assert (await codes.redeem(account.id, minted.code)).amount == 1


async def test_redeem_once_under_concurrency(db: Database) -> None:
    accounts = Accounts(db)
    ids = [(await accounts.create(f"a{i}")).id for i in range(4)]
    codes = RedeemCodes(db)
    (minted,) = await codes.mint(MicroCredits(1_000_000))

    async def attempt(i: int) -> bool:
        try:
            await codes.redeem(ids[i % len(ids)], minted.code)
        except InvalidRequest:
            return False
        return True

    results = await asyncio.gather(*(attempt(i) for i in range(40)))
    assert sum(results) == 1
    book = Ledger(db)
    balances = [(await book.balance(i))[0] for i in ids]
    assert sorted(balances) == [0, 0, 0, 1_000_000]


async def test_mint_validation(db: Database) -> None:
    codes = RedeemCodes(db)
    with pytest.raises(InvalidRequest):
        await codes.mint(MicroCredits(0))
    with pytest.raises(InvalidRequest):
        await codes.mint(MicroCredits(1), count=1001)


def test_normalize_code() -> None:
    assert normalize_code(" mesh-abcd-efgh-jkmn ") == "MESH-ABCD-EFGH-JKMN"
    assert normalize_code("MESHABCDEFGHJKMN") == "MESH-ABCD-EFGH-JKMN"
    assert normalize_code("MESH-ABCD-EFGH-JKM0") is None  # 0 is not in the alphabet
    assert normalize_code("MESH-ABCD-EFGH") is None
    assert normalize_code("XXXX-ABCD-EFGH-JKMN") is None
