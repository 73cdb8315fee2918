"""Single-use links mailed to a person: verify the email, reset the password.

The link carries 32 random bytes; the database keeps only their SHA-256 and an expiry. Using
one marks it used in the statement that checks it is unused and unexpired. A reset link also
dies when the password changes after it was sent.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Literal

from sqlalchemy import delete, insert, select, update

from mesh.console.tables import console_users, email_tokens
from mesh.store import Database, utcnow

Purpose = Literal["verify", "reset"]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class EmailTokens:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def issue(self, user_id: str, purpose: Purpose, lifetime: timedelta) -> str:
        token = secrets.token_urlsafe(32)
        now = utcnow()
        async with self.db.write() as conn:
            await conn.execute(delete(email_tokens).where(email_tokens.c.expires_at <= now))
            await conn.execute(insert(email_tokens).values(token_hash=_hash(token), user_id=user_id, purpose=purpose,
                                                           created_at=now, expires_at=now + lifetime))
        return token

    async def peek(self, token: str, purpose: Purpose) -> str | None:
        """The user the link is for, if it still works (without using it)."""
        if not token or len(token) > 100:
            return None
        q = (
            select(email_tokens.c.user_id, email_tokens.c.created_at, console_users.c.password_changed_at)
            .join(console_users, console_users.c.id == email_tokens.c.user_id)
            .where(email_tokens.c.token_hash == _hash(token), email_tokens.c.purpose == purpose,
                   email_tokens.c.used_at.is_(None), email_tokens.c.expires_at > utcnow())
        )
        async with self.db.read() as conn:
            row = (await conn.execute(q)).first()
        if row is None or (purpose == "reset" and row.password_changed_at > row.created_at):
            return None
        return str(row.user_id)

    async def use(self, token: str, purpose: Purpose) -> str | None:
        """Spend the link; the user it was for, or ``None`` if it does not work (any more)."""
        user_id = await self.peek(token, purpose)
        if user_id is None:
            return None
        async with self.db.write() as conn:
            spent = await conn.execute(
                update(email_tokens)
                .where(email_tokens.c.token_hash == _hash(token), email_tokens.c.used_at.is_(None))
                .values(used_at=utcnow())
            )
        return user_id if spent.rowcount == 1 else None
