"""Ledger postings of credit (grants, purchases, redemptions, refunds, adjustments), always
with their ledger row. Request charges go through :mod:`mesh.billing.settlement`.

:func:`post` runs inside the caller's write transaction, so a balance change and the
row that records it commit or roll back together. :func:`run_idempotent` wraps a
transaction keyed by an idempotency key: a retry with the same key returns the row the
first attempt wrote and changes nothing, even when both attempts race.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any, TypeVar

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mesh.billing.money import MicroCredits, format_credits
from mesh.errors import InsufficientCredits, NotFound
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, ledger

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger row. ``amount`` is signed: positive credits the account, negative debits it."""

    id: int
    account_id: str
    kind: str
    amount: MicroCredits
    balance_after: MicroCredits
    idempotency_key: str
    request_id: str | None
    key_id: str | None
    memo: str | None
    created_at: datetime


def entry_from_row(row: Any) -> LedgerEntry:
    return LedgerEntry(
        id=row.id,
        account_id=row.account_id,
        kind=row.kind,
        amount=MicroCredits(row.amount),
        balance_after=MicroCredits(row.balance_after),
        idempotency_key=row.idempotency_key,
        request_id=row.request_id,
        key_id=row.key_id,
        memo=row.memo,
        created_at=row.created_at,
    )


async def find_entry(conn: AsyncConnection, idempotency_key: str) -> LedgerEntry | None:
    """The ledger row written under ``idempotency_key``, if any."""
    row = (await conn.execute(select(ledger).where(ledger.c.idempotency_key == idempotency_key))).first()
    return None if row is None else entry_from_row(row)


async def post(
    conn: AsyncConnection,
    *,
    account_id: str,
    amount: int,
    kind: str,
    idempotency_key: str,
    request_id: str | None = None,
    key_id: str | None = None,
    memo: str | None = None,
) -> LedgerEntry:
    """Add ``amount`` (signed micro-credits) to the balance and append its ledger row.

    The update is conditional: a debit that would take the balance below what is held
    raises ``InsufficientCredits`` and changes nothing (a credit always applies, also to a
    balance a reversal left below zero). ``NotFound`` for an unknown account. A reused
    idempotency key raises ``IntegrityError`` (see :func:`run_idempotent`).
    """
    stmt = update(accounts).where(accounts.c.id == account_id)
    if amount < 0:
        stmt = stmt.where(accounts.c.balance + amount >= accounts.c.held)
    result = await conn.execute(
        stmt.values(balance=accounts.c.balance + amount).returning(accounts.c.balance, accounts.c.reversed)
    )
    after = result.first()
    if after is None:
        row = (
            await conn.execute(select(accounts.c.balance, accounts.c.held).where(accounts.c.id == account_id))
        ).first()
        if row is None:
            raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
        raise InsufficientCredits(
            f"Insufficient credits: a debit of {format_credits(-amount)} exceeds the "
            f"{format_credits(row.balance - row.held)} credits available",
            should_retry=False,
        )
    return await append_entry(
        conn, account_id=account_id, amount=amount, kind=kind, balance_after=int(after.balance),
        reversed_after=int(after.reversed), idempotency_key=idempotency_key, request_id=request_id, key_id=key_id,
        memo=memo,
    )


async def reversed_under(conn: AsyncConnection, account_id: str, prefix: str) -> int:
    """What the account's reversal rows whose idempotency key starts with ``prefix`` took
    back, net of reinstatements (positive: credit taken)."""
    q = select(func.coalesce(func.sum(ledger.c.amount), 0)).where(
        ledger.c.account_id == account_id,
        ledger.c.kind == "reversal",
        ledger.c.idempotency_key.startswith(prefix, autoescape=True),
    )
    return -int((await conn.execute(q)).scalar_one())


async def post_reversal(
    conn: AsyncConnection, *, account_id: str, amount: int, idempotency_key: str, memo: str | None = None
) -> LedgerEntry:
    """Take ``amount`` (> 0) back from the balance, or with a negative ``amount`` give it back
    (a dispute won; zero: a dispute won before it was taken, settled at nothing), moving
    ``accounts.reversed`` the other way: the only posting that may
    leave the balance below what is held, or below zero, and only by what was reversed
    (the CHECK ``balance + reversed >= held`` holds it there). The caller holds the
    account's row lock and has decided the amount from the ledger under it."""
    after = (
        await conn.execute(
            update(accounts)
            .where(accounts.c.id == account_id)
            .values(balance=accounts.c.balance - amount, reversed=accounts.c.reversed + amount)
            .returning(accounts.c.balance, accounts.c.reversed)
        )
    ).first()
    if after is None:
        raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
    return await append_entry(
        conn, account_id=account_id, amount=-amount, kind="reversal", balance_after=int(after.balance),
        reversed_after=int(after.reversed), idempotency_key=idempotency_key, memo=memo,
    )


async def append_entry(
    conn: AsyncConnection,
    *,
    account_id: str,
    amount: int,
    kind: str,
    balance_after: int,
    idempotency_key: str,
    request_id: str | None = None,
    key_id: str | None = None,
    memo: str | None = None,
    reversed_after: int = 0,
) -> LedgerEntry:
    """Append a ledger row for a balance change the caller already made in ``conn``."""
    values = {
        "account_id": account_id,
        "kind": kind,
        "amount": amount,
        "balance_after": balance_after,
        "reversed_after": reversed_after,
        "idempotency_key": idempotency_key,
        "request_id": request_id,
        "key_id": key_id,
        "memo": memo,
        "created_at": utcnow(),
    }
    new_id = (await conn.execute(insert(ledger).values(**values).returning(ledger.c.id))).scalar_one()
    return entry_from_row(SimpleNamespace(id=new_id, **values))


async def run_idempotent(
    db: Database,
    idempotency_key: str,
    body: Callable[[AsyncConnection], Awaitable[T]],
    on_existing: Callable[[LedgerEntry], T],
    *,
    precheck: bool = True,
) -> T:
    """Run ``body`` in a write transaction unless ``idempotency_key`` is already used.

    If a ledger row with the key exists (before, or because a concurrent transaction
    committed it first and ours hit the unique index), return ``on_existing(row)`` instead.
    ``precheck=False`` skips the lookup before ``body`` for callers whose body detects a
    repeat by itself (settlement: its hold row is gone), saving a query on the hot path.
    """
    try:
        async with db.write() as conn:
            if precheck:
                existing = await find_entry(conn, idempotency_key)
                if existing is not None:
                    return on_existing(existing)
            return await body(conn)
    except IntegrityError:
        async with db.read() as conn:
            existing = await find_entry(conn, idempotency_key)
        if existing is None:
            raise
        return on_existing(existing)
