"""Server-side console sessions.

The session cookie carries 32 random bytes; the database keeps only their SHA-256, the
session's CSRF token (random, per session) and an absolute expiry. A stolen database
therefore yields no usable cookie, and deleting the row ends the session on every
gateway replica at once (sign out, password change).

A session works in one organization (``account_id``, switched in the console). Loading it
joins the user's membership there, so the role is read fresh on every request and a
member removed from the organization is signed out of it at once.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, delete, insert, select, update

from mesh.accounts.roles import Role
from mesh.console.tables import console_sessions, console_users, memberships
from mesh.console.users import ConsoleUser, user_from_row
from mesh.store import Database, utcnow


@dataclass(frozen=True, slots=True)
class Session:
    token_hash: str
    csrf_token: str
    user: ConsoleUser
    account_id: str | None  # None: the user belongs to no organization
    role: Role | None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    def __init__(self, db: Database, lifetime: timedelta) -> None:
        self.db = db
        self.lifetime = lifetime

    async def create(self, user_id: str, account_id: str | None) -> str:
        """Start a session in the organization; returns the cookie token (its only copy).
        Expired rows go too."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        async with self.db.write() as conn:
            await conn.execute(delete(console_sessions).where(console_sessions.c.expires_at <= now))
            await conn.execute(
                insert(console_sessions).values(
                    token_hash=token_hash(token),
                    user_id=user_id,
                    csrf_token=secrets.token_hex(32),
                    created_at=now,
                    expires_at=now + self.lifetime,
                    account_id=account_id,
                )
            )
        return token

    async def load(self, token: str | None) -> Session | None:
        """The live session for a cookie token, with its user and role; ``None`` if unknown,
        expired, or its organization no longer counts the user as a member."""
        if not token or len(token) > 100:
            return None
        digest = token_hash(token)
        q = (
            select(console_sessions.c.csrf_token, console_sessions.c.expires_at,
                   console_sessions.c.account_id.label("session_account"), memberships.c.role, console_users)
            .join(console_users, console_users.c.id == console_sessions.c.user_id)
            .outerjoin(memberships, and_(memberships.c.user_id == console_sessions.c.user_id,
                                         memberships.c.account_id == console_sessions.c.account_id))
            .where(console_sessions.c.token_hash == digest)
        )
        async with self.db.read() as conn:
            row = (await conn.execute(q)).first()
        if row is None or row.expires_at <= utcnow():
            return None
        if row.session_account is not None and row.role is None:
            return None  # removed from the organization: this session has ended
        return Session(token_hash=digest, csrf_token=row.csrf_token, user=user_from_row(row),
                       account_id=row.session_account, role=row.role)

    async def switch(self, digest: str, user_id: str, account_id: str) -> None:
        """Work in another organization (the caller checked the membership); it is also
        where the user's next session opens."""
        async with self.db.write() as conn:
            await conn.execute(
                update(console_sessions).where(console_sessions.c.token_hash == digest).values(account_id=account_id)
            )
            await conn.execute(update(console_users).where(console_users.c.id == user_id).values(account_id=account_id))

    async def end(self, digest: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(delete(console_sessions).where(console_sessions.c.token_hash == digest))
