"""Migration 0008 on SQLite and PostgreSQL, with data in it: accounts and ledger rows survive,
the balance may go below zero only by ``reversed`` (and a ledger row only by its
``reversed_after``), every other negative balance is still refused, and 'reversal' rows are
a known kind."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from mesh.store import Database, head_revision
from mesh.store.database import alembic_config

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


async def _refused(db: Database, sql: str, **params: object) -> None:
    with pytest.raises(IntegrityError):
        async with db.write() as conn:
            await conn.execute(text(sql), params)


async def test_0008_keeps_data_and_lets_only_reversals_go_below_zero(database_url: str) -> None:
    db = Database(database_url)
    try:
        async with db.write() as conn:
            await conn.run_sync(_upgrade, "0007")
        async with db.write() as conn:
            await conn.execute(text("INSERT INTO accounts (id, name, balance, held, created_at) "
                                    "VALUES ('acct_1', 'a', 500, 100, :t)"), {"t": NOW})
            await conn.execute(text(
                "INSERT INTO ledger (account_id, kind, amount, balance_after, idempotency_key, created_at) "
                "VALUES ('acct_1', 'purchase', 500, 500, 'checkout:cs_1', :t)"), {"t": NOW})
        await db.migrate()
        assert await db.current_revision() == head_revision()
        async with db.read() as conn:
            row = (await conn.execute(text("SELECT balance, held, reversed FROM accounts"))).one()
            entry = (await conn.execute(text("SELECT amount, balance_after, reversed_after FROM ledger"))).one()
        assert tuple(row) == (500, 100, 0) and tuple(entry) == (500, 500, 0)

        # Without a reversal, nothing may take the balance below what is held, or below zero.
        await _refused(db, "UPDATE accounts SET balance = 99")
        await _refused(db, "UPDATE accounts SET balance = -1, held = 0")
        await _refused(db, "UPDATE accounts SET reversed = -1")
        await _refused(db, "INSERT INTO ledger (account_id, kind, amount, balance_after, idempotency_key, created_at)"
                           " VALUES ('acct_1', 'usage', -600, -100, 'usage:r1', :t)", t=NOW)
        await _refused(db, "INSERT INTO ledger (account_id, kind, amount, balance_after, idempotency_key, created_at)"
                           " VALUES ('acct_1', 'theft', -1, 499, 'x:1', :t)", t=NOW)
        # A reversal of 500 with 100 held: the balance goes to 0 (below held) and, as the
        # held request is charged, to -100; never below -reversed.
        async with db.write() as conn:
            await conn.execute(text("UPDATE accounts SET balance = 0, reversed = 500"))
            await conn.execute(text(
                "INSERT INTO ledger (account_id, kind, amount, balance_after, reversed_after, idempotency_key, "
                "created_at) VALUES ('acct_1', 'reversal', -500, 0, 500, 'refund:pay_1:500', :t)"), {"t": NOW})
            await conn.execute(text("UPDATE accounts SET balance = -100, held = 0"))
        await _refused(db, "UPDATE accounts SET balance = -501")
        await _refused(db, "UPDATE accounts SET held = 401")  # -100 + 500 covers at most 400 held
        await _refused(db, "INSERT INTO ledger (account_id, kind, amount, balance_after, reversed_after, "
                           "idempotency_key, created_at) VALUES ('acct_1', 'usage', -1, -501, 500, 'usage:r2', :t)",
                       t=NOW)
        async with db.read() as conn:
            assert tuple((await conn.execute(text("SELECT balance, held, reversed FROM accounts"))).one()) == (
                -100, 0, 500)
    finally:
        await db.aclose()
