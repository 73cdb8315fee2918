"""The settlement webhook stream's outbox: settled requests waiting to be delivered.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mesh.store.types import BigIntPK, UTCDateTime

revision = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "settlement_outbox",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("claimed_until", UTCDateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_settlement_outbox")),
    )
    op.create_index("ix_settlement_outbox_claimed_until", "settlement_outbox", ["claimed_until"])


def downgrade() -> None:
    op.drop_index("ix_settlement_outbox_claimed_until", table_name="settlement_outbox")
    op.drop_table("settlement_outbox")
