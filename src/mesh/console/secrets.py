"""The console secret and what is derived from it.

The secret signs the CSRF tokens of signed-out forms and the flash-message cookie, and
derives each user's playground key (see :mod:`mesh.console.playground`). It is the
configured ``console.secret`` or, when none is configured, 32 random bytes generated on
first use and kept in ``console_secrets`` so that every gateway replica on the database
shares it. Rotating it invalidates those tokens and makes the playground mint new keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from pydantic import SecretStr
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from mesh.console.tables import console_secrets
from mesh.store import Database, utcnow

SECRET_NAME = "console"


async def load_secret(db: Database, configured: SecretStr | None) -> bytes:
    """The configured secret, or the one stored in the database (created on first call)."""
    if configured is not None:
        return configured.get_secret_value().encode()
    async with db.read() as conn:
        found = (await conn.execute(select(console_secrets.c.value).where(console_secrets.c.name == SECRET_NAME)))
        value = found.scalar_one_or_none()
    if value is None:
        try:
            async with db.write() as conn:
                await conn.execute(
                    insert(console_secrets).values(name=SECRET_NAME, value=secrets.token_hex(32), created_at=utcnow())
                )
        except IntegrityError:
            pass  # another replica created it first: read theirs
        async with db.read() as conn:
            found = await conn.execute(select(console_secrets.c.value).where(console_secrets.c.name == SECRET_NAME))
            value = found.scalar_one()
    return str(value).encode()


def derive(secret: bytes, purpose: str, data: str = "") -> bytes:
    """A 32-byte value bound to ``purpose`` and ``data``; distinct purposes never collide."""
    return hmac.new(secret, f"{purpose}\x00{data}".encode(), hashlib.sha256).digest()


def sign(secret: bytes, purpose: str, data: str) -> str:
    return derive(secret, purpose, data).hex()


def verify(secret: bytes, purpose: str, data: str, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, purpose, data), signature)
