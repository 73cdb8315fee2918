"""Migration 0014 on SQLite and PostgreSQL with data in it: every account becomes an
organization whose console users are its owners, sessions work in that organization,
keys keep working (no creator recorded for old keys)."""

from __future__ import annotations

from datetime import datetime

from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection

from mesh.store import Database, head_revision
from mesh.store.database import alembic_config


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


async def test_0014_turns_each_account_into_an_organization(database_url: str) -> None:
    db = Database(database_url)
    try:
        async with db.write() as conn:
            await conn.run_sync(_upgrade, "0013")
        async with db.write() as conn:
            now = datetime(2026, 12, 1)  # naive: the raw column type on both dialects
            for n in (1, 2):
                await conn.execute(text("INSERT INTO accounts (id, name, balance, held, created_at) "
                                        "VALUES (:id, :name, 0, 0, :t)"),
                                   {"id": f"acct_{n}", "name": f"a{n}", "t": now})
                await conn.execute(text(
                    "INSERT INTO console_users (id, email, password_hash, account_id, is_admin, playground_key_id, "
                    "created_at, password_changed_at) VALUES (:id, :email, 'x', :acct, false, NULL, "
                    ":t, :t)"),
                    {"id": f"u{n}", "email": f"u{n}@example.com", "acct": f"acct_{n}", "t": now})
            await conn.execute(text(
                "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, spent, held, created_at) "
                "VALUES ('key_1', 'acct_1', 'k', 'sk-mesh-xxxx', 'h1', 0, 0, :t)"), {"t": now})
            await conn.execute(text(
                "INSERT INTO console_sessions (token_hash, user_id, csrf_token, created_at, expires_at) "
                "VALUES ('s1', 'u2', 'c', :t, :t)"), {"t": now})
        await db.migrate()
        assert await db.current_revision() == head_revision()
        async with db.read() as conn:
            members = sorted(
                tuple(r) for r in await conn.execute(text("SELECT user_id, account_id, role FROM memberships"))
            )
            session_org = (await conn.execute(text("SELECT account_id FROM console_sessions"))).scalar_one()
            creator = (await conn.execute(text("SELECT created_by FROM api_keys"))).scalar_one()
            unverified = (await conn.execute(
                text("SELECT count(*) FROM console_users WHERE email_verified_at IS NULL"))).scalar_one()
        assert members == [("u1", "acct_1", "owner"), ("u2", "acct_2", "owner")]
        assert session_org == "acct_2"
        assert creator is None
        assert unverified == 0  # earlier sign-ups are not locked out by verification
    finally:
        await db.aclose()
