"""Migration 0006: the stored console secret is deleted and the playground keys derived from
it are revoked (anyone who read the database could compute them)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection

from mesh.store import Database, head_revision
from mesh.store.database import alembic_config


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


async def test_0006_deletes_the_secret_and_revokes_derived_keys(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/mesh.db")
    try:
        async with db.write() as conn:
            await conn.run_sync(_upgrade, "0004")
        async with db.write() as conn:
            now = "2026-12-01 00:00:00.000000"
            await conn.execute(text("INSERT INTO console_secrets (name, value, created_at) VALUES ('console', :v, :t)"),
                               {"v": "ab" * 32, "t": now})
            await conn.execute(text("INSERT INTO accounts (id, name, balance, held, created_at) "
                                    "VALUES ('acct_1', 'a', 0, 0, :t)"), {"t": now})
            for key_id in ("key_play", "key_other"):
                await conn.execute(text(
                    "INSERT INTO api_keys (id, account_id, name, prefix, key_hash, spent, held, created_at) "
                    "VALUES (:id, 'acct_1', 'k', 'sk-mesh-xxxx', :h, 0, 0, :t)"), {"id": key_id, "h": key_id, "t": now})
            await conn.execute(text(
                "INSERT INTO console_users (id, email, password_hash, account_id, is_admin, playground_key_id, "
                "created_at, password_changed_at) VALUES ('u1', 'a@b.c', 'x', 'acct_1', 0, 'key_play', :t, :t)"),
                {"t": now})
        await db.migrate()
        assert await db.current_revision() == head_revision()
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM console_secrets"))).scalar_one() == 0
            revoked = dict((await conn.execute(text("SELECT id, revoked_at FROM api_keys"))).all())
        assert revoked["key_play"] is not None and revoked["key_other"] is None
    finally:
        await db.aclose()
