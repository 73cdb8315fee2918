"""Authenticating keys: answers, the cache, revocation and cross-process invalidation."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from mesh.accounts.auth import KeyAuthenticator
from mesh.accounts.invalidation import RedisInvalidator
from mesh.accounts.keys import generate_key
from mesh.accounts.principal import Principal
from mesh.accounts.service import Accounts
from mesh.errors import AuthenticationFailed, NotFound
from mesh.store import Database
from mesh.store.tables import api_keys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextmanager
def count_queries(db: Database) -> Iterator[list[str]]:
    seen: list[str] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement != "BEGIN":  # SQLite's transaction start, issued by Mesh itself
            seen.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", on_execute)


async def _key(db: Database, **kw: Any) -> tuple[str, str, str]:
    accounts = Accounts(db)
    a = await accounts.create("a")
    created = await accounts.create_key(a.id, **kw)
    return a.id, created.info.id, created.key


async def _fails(auth: KeyAuthenticator, key: str | None, message: str) -> None:
    with pytest.raises(AuthenticationFailed) as exc:
        await auth.authenticate(key)
    assert exc.value.message == message
    assert exc.value.status == 401
    if key:
        assert key not in str(exc.value)


async def test_authenticate_success_builds_principal(db: Database) -> None:
    account_id, key_id, key = await _key(db, allowed_models=["m1"])
    auth = KeyAuthenticator(db)
    p = await auth.authenticate(key)
    assert p == Principal(account_id=account_id, key_id=key_id, allowed_models=frozenset({"m1"}))
    assert p.may_use("m1") and not p.may_use("m2")
    assert Principal("a", "k").may_use("anything")


async def test_authenticate_failures(db: Database) -> None:
    auth = KeyAuthenticator(db)
    await _fails(auth, None, "Missing API key")
    await _fails(auth, "", "Missing API key")
    await _fails(auth, "not-a-key", "Invalid API key")
    await _fails(auth, generate_key(), "Invalid API key")


async def test_malformed_key_costs_no_query(db: Database) -> None:
    auth = KeyAuthenticator(db)
    with count_queries(db) as seen:
        await _fails(auth, "sk-mesh-short", "Invalid API key")
    assert seen == []


async def test_expired_key(db: Database) -> None:
    _, _, key = await _key(db, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    await _fails(KeyAuthenticator(db), key, "API key expired")


async def test_cached_key_expires_on_time(db: Database) -> None:
    _, _, key = await _key(db, expires_at=datetime.now(UTC) + timedelta(seconds=0.3))
    auth = KeyAuthenticator(db)
    await auth.authenticate(key)
    await asyncio.sleep(0.35)
    await _fails(auth, key, "API key expired")


async def test_cache_hit_costs_no_query(db: Database) -> None:
    _, _, key = await _key(db)
    auth = KeyAuthenticator(db)
    with count_queries(db) as seen:
        await auth.authenticate(key)
        first = len(seen)
        for _ in range(100):
            await auth.authenticate(key)
    assert first == 1
    assert len(seen) == 1


async def test_cache_entry_expires_after_ttl(db: Database) -> None:
    _, _, key = await _key(db)
    clock = Clock()
    auth = KeyAuthenticator(db, ttl=30, clock=clock)
    with count_queries(db) as seen:
        await auth.authenticate(key)
        clock.now += 29
        await auth.authenticate(key)
        assert len(seen) == 1
        clock.now += 2
        await auth.authenticate(key)
        assert len(seen) == 2


async def test_unknown_key_is_cached_briefly(db: Database) -> None:
    clock = Clock()
    auth = KeyAuthenticator(db, negative_ttl=5, clock=clock)
    unknown = generate_key()
    with count_queries(db) as seen:
        await _fails(auth, unknown, "Invalid API key")
        await _fails(auth, unknown, "Invalid API key")
        assert len(seen) == 1
        clock.now += 6
        await _fails(auth, unknown, "Invalid API key")
        assert len(seen) == 2


async def test_concurrent_misses_share_one_lookup(db: Database) -> None:
    _, _, key = await _key(db)
    auth = KeyAuthenticator(db)
    with count_queries(db) as seen:
        results = await asyncio.gather(*(auth.authenticate(key) for _ in range(50)))
    assert len({r.key_id for r in results}) == 1
    assert len(seen) == 1


async def test_revocation_takes_effect_at_once(db: Database) -> None:
    _, key_id, key = await _key(db)
    auth = KeyAuthenticator(db, ttl=3600)
    await auth.authenticate(key)  # now cached
    assert await auth.revoke(key_id) is True
    await _fails(auth, key, "API key revoked")
    assert await auth.revoke(key_id) is False
    with pytest.raises(NotFound):
        await auth.revoke("key_missing")


async def test_last_used_is_written_in_batches(db: Database) -> None:
    _, _, key = await _key(db)
    clock = Clock()
    auth = KeyAuthenticator(db, touch_interval=60, clock=clock)
    for _ in range(20):
        await auth.authenticate(key)
    async with db.read() as conn:
        before = (await conn.execute(select(api_keys.c.last_used_at))).scalar_one()
    assert before is None  # nothing written on the request path
    assert await auth.flush_last_used() == 1
    assert await auth.flush_last_used() == 0
    async with db.read() as conn:
        stamped = (await conn.execute(select(api_keys.c.last_used_at))).scalar_one()
    assert stamped is not None and abs((datetime.now(UTC) - stamped).total_seconds()) < 60
    clock.now += 30
    await auth.authenticate(key)
    assert await auth.flush_last_used() == 0  # at most once a minute per key
    clock.now += 31
    await auth.authenticate(key)
    assert await auth.flush_last_used() == 1
    await auth.aclose()


async def test_background_flusher_writes_last_used(db: Database) -> None:
    _, _, key = await _key(db)
    auth = KeyAuthenticator(db, touch_interval=0.05)
    await auth.start()
    try:
        await auth.authenticate(key)
        for _ in range(100):
            async with db.read() as conn:
                if (await conn.execute(select(api_keys.c.last_used_at))).scalar_one() is not None:
                    break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("last_used_at was never written")
    finally:
        await auth.aclose()


async def test_redis_invalidation_reaches_another_process(db: Database, redis_url: str) -> None:
    _, key_id, key = await _key(db)
    channel = f"mesh:test:{secrets.token_hex(4)}"
    a = KeyAuthenticator(db, redis_url=redis_url, channel=channel, ttl=3600)
    b = KeyAuthenticator(db, redis_url=redis_url, channel=channel, ttl=3600)
    await a.start()
    await b.start()
    try:
        await a.authenticate(key)
        await b.authenticate(key)  # cached for an hour in "process" b
        await a.revoke(key_id)
        for _ in range(200):
            try:
                await b.authenticate(key)
            except AuthenticationFailed as exc:
                assert exc.message == "API key revoked"
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("b never heard of the revocation")
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_publish_failure_is_reported_not_raised() -> None:
    dropped: list[str] = []
    inv = RedisInvalidator("redis://127.0.0.1:1/0", dropped.append)
    try:
        assert await inv.publish("key_x") is False
    finally:
        await inv.aclose()
