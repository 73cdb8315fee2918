"""Console users: sign-up (a new account with its first user), look-ups, passwords, admins.

Sign-up creates an organization (an account) with the new user as its owner, in the same
transaction; ``account_id`` is the organization the user's next session opens in. Only
argon2 hashes of passwords are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from mesh.accounts.keys import new_id
from mesh.accounts.members import add_member
from mesh.accounts.service import insert_account
from mesh.console.passwords import hash_password, needs_rehash, normalize_email, password_problem, verify_password
from mesh.console.tables import console_sessions, console_users
from mesh.store import Database, utcnow


class SignUpError(Exception):
    """The sign-up form is wrong; ``field`` names the input, the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    id: str
    email: str
    account_id: str
    is_admin: bool
    playground_key_id: str | None
    created_at: datetime
    password_changed_at: datetime
    email_verified_at: datetime | None = None


def user_from_row(row: Any) -> ConsoleUser:
    return ConsoleUser(
        id=row.id,
        email=row.email,
        account_id=row.account_id,
        is_admin=bool(row.is_admin),
        playground_key_id=row.playground_key_id,
        created_at=row.created_at,
        password_changed_at=row.password_changed_at,
        email_verified_at=getattr(row, "email_verified_at", None),
    )


class Users:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def sign_up(self, email_text: str, password: str, *, joining: str | None = None,
                      verified: bool = False) -> ConsoleUser | None:
        """Create an organization named after the email and its first user (its owner), in
        one transaction; with ``joining`` (an organization whose invitation the caller holds)
        only the user, who becomes a member when the invitation is accepted.

        Returns None when the email is taken, after the same work (a password hash) as a
        sign-up, so that neither the answer nor its timing says the email is registered.
        Raises :class:`SignUpError` for a bad email or a weak password.
        """
        email = normalize_email(email_text)
        if email is None:
            raise SignUpError("email", "Enter a valid email address.")
        problem = password_problem(password)
        if problem:
            raise SignUpError("password", problem)
        password_hash = await hash_password(password)
        if await self.by_email(email) is not None:
            return None
        now = utcnow()
        account_id = joining or new_id("acct")
        row = {
            "id": new_id("user"),
            "email": email,
            "password_hash": password_hash,
            "account_id": account_id,
            "is_admin": False,
            "playground_key_id": None,
            "created_at": now,
            "password_changed_at": now,
            "email_verified_at": now if verified else None,
        }
        try:
            async with self.db.write() as conn:
                if joining is None:
                    await insert_account(conn, account_id, email, now)
                await conn.execute(insert(console_users).values(**row))
                if joining is None:
                    await add_member(conn, str(row["id"]), account_id, "owner")
        except IntegrityError:
            return None  # taken a moment ago, by a concurrent sign-up
        return user_from_row(SimpleNamespace(**row))

    async def by_email(self, email: str) -> ConsoleUser | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(console_users).where(console_users.c.email == email))).first()
        return None if row is None else user_from_row(row)

    async def get(self, user_id: str) -> ConsoleUser | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(console_users).where(console_users.c.id == user_id))).first()
        return None if row is None else user_from_row(row)

    async def check_password(self, email_text: str, password: str) -> ConsoleUser | None:
        """The user if the email and password match, else ``None`` (in constant-ish time)."""
        email = normalize_email(email_text)
        row = None
        if email is not None:
            async with self.db.read() as conn:
                row = (await conn.execute(select(console_users).where(console_users.c.email == email))).first()
        ok = await verify_password(None if row is None else row.password_hash, password)
        if not ok or row is None:
            return None
        if needs_rehash(row.password_hash):
            new_hash = await hash_password(password)
            async with self.db.write() as conn:
                await conn.execute(
                    update(console_users).where(console_users.c.id == row.id).values(password_hash=new_hash)
                )
        return user_from_row(row)

    async def change_password(self, user: ConsoleUser, current: str, new: str, keep_session: str) -> str | None:
        """Set a new password; returns a problem to show, or ``None`` on success.

        Every other session of the user ends (``keep_session`` is the token hash to keep).
        """
        async with self.db.read() as conn:
            stored = (
                await conn.execute(select(console_users.c.password_hash).where(console_users.c.id == user.id))
            ).scalar_one_or_none()
        if stored is None or not await verify_password(stored, current):
            return "The current password is not right."
        problem = password_problem(new)
        if problem:
            return problem
        new_hash = await hash_password(new)
        async with self.db.write() as conn:
            await conn.execute(
                update(console_users)
                .where(console_users.c.id == user.id)
                .values(password_hash=new_hash, password_changed_at=utcnow())
            )
            await conn.execute(
                delete(console_sessions).where(
                    console_sessions.c.user_id == user.id, console_sessions.c.token_hash != keep_session
                )
            )
        return None

    async def mark_verified(self, user_id: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(update(console_users).where(console_users.c.id == user_id,
                                                           console_users.c.email_verified_at.is_(None))
                               .values(email_verified_at=utcnow()))

    async def reset_password(self, user_id: str, new: str) -> str | None:
        """Set a new password from a reset link (which proved the email); every session of
        the person ends. Returns a problem to show, or ``None``."""
        problem = password_problem(new)
        if problem:
            return problem
        new_hash = await hash_password(new)
        now = utcnow()
        async with self.db.write() as conn:
            await conn.execute(update(console_users).where(console_users.c.id == user_id)
                               .values(password_hash=new_hash, password_changed_at=now))
            await conn.execute(update(console_users).where(console_users.c.id == user_id,
                                                           console_users.c.email_verified_at.is_(None))
                               .values(email_verified_at=now))
            await conn.execute(delete(console_sessions).where(console_sessions.c.user_id == user_id))
        return None

    async def set_landing(self, user_id: str, account_id: str) -> None:
        """Where the person's next session opens."""
        async with self.db.write() as conn:
            await conn.execute(update(console_users).where(console_users.c.id == user_id).values(account_id=account_id))

    async def set_playground_key(self, user_id: str, key_id: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                update(console_users).where(console_users.c.id == user_id).values(playground_key_id=key_id)
            )

    async def set_admin(self, email_text: str, is_admin: bool = True) -> bool:
        """Grant (or take away) operator rights; ``False`` if no user has that email."""
        email = normalize_email(email_text)
        if email is None:
            return False
        async with self.db.write() as conn:
            result = await conn.execute(
                update(console_users).where(console_users.c.email == email).values(is_admin=is_admin)
            )
        return result.rowcount > 0

    async def for_accounts(self, account_ids: list[str]) -> dict[str, list[str]]:
        """Account id → the emails of its users (for operator listings)."""
        if not account_ids:
            return {}
        q = select(console_users.c.account_id, console_users.c.email).where(
            console_users.c.account_id.in_(account_ids)
        )
        out: dict[str, list[str]] = {}
        async with self.db.read() as conn:
            for r in await conn.execute(q):
                out.setdefault(r.account_id, []).append(r.email)
        return out
