"""Redeem codes: single-use vouchers worth a fixed number of credits.

Operators mint codes like ``MESH-7KQ2-XW9D-4HNP`` (12 random characters from a 32-letter
alphabet without look-alikes: 60 bits). Only a code's SHA-256 and its first block are
stored. Redeeming is a conditional update (``redeemed_at IS NULL``) plus a ``redeem``
ledger row in one transaction, so a code credits exactly one account exactly once however
many attempts race.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mesh.billing.entries import LedgerEntry, post, run_idempotent
from mesh.billing.money import MicroCredits
from mesh.errors import InvalidRequest, NotFound
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, redeem_codes

ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
CODE_SCHEME = "MESH"
GROUPS = 3
GROUP_LENGTH = 4
MAX_MINT = 1000
INVALID_CODE = "invalid_redeem_code"


@dataclass(frozen=True, slots=True)
class MintedCode:
    """A new code: ``code`` is the only copy, to hand to the customer."""

    code: str = field(repr=False)
    prefix: str
    amount: MicroCredits
    created_at: datetime


def generate_code() -> str:
    groups = ["".join(secrets.choice(ALPHABET) for _ in range(GROUP_LENGTH)) for _ in range(GROUPS)]
    return "-".join([CODE_SCHEME, *groups])


def normalize_code(text: str) -> str | None:
    """The canonical ``MESH-XXXX-XXXX-XXXX`` form of what a customer typed, or ``None``.

    Case, spaces and dashes do not matter.
    """
    compact = "".join(c for c in text.upper() if c not in " -\t")
    body = compact.removeprefix(CODE_SCHEME)
    if len(body) != GROUPS * GROUP_LENGTH or not compact.startswith(CODE_SCHEME):
        return None
    if any(c not in ALPHABET for c in body):
        return None
    groups = [body[i : i + GROUP_LENGTH] for i in range(0, len(body), GROUP_LENGTH)]
    return "-".join([CODE_SCHEME, *groups])


def hash_code(code: str) -> str:
    return hashlib.sha256(code.encode("ascii")).hexdigest()


def _invalid() -> InvalidRequest:
    return InvalidRequest("Invalid or already redeemed code", param="code", code=INVALID_CODE)


class RedeemCodes:
    """Mint and redeem codes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def mint(self, amount: MicroCredits, count: int = 1) -> list[MintedCode]:
        """Create ``count`` (1 to 1000) codes worth ``amount`` (> 0) micro-credits each."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError("amount is int micro-credits")
        if amount <= 0:
            raise InvalidRequest("amount must be positive", param="amount")
        if not 1 <= count <= MAX_MINT:
            raise InvalidRequest(f"count must be between 1 and {MAX_MINT}", param="count")
        now = utcnow()
        codes = [generate_code() for _ in range(count)]
        minted = [MintedCode(c, c[: len(CODE_SCHEME) + 1 + GROUP_LENGTH], amount, now) for c in codes]
        async with self.db.write() as conn:
            await conn.execute(
                insert(redeem_codes),
                [
                    {"code_hash": hash_code(m.code), "prefix": m.prefix, "amount": amount, "created_at": now}
                    for m in minted
                ],
            )
        return minted

    async def redeem(self, account_id: str, code: str) -> LedgerEntry:
        """Credit the code's amount to the account, once; returns the ``redeem`` ledger row.

        Raises ``InvalidRequest`` (code ``invalid_redeem_code``) for an unknown or used
        code, and ``NotFound`` for an unknown account (the code then stays unused).
        """
        canonical = normalize_code(code)
        if canonical is None:
            raise _invalid()
        code_hash = hash_code(canonical)

        async def body(conn: AsyncConnection) -> LedgerEntry:
            if (await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id))).first() is None:
                raise NotFound(f"Account {account_id!r} not found", code="account_not_found")
            claimed = await conn.execute(
                update(redeem_codes)
                .where(redeem_codes.c.code_hash == code_hash, redeem_codes.c.redeemed_at.is_(None))
                .values(redeemed_by=account_id, redeemed_at=utcnow())
                .returning(redeem_codes.c.amount)
            )
            amount = claimed.scalar_one_or_none()
            if amount is None:
                raise _invalid()
            return await post(
                conn,
                account_id=account_id,
                amount=int(amount),
                kind="redeem",
                idempotency_key=f"redeem:{code_hash}",
                memo=f"code {canonical[: len(CODE_SCHEME) + 1 + GROUP_LENGTH]}",
            )

        def existing(_: LedgerEntry) -> LedgerEntry:
            raise _invalid()

        return await run_idempotent(self.db, f"redeem:{code_hash}", body, existing)
