"""Server-side console sessions.

The session cookie carries 32 random bytes; the database keeps only their SHA-256, the
session's CSRF token (random, per session) and an absolute expiry. A stolen database
therefore yields no usable cookie, and deleting the row ends the session on every
gateway replica at once (sign out, password change).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, insert, select

from mesh.console.tables import console_sessions, console_users
from mesh.console.users import ConsoleUser, user_from_row
from mesh.store import Database, utcnow


@dataclass(frozen=True, slots=True)
class Session:
    token_hash: str
    csrf_token: str
    user: ConsoleUser


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    def __init__(self, db: Database, lifetime: timedelta) -> None:
        self.db = db
        self.lifetime = lifetime

    async def create(self, user_id: str) -> str:
        """Start a session; returns the cookie token (its only copy). Expired rows go too."""
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
                )
            )
        return token

    async def load(self, token: str | None) -> Session | None:
        """The live session for a cookie token, with its user; ``None`` if unknown or expired."""
        if not token or len(token) > 100:
            return None
        digest = token_hash(token)
        q = (
            select(console_sessions.c.csrf_token, console_sessions.c.expires_at, console_users)
            .join(console_users, console_users.c.id == console_sessions.c.user_id)
            .where(console_sessions.c.token_hash == digest)
        )
        async with self.db.read() as conn:
            row = (await conn.execute(q)).first()
        if row is None or row.expires_at <= utcnow():
            return None
        return Session(token_hash=digest, csrf_token=row.csrf_token, user=user_from_row(row))

    async def end(self, digest: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(delete(console_sessions).where(console_sessions.c.token_hash == digest))
