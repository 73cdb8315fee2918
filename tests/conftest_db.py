"""Database and Redis fixtures on real services: SQLite files and fresh PostgreSQL databases.

``db`` is parametrized over ``sqlite`` (a temp file) and ``postgresql`` (a new database
``mesh_test_<random>`` on 127.0.0.1:5432, dropped afterwards); both are migrated to head.
``database_url`` is the same, un-migrated, as a URL (for CLI tests). ``redis_url`` points
at 127.0.0.1:6379.

If a service is unreachable its tests are skipped with a plain reason and listed at the
end of the run; with ``MESH_TEST_REQUIRE_SERVICES=1`` (CI) they fail instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from mesh.store import Database

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_DB = "test"
PG_ROLES = ("postgres", "root")
PG_SKIP_REASON = "PostgreSQL not reachable on 127.0.0.1:5432: postgresql tests not run"
REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_SKIP_REASON = "Redis not reachable on 127.0.0.1:6379: redis tests not run"

_probe: dict[str, Any] = {}
_not_run: dict[str, list[str]] = {}


def _unavailable(request: pytest.FixtureRequest, reason: str) -> None:
    if os.environ.get("MESH_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (MESH_TEST_REQUIRE_SERVICES=1: this service is required)", pytrace=False)
    _not_run.setdefault(reason, []).append(request.node.nodeid)
    pytest.skip(reason)


async def _pg_admin(user: str) -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=user, database=PG_ADMIN_DB, timeout=5)


async def _pg_role() -> str | None:
    """The first role that can log in to the admin database, probed once per run."""
    if "pg_role" not in _probe:
        _probe["pg_role"] = None
        for user in PG_ROLES:
            try:
                conn = await _pg_admin(user)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                continue
            await conn.close()
            _probe["pg_role"] = user
            break
    role: str | None = _probe["pg_role"]
    return role


async def _redis_up() -> bool:
    if "redis" not in _probe:
        client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        try:
            _probe["redis"] = bool(await client.ping())
        except (OSError, aioredis.RedisError):
            _probe["redis"] = False
        finally:
            await client.aclose()
    return bool(_probe["redis"])


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL of a fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/mesh.db"
        return
    user = await _pg_role()
    if user is None:
        _unavailable(request, PG_SKIP_REASON)
        return
    name = f"mesh_test_{secrets.token_hex(6)}"
    conn = await _pg_admin(user)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        conn = await _pg_admin(user)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated :class:`Database` on each backend, closed after the test."""
    database = Database(database_url)
    try:
        await database.migrate()
        yield database
    finally:
        await database.aclose()


@pytest.fixture
async def redis_url(request: pytest.FixtureRequest) -> str:
    """Redis on 127.0.0.1:6379 (tests use their own channel names, so runs never collide)."""
    if not await _redis_up():
        _unavailable(request, REDIS_SKIP_REASON)
    return REDIS_URL


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for reason, nodeids in _not_run.items():
        terminalreporter.section("services not available", sep="-", yellow=True)
        terminalreporter.write_line(f"{reason}: {len(nodeids)} tests skipped:")
        for nodeid in nodeids:
            terminalreporter.write_line(f"  {nodeid}")
