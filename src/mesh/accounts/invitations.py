"""Invitations to an organization: a link that works once, for one email, until it expires.

The link carries 32 random bytes (unguessable, so nobody can forge one); the database keeps
only their SHA-256, so a copy of the database opens nothing. Accepting marks the
invitation used in the same statement that checks it is unused, unrevoked and unexpired,
so a link cannot be used twice even by two requests at once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from mesh.accounts.keys import new_id
from mesh.accounts.members import add_member
from mesh.accounts.roles import Role, is_role
from mesh.console.tables import invitations, memberships
from mesh.errors import InvalidRequest
from mesh.store import Database, utcnow
from mesh.store.tables import accounts


@dataclass(frozen=True, slots=True)
class Invitation:
    id: str
    account_id: str
    account_name: str
    email: str
    role: Role
    invited_by: str | None
    created_at: datetime
    expires_at: datetime
    accepted_at: datetime | None
    revoked_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.accepted_at is None and self.revoked_at is None and self.expires_at > now


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _invitation(row: Any) -> Invitation:
    return Invitation(id=row.id, account_id=row.account_id, account_name=row.name, email=row.email, role=row.role,
                      invited_by=row.invited_by, created_at=row.created_at, expires_at=row.expires_at,
                      accepted_at=row.accepted_at, revoked_at=row.revoked_at)


_JOINED = select(invitations, accounts.c.name).join(accounts, accounts.c.id == invitations.c.account_id)


class InvitationUnusable(InvalidRequest):
    def __init__(self) -> None:
        super().__init__("This invitation was used, revoked or has expired. Ask for a new one.",
                         code="invitation_unusable")


class Invitations:
    def __init__(self, db: Database, lifetime: timedelta) -> None:
        self.db = db
        self.lifetime = lifetime

    async def create(self, account_id: str, email: str, role: str, invited_by: str) -> tuple[Invitation, str]:
        """A new invitation and its link token (the only copy)."""
        if not is_role(role):
            raise InvalidRequest(f"Unknown role {role!r}.", param="role")
        token = secrets.token_urlsafe(32)
        now = utcnow()
        row = {"id": new_id("inv"), "account_id": account_id, "email": email, "role": role,
               "token_hash": _hash(token), "invited_by": invited_by, "created_at": now,
               "expires_at": now + self.lifetime, "accepted_at": None, "accepted_by": None, "revoked_at": None}
        async with self.db.write() as conn:
            await conn.execute(invitations.insert().values(**row))
        found = await self.get(account_id, str(row["id"]))
        assert found is not None
        return found, token

    async def get(self, account_id: str, invitation_id: str) -> Invitation | None:
        q = _JOINED.where(invitations.c.id == invitation_id, invitations.c.account_id == account_id)
        async with self.db.read() as conn:
            row = (await conn.execute(q)).first()
        return None if row is None else _invitation(row)

    async def by_token(self, token: str) -> Invitation | None:
        if not token or len(token) > 100:
            return None
        async with self.db.read() as conn:
            row = (await conn.execute(_JOINED.where(invitations.c.token_hash == _hash(token)))).first()
        return None if row is None else _invitation(row)

    async def pending(self, account_id: str) -> list[Invitation]:
        now = utcnow()
        q = _JOINED.where(invitations.c.account_id == account_id, invitations.c.accepted_at.is_(None),
                          invitations.c.revoked_at.is_(None), invitations.c.expires_at > now)
        async with self.db.read() as conn:
            return [_invitation(r) for r in await conn.execute(q.order_by(invitations.c.created_at.desc()))]

    async def revoke(self, account_id: str, invitation_id: str) -> Invitation | None:
        """Revoke a pending invitation; ``None`` if there is none such (or it was used)."""
        async with self.db.write() as conn:
            result = await conn.execute(
                update(invitations)
                .where(invitations.c.id == invitation_id, invitations.c.account_id == account_id,
                       invitations.c.accepted_at.is_(None), invitations.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        return await self.get(account_id, invitation_id) if result.rowcount else None

    async def accept(self, token: str, user_id: str) -> Invitation:
        """Use the invitation for the user: they become a member with its role (an existing
        member keeps their role). Raises :class:`InvitationUnusable`."""
        now = utcnow()
        async with self.db.write() as conn:
            used = await conn.execute(
                update(invitations)
                .where(invitations.c.token_hash == _hash(token), invitations.c.accepted_at.is_(None),
                       invitations.c.revoked_at.is_(None), invitations.c.expires_at > now)
                .values(accepted_at=now, accepted_by=user_id)
            )
            if used.rowcount != 1:
                raise InvitationUnusable()
            row = (await conn.execute(_JOINED.where(invitations.c.token_hash == _hash(token)))).one()
            member = await conn.execute(select(memberships.c.role).where(
                memberships.c.account_id == row.account_id, memberships.c.user_id == user_id))
            if member.first() is None:
                await add_member(conn, user_id, row.account_id, row.role)
        return _invitation(row)
