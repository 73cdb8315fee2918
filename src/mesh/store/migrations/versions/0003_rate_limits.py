"""Per-account and per-key rate limits set by the operator.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # {"rpm": int | null, "tpm": int | null, "concurrent": int | null}; null means the default.
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("rate_limits", sa.JSON(), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rate_limits", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("rate_limits")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("rate_limits")
