"""The console secret leaves the database: its stored copy is deleted, and the playground
keys derived from it (HMAC(secret, key id), computable by anyone who read the database)
are revoked; the playground mints random keys from now on.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mesh.store.types import UTCDateTime, utcnow

revision = "0006"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    keys = sa.table("api_keys", sa.column("id", sa.String), sa.column("revoked_at", UTCDateTime()))
    users = sa.table("console_users", sa.column("playground_key_id", sa.String))
    derived = sa.select(users.c.playground_key_id).where(users.c.playground_key_id.is_not(None))
    op.execute(
        keys.update().where(keys.c.revoked_at.is_(None), keys.c.id.in_(derived)).values(revoked_at=utcnow())
    )
    op.execute(sa.table("console_secrets").delete())


def downgrade() -> None:
    # Nothing to restore: the deleted secret must not come back, and the console recreates
    # what it needs (a secret file, new playground keys).
    return None
