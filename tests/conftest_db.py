"""Database and Redis fixtures on real services: SQLite files and fresh PostgreSQL databases.

``db`` is parametrized over ``sqlite`` (a temp file) and ``postgresql`` (a new database
``mesh_test_<random>`` on 127.0.0.1:5432, dropped afterwards); both are migrated to head.
PostgreSQL is reached as the first role of ``postgres``/``root`` that can log in to the
``test`` database.
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


class _Postgres:
    """The role that works, and a migrated template database to copy for each test."""

    def __init__(self, user: str, template: str) -> None:
        self.user = user
        self.template = template

    def url(self, name: str) -> str:
        return f"postgresql://{self.user}@{PG_HOST}:{PG_PORT}/{name}"

    async def create(self, *, migrated: bool) -> str:
        name = f"mesh_test_{secrets.token_hex(6)}"
        template = f' TEMPLATE "{self.template}"' if migrated else ""
        conn = await _pg_admin(self.user)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"{template}')
        finally:
            await conn.close()
        return name

    async def drop(self, name: str) -> None:
        conn = await _pg_admin(self.user)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture(scope="session")
async def _postgres() -> AsyncIterator[_Postgres | None]:
    user = await _pg_role()
    if user is None:
        yield None
        return
    pg = _Postgres(user, "")
    pg.template = await pg.create(migrated=False)
    database = Database(pg.url(pg.template))
    try:
        await database.migrate()
    finally:
        await database.aclose()
    try:
        yield pg
    finally:
        await pg.drop(pg.template)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, _postgres: _Postgres | None) -> str:
    """``sqlite`` or ``postgresql``; skips (or, in CI, fails) when PostgreSQL is down."""
    if request.param == "postgresql" and _postgres is None:
        _unavailable(request, PG_SKIP_REASON)
    return str(request.param)


async def _fresh(backend: str, pg: _Postgres | None, tmp_path: Path, *, migrated: bool) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/mesh.db"
        return
    assert pg is not None
    name = await pg.create(migrated=migrated)
    try:
        yield pg.url(name)
    finally:
        await pg.drop(name)


@pytest.fixture
async def database_url(backend: str, _postgres: _Postgres | None, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a fresh, empty (un-migrated) database of each kind."""
    async for url in _fresh(backend, _postgres, tmp_path, migrated=False):
        yield url


@pytest.fixture
async def db(backend: str, _postgres: _Postgres | None, tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated :class:`Database` on each backend (PostgreSQL: a copy of a migrated
    template, which is faster than migrating), closed after the test."""
    async for url in _fresh(backend, _postgres, tmp_path, migrated=True):
        database = Database(url)
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
    if _not_run:
        terminalreporter.section("services not available", sep="-", yellow=True)
    for reason, nodeids in _not_run.items():
        terminalreporter.write_line(f"{reason}: {len(nodeids)} tests skipped:")
        for nodeid in nodeids:
            terminalreporter.write_line(f"  {nodeid}")
