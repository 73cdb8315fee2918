"""Spend controls: key budgets that reset each period; attribution on usage records;
the low-balance alert state of accounts.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mesh.store.types import UTCDateTime

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("balance_alert", sa.String(8), nullable=True))
    # budget_period null means "none": spend_limit over the key's life, as before.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("budget_period", sa.String(16), nullable=True))
        batch.add_column(sa.Column("budget_reset_day", sa.SmallInteger(), nullable=True))
        batch.add_column(sa.Column("budget_resets_at", UTCDateTime(), nullable=True))
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("end_user", sa.String(256), nullable=True))
        batch.add_column(sa.Column("tags", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("meta", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("meta")
        batch.drop_column("tags")
        batch.drop_column("end_user")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("budget_resets_at")
        batch.drop_column("budget_reset_day")
        batch.drop_column("budget_period")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("balance_alert")
