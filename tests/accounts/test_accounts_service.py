"""Accounts and keys in the database; the secret is never stored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from mesh.accounts.keys import hash_key
from mesh.accounts.service import Accounts
from mesh.billing.money import MicroCredits
from mesh.errors import InvalidRequest, NotFound
from mesh.store import Database
from mesh.store.tables import api_keys, metadata


async def test_create_and_get_account(db: Database) -> None:
    accounts = Accounts(db)
    a = await accounts.create("  Acme  ")
    assert a.id.startswith("acct_") and a.name == "Acme"
    got = await accounts.get(a.id)
    assert (got.balance, got.held, got.available) == (0, 0, 0)
    assert got.created_at.tzinfo is not None
    assert [x.id for x in await accounts.list_accounts()] == [a.id]
    assert await accounts.count() == 1


async def test_account_errors(db: Database) -> None:
    accounts = Accounts(db)
    with pytest.raises(InvalidRequest):
        await accounts.create("  ")
    with pytest.raises(InvalidRequest):
        await accounts.create("x" * 201)
    with pytest.raises(NotFound) as exc:
        await accounts.get("acct_missing")
    assert exc.value.code == "account_not_found"


async def test_create_key_returns_secret_once(db: Database) -> None:
    accounts = Accounts(db)
    a = await accounts.create("a")
    expires = datetime.now(UTC) + timedelta(days=3)
    created = await accounts.create_key(
        a.id, name="ci", allowed_models=["m2", "m1", "m1"], expires_at=expires, spend_limit=MicroCredits(5)
    )
    assert created.key.startswith("sk-mesh-")
    assert created.key not in repr(created)
    info = created.info
    assert info.id.startswith("key_") and info.prefix == created.key[:12]
    assert info.allowed_models == ("m1", "m2") and info.spend_limit == 5
    listed = await accounts.list_keys(a.id)
    assert [k.id for k in listed] == [info.id]
    assert listed[0].expires_at == expires.replace(microsecond=expires.microsecond)
    assert (await accounts.get_key(info.id)).prefix == info.prefix
    async with db.read() as conn:
        stored = (await conn.execute(select(api_keys.c.key_hash))).scalar_one()
    assert stored == hash_key(created.key)


def _sqlite_files(database: str) -> str:
    """The database file and its WAL and shared-memory files, as text."""
    paths = [Path(database + suffix) for suffix in ("", "-wal", "-shm")]
    return "".join(p.read_bytes().decode("latin-1") for p in paths if p.exists())


async def test_full_key_appears_nowhere_in_the_database(db: Database) -> None:
    accounts = Accounts(db)
    a = await accounts.create("a")
    keys = [(await accounts.create_key(a.id, name=f"k{i}")).key for i in range(3)]
    dump: list[str] = []
    async with db.read() as conn:
        for table in metadata.sorted_tables:
            for row in await conn.execute(select(table)):
                dump.append(repr(tuple(row)))
        if db.dialect == "postgresql":
            rows = await conn.execute(text("SELECT * FROM api_keys"))
            dump.extend(repr(tuple(r)) for r in rows)
    blob = "\n".join(dump)
    if db.is_sqlite:
        assert db.url.database is not None
        blob += _sqlite_files(db.url.database)
    for key in keys:
        assert key not in blob
        assert key[12:] not in blob  # not even the secret part
        assert key[:12] in blob  # the prefix is stored, for listings


async def test_create_key_errors(db: Database) -> None:
    accounts = Accounts(db)
    a = await accounts.create("a")
    with pytest.raises(NotFound):
        await accounts.create_key("acct_missing")
    with pytest.raises(InvalidRequest):
        await accounts.create_key(a.id, allowed_models=[" "])
    with pytest.raises(InvalidRequest):
        await accounts.create_key(a.id, expires_at=datetime(2030, 1, 1))  # naive
    with pytest.raises(InvalidRequest):
        await accounts.create_key(a.id, spend_limit=MicroCredits(-1))
    with pytest.raises(NotFound):
        await accounts.get_key("key_missing")
