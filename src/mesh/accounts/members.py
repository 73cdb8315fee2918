"""Organizations and their members: who belongs where, with which role.

An organization is an ``accounts`` row (its id stays the billing id everywhere); a person
(console user) belongs to any number of them through ``memberships``. Every change that
could leave an organization without an owner locks the organization's row first, so two
owners demoting each other at once cannot both succeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mesh.accounts.keys import new_id
from mesh.accounts.roles import Role, is_role
from mesh.console.tables import console_sessions, console_users, invitations, memberships, sso_settings
from mesh.errors import InvalidRequest, NotFound, PermissionDenied
from mesh.store import Database, utcnow
from mesh.store.tables import accounts, api_keys


@dataclass(frozen=True, slots=True)
class Membership:
    user_id: str
    email: str
    account_id: str
    account_name: str
    role: Role
    created_at: datetime


def _membership(row: Any) -> Membership:
    return Membership(
        user_id=row.user_id,
        email=row.email,
        account_id=row.account_id,
        account_name=row.name,
        role=row.role,
        created_at=row.created_at,
    )


_JOINED = (
    select(memberships.c.user_id, console_users.c.email, memberships.c.account_id, accounts.c.name,
           memberships.c.role, memberships.c.created_at)
    .join(console_users, console_users.c.id == memberships.c.user_id)
    .join(accounts, accounts.c.id == memberships.c.account_id)
)


class LastOwner(PermissionDenied):
    def __init__(self) -> None:
        super().__init__("An organization keeps at least one owner: make someone else owner first.",
                         code="last_owner")


class Members:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def of_user(self, user_id: str) -> list[Membership]:
        """The organizations the user belongs to, by name."""
        q = _JOINED.where(memberships.c.user_id == user_id).order_by(accounts.c.name, accounts.c.id)
        async with self.db.read() as conn:
            return [_membership(r) for r in await conn.execute(q)]

    async def of_account(self, account_id: str) -> list[Membership]:
        q = _JOINED.where(memberships.c.account_id == account_id).order_by(console_users.c.email)
        async with self.db.read() as conn:
            return [_membership(r) for r in await conn.execute(q)]

    async def get(self, account_id: str, user_id: str) -> Membership | None:
        q = _JOINED.where(memberships.c.account_id == account_id, memberships.c.user_id == user_id)
        async with self.db.read() as conn:
            row = (await conn.execute(q)).first()
        return None if row is None else _membership(row)

    async def create_organization(self, user_id: str, name: str) -> str:
        """A new organization with a zero balance, the user its only owner; returns its id."""
        name = name.strip()
        if not name or len(name) > 200:
            raise InvalidRequest("Name the organization (at most 200 characters).", param="name")
        account_id = new_id("acct")
        now = utcnow()
        async with self.db.write() as conn:
            await conn.execute(insert(accounts).values(id=account_id, name=name, balance=0, held=0, created_at=now))
            await add_member(conn, user_id, account_id, "owner")
        return account_id

    async def add(self, account_id: str, user_id: str, role: Role) -> bool:
        """Add the user with ``role``; ``False`` if already a member (their role stays)."""
        async with self.db.write() as conn:
            if await _role(conn, account_id, user_id) is not None:
                return False
            await add_member(conn, user_id, account_id, role)
        return True

    async def set_role(self, account_id: str, user_id: str, role: str) -> Membership:
        if not is_role(role):
            raise InvalidRequest(f"Unknown role {role!r}.", param="role")
        async with self.db.write() as conn:
            await _lock(conn, account_id)
            current = await _role(conn, account_id, user_id)
            if current is None:
                raise NotFound("There is no such member.", code="member_not_found")
            if current == "owner" and role != "owner" and await _owners(conn, account_id) <= 1:
                raise LastOwner()
            await conn.execute(
                update(memberships)
                .where(memberships.c.account_id == account_id, memberships.c.user_id == user_id)
                .values(role=role)
            )
        found = await self.get(account_id, user_id)
        assert found is not None
        return found

    async def remove(self, account_id: str, user_id: str) -> Membership:
        """Remove the member and end their sessions in this organization, at once.

        Keys they created stay with the organization (``api_keys.created_by`` still names
        them) until someone revokes them.
        """
        found = await self.get(account_id, user_id)
        async with self.db.write() as conn:
            await _lock(conn, account_id)
            current = await _role(conn, account_id, user_id)
            if current is None or found is None:
                raise NotFound("There is no such member.", code="member_not_found")
            if current == "owner" and await _owners(conn, account_id) <= 1:
                raise LastOwner()
            await conn.execute(
                delete(memberships).where(memberships.c.account_id == account_id, memberships.c.user_id == user_id)
            )
            await conn.execute(
                delete(console_sessions).where(
                    console_sessions.c.user_id == user_id, console_sessions.c.account_id == account_id
                )
            )
        return found


    async def delete_organization(self, account_id: str) -> list[str]:
        """Close the organization: every member and pending invitation goes, every session in
        it ends. The ``accounts`` row and its ledger stay (the books keep their history);
        refused while credit is left. Returns the ids of its live keys, for the caller to
        revoke through ``KeyAuthenticator.revoke`` (so every gateway drops them at once)."""
        async with self.db.write() as conn:
            row = (await conn.execute(
                select(accounts.c.balance).where(accounts.c.id == account_id).with_for_update())).first()
            if row is None:
                raise NotFound("There is no such organization.", code="account_not_found")
            if row.balance > 0:
                raise InvalidRequest("The organization still has credit: use it up, or ask the operator for a "
                                     "refund, before deleting it.", code="credit_left")
            await conn.execute(delete(memberships).where(memberships.c.account_id == account_id))
            await conn.execute(delete(invitations).where(invitations.c.account_id == account_id,
                                                         invitations.c.accepted_at.is_(None)))
            await conn.execute(delete(sso_settings).where(sso_settings.c.account_id == account_id))
            await conn.execute(delete(console_sessions).where(console_sessions.c.account_id == account_id))
            keys = await conn.execute(select(api_keys.c.id).where(api_keys.c.account_id == account_id,
                                                                  api_keys.c.revoked_at.is_(None)))
            return [k.id for k in keys]


async def add_member(conn: AsyncConnection, user_id: str, account_id: str, role: Role) -> None:
    await conn.execute(
        insert(memberships).values(user_id=user_id, account_id=account_id, role=role, created_at=utcnow())
    )


async def _lock(conn: AsyncConnection, account_id: str) -> None:
    found = await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id).with_for_update())
    if found.first() is None:
        raise NotFound("There is no such organization.", code="account_not_found")


async def _role(conn: AsyncConnection, account_id: str, user_id: str) -> str | None:
    q = select(memberships.c.role).where(memberships.c.account_id == account_id, memberships.c.user_id == user_id)
    role: str | None = (await conn.execute(q)).scalar_one_or_none()
    return role


async def _owners(conn: AsyncConnection, account_id: str) -> int:
    q = select(func.count()).select_from(memberships).where(
        memberships.c.account_id == account_id, memberships.c.role == "owner"
    )
    return int((await conn.execute(q)).scalar_one())
