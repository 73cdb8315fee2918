"""Memberships on SQLite and PostgreSQL: roles, the last owner, removal ending sessions,
and two owners demoting each other at once (one of them must stay owner)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import insert

from mesh.accounts.members import LastOwner, Members
from mesh.accounts.service import Accounts
from mesh.console.sessions import Sessions
from mesh.console.tables import console_users
from mesh.errors import InvalidRequest, NotFound
from mesh.store import Database, utcnow


async def _person(db: Database, name: str, account_id: str) -> str:
    now = utcnow()
    async with db.write() as conn:
        await conn.execute(insert(console_users).values(
            id=f"user_{name}", email=f"{name}@example.com", password_hash="x", account_id=account_id,
            is_admin=False, playground_key_id=None, created_at=now, password_changed_at=now))
    return f"user_{name}"


async def _org(db: Database) -> tuple[Members, str, str]:
    members = Members(db)
    seed = await Accounts(db).create("seed")
    alice = await _person(db, "alice", seed.id)
    org = await members.create_organization(alice, "Acme")
    return members, org, alice


async def test_the_last_owner_stays(db: Database) -> None:
    members, org, alice = await _org(db)
    with pytest.raises(LastOwner):
        await members.set_role(org, alice, "admin")
    with pytest.raises(LastOwner):
        await members.remove(org, alice)
    with pytest.raises(InvalidRequest):
        await members.set_role(org, alice, "emperor")
    with pytest.raises(NotFound):
        await members.set_role(org, "user_nobody", "viewer")
    assert (await members.get(org, alice)).role == "owner"  # type: ignore[union-attr]


async def test_removal_ends_the_members_sessions_in_that_organization(db: Database) -> None:
    members, org, _ = await _org(db)
    bob = await _person(db, "bob", org)
    assert await members.add(org, bob, "developer")
    assert not await members.add(org, bob, "admin")  # already a member: role unchanged
    other = await members.create_organization(bob, "Bob's own")
    sessions = Sessions(db, timedelta(hours=1))
    here, there = await sessions.create(bob, org), await sessions.create(bob, other)
    assert (await sessions.load(here)).role == "developer"  # type: ignore[union-attr]
    await members.remove(org, bob)
    assert await sessions.load(here) is None
    assert (await sessions.load(there)).role == "owner"  # type: ignore[union-attr]


async def test_two_owners_demoting_each_other_at_once_leave_one_owner(db: Database) -> None:
    members, org, alice = await _org(db)
    bob = await _person(db, "bob", org)
    await members.add(org, bob, "owner")
    results = await asyncio.gather(members.set_role(org, alice, "viewer"), members.set_role(org, bob, "viewer"),
                                   return_exceptions=True)
    assert sum(isinstance(r, LastOwner) for r in results) == 1, results
    roles = sorted(m.role for m in await members.of_account(org))
    assert roles == ["owner", "viewer"]
