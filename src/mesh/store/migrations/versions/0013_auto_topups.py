"""Automatic top-ups through a saved Stripe payment method.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mesh.store.types import UTCDateTime

revision = "0013"
down_revision: str | None = "0012"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "auto_topups",
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("customer", sa.String(255), nullable=False),
        sa.Column("payment_method", sa.String(255), nullable=False),
        sa.Column("threshold", sa.BigInteger(), nullable=False),
        sa.Column("pack_id", sa.String(40), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("attempts", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("failures", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pending_payment", sa.String(40), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_auto_topups_account_id_accounts")),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_auto_topups")),
    )


def downgrade() -> None:
    op.drop_table("auto_topups")
