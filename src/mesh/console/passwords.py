"""Emails and passwords: normalisation, rules, and argon2id hashing off the event loop.

Hashing takes tens of milliseconds of CPU on purpose, so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import functools
import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD = 10
MAX_PASSWORD = 1024
MAX_EMAIL = 254
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the email is unknown, so that a miss costs as long as a hit."""
    return _hasher.hash("mesh-console-dummy-password")


def normalize_email(text: str) -> str | None:
    """The email in lower case, or ``None`` if it does not look like one."""
    email = text.strip().lower()
    if len(email) > MAX_EMAIL or not _EMAIL.match(email):
        return None
    return email


def password_problem(password: str) -> str | None:
    """Why ``password`` is not acceptable, or ``None``."""
    if len(password) < MIN_PASSWORD:
        return f"Use at least {MIN_PASSWORD} characters."
    if len(password) > MAX_PASSWORD:
        return f"Use at most {MAX_PASSWORD} characters."
    if password.strip() == "":
        return "The password cannot be only spaces."
    return None


async def hash_password(password: str) -> str:
    """An argon2id hash (with its own salt and parameters) of ``password``."""
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; with ``None`` it checks a dummy hash and says no."""

    def check() -> bool:
        try:
            return bool(_hasher.verify(password_hash or _dummy_hash(), password)) and password_hash is not None
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


def needs_rehash(password_hash: str) -> bool:
    """Whether the hash was made with weaker parameters than today's."""
    return bool(_hasher.check_needs_rehash(password_hash))
