"""Budget-threshold alerts: the highest threshold a key was alerted at, and in which period.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mesh.store.types import UTCDateTime

revision = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("budget_alert", sa.SmallInteger(), nullable=True))
        batch.add_column(sa.Column("budget_alert_period", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("budget_alert_period")
        batch.drop_column("budget_alert")
