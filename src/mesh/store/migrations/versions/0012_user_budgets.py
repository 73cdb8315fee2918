"""Per end user caps on a key: api_keys.user_budget, what each end user spent and holds
(key_user_spend), and the end user a hold counts for (holds.end_user).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mesh.store.types import UTCDateTime

revision = "0012"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("user_budget", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("end_user", sa.String(256), nullable=True))
    op.create_table(
        "key_user_spend",
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("end_user", sa.String(256), nullable=False),
        sa.Column("spent", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("held", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("resets_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint("spent >= 0", name=op.f("ck_key_user_spend_spent_non_negative")),
        sa.CheckConstraint("held >= 0", name=op.f("ck_key_user_spend_held_non_negative")),
        sa.PrimaryKeyConstraint("key_id", "end_user", name=op.f("pk_key_user_spend")),
    )


def downgrade() -> None:
    op.drop_table("key_user_spend")
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("end_user")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("user_budget")
