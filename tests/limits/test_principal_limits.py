"""The principal carries its key's and account's effective limits, read with the key in
one query; a change reaches this process at once and other processes through Redis."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from sqlalchemy import event

from mesh.accounts.auth import KeyAuthenticator
from mesh.accounts.service import Accounts
from mesh.config import LimitsConfig, RateLimitConfig
from mesh.errors import InvalidRequest, NotFound
from mesh.limits import RateLimits, Scope
from mesh.store import Database

DEFAULTS = LimitsConfig(key=RateLimitConfig(rpm=60), account=RateLimitConfig(tpm=100_000, concurrent=10))


async def test_principal_limits_come_with_the_key_in_one_query(db: Database) -> None:
    accounts = Accounts(db)
    acct = await accounts.create("limited")
    created = await accounts.create_key(acct.id, rate_limits={"tpm": 500, "rpm": None})
    await accounts.set_account_limits(acct.id, {"concurrent": 0, "rpm": 1000})
    auth = KeyAuthenticator(db, limits=DEFAULTS)
    statements: list[str] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement != "BEGIN":
            statements.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", on_execute)
    try:
        p = await auth.authenticate(created.key)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", on_execute)
    assert len(statements) == 1
    assert p.limits == (
        Scope("key", created.info.id, acct.id, RateLimits(rpm=60, tpm=500)),
        Scope("account", acct.id, acct.id, RateLimits(rpm=1000, tpm=100_000)),  # concurrent 0: lifted
    )
    assert created.info.rate_limits == {"tpm": 500}


async def test_no_limits_anywhere_means_no_scopes(db: Database) -> None:
    accounts = Accounts(db)
    acct = await accounts.create("free")
    created = await accounts.create_key(acct.id)
    assert (await KeyAuthenticator(db).authenticate(created.key)).limits == ()


async def test_changes_replace_the_cached_principal(db: Database) -> None:
    accounts = Accounts(db)
    acct = await accounts.create("changing")
    one, two = await accounts.create_key(acct.id), await accounts.create_key(acct.id)
    auth = KeyAuthenticator(db, ttl=3600)
    assert (await auth.authenticate(one.key)).limits == ()
    assert (await auth.authenticate(two.key)).limits == ()
    await accounts.set_account_limits(acct.id, {"rpm": 7})
    assert (await auth.authenticate(one.key)).limits == ()  # still the cached copy ...
    assert await auth.account_changed(acct.id) == 2  # ... until told
    for k in (one, two):
        (scope,) = (await auth.authenticate(k.key)).limits
        assert scope.kind == "account" and scope.limits == RateLimits(rpm=7)
    info = await accounts.set_key_limits(one.info.id, {"concurrent": 2})
    assert info.rate_limits == {"concurrent": 2}
    await auth.key_changed(one.info.id)
    assert [s.limits for s in (await auth.authenticate(one.key)).limits] == [
        RateLimits(concurrent=2),
        RateLimits(rpm=7),
    ]
    assert (await accounts.set_account_limits(acct.id, None)).rate_limits is None
    await auth.account_changed(acct.id)
    assert len((await auth.authenticate(one.key)).limits) == 1


async def test_bad_limits_are_refused(db: Database) -> None:
    accounts = Accounts(db)
    acct = await accounts.create("bad")
    for bad in ({"rpm": -1}, {"tpm": True}, {"concurrent": 1.5}, {"rph": 3}, {"rpm": 10**13}):
        with pytest.raises(InvalidRequest):
            await accounts.set_account_limits(acct.id, bad)  # type: ignore[arg-type]  # bad on purpose
        with pytest.raises(InvalidRequest):
            await accounts.create_key(acct.id, rate_limits=bad)  # type: ignore[arg-type]  # bad on purpose
    with pytest.raises(NotFound):
        await accounts.set_account_limits("acct_missing", {"rpm": 1})
    with pytest.raises(NotFound):
        await accounts.set_key_limits("key_missing", {"rpm": 1})


async def test_a_change_reaches_another_process_through_redis(db: Database, redis_url: str) -> None:
    accounts = Accounts(db)
    acct = await accounts.create("shared")
    created = await accounts.create_key(acct.id)
    channel = f"mesh-test-{secrets.token_hex(4)}:keys:invalidate"
    a = KeyAuthenticator(db, redis_url=redis_url, channel=channel, ttl=3600)
    b = KeyAuthenticator(db, redis_url=redis_url, channel=channel, ttl=3600)
    await a.start()
    await b.start()
    try:
        assert (await b.authenticate(created.key)).limits == ()  # cached for an hour in b
        await accounts.set_account_limits(acct.id, {"rpm": 3})
        await a.account_changed(acct.id)
        for _ in range(100):
            if (await b.authenticate(created.key)).limits:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("b never heard of the change")
    finally:
        await a.aclose()
        await b.aclose()
