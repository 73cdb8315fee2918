"""A throwaway database for a gateway process: a SQLite file, or a fresh PostgreSQL database."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest

import conftest_db


async def _admin_execute(sql: str) -> str | None:
    for user in conftest_db.PG_ROLES:
        try:
            conn = await asyncpg.connect(
                host=conftest_db.PG_HOST, port=conftest_db.PG_PORT, user=user,
                database=conftest_db.PG_ADMIN_DB, timeout=5,
            )
        except (OSError, asyncpg.PostgresError, TimeoutError):
            continue
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        return user
    return None


@contextmanager
def temporary_database(request: pytest.FixtureRequest, kind: str, workdir: Path) -> Iterator[str]:
    """Yield a database URL; PostgreSQL ones are created now and dropped after."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir}/mesh.db"
        return
    name = f"mesh_e2e_{secrets.token_hex(6)}"
    user = asyncio.run(_admin_execute(f'CREATE DATABASE "{name}"'))
    if user is None:
        conftest_db._unavailable(request, conftest_db.PG_SKIP_REASON)
        return
    try:
        yield f"postgresql://{user}@{conftest_db.PG_HOST}:{conftest_db.PG_PORT}/{name}"
    finally:
        asyncio.run(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
