"""Reversals: a Stripe refund or dispute takes back the credits of the checkout it belongs to.

The balance may now go below zero, but only by what reversals took back: ``accounts.reversed``
is the credit reversed so far (net of disputes won), and the floor moves with it,
``balance + reversed >= held`` (before: ``balance >= held``), so every other path is exactly
as unable to overdraw an account as before. Ledger rows carry the account's ``reversed`` after
them (``reversed_after``, 0 unless set by a reversal-aware writer) and are checked the same way,
``balance_after + reversed_after >= 0``. ``console_payments.payment_intent`` ties a Stripe
charge or dispute (which name the PaymentIntent) to its checkout.

SQLite rebuilds ``accounts`` and ``ledger`` to change their CHECKs: ``Database.migrate`` runs
it with foreign keys off and checks them before COMMIT (SQLite's documented procedure).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None

OLD_KINDS = "kind IN ('grant', 'purchase', 'redeem', 'usage', 'refund', 'adjustment')"
NEW_KINDS = "kind IN ('grant', 'purchase', 'redeem', 'usage', 'refund', 'adjustment', 'reversal')"


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("reversed", sa.BigInteger(), nullable=False, server_default="0"))
        batch.drop_constraint(op.f("ck_accounts_balance_non_negative"), type_="check")
        batch.drop_constraint(op.f("ck_accounts_balance_covers_held"), type_="check")
        batch.create_check_constraint(op.f("ck_accounts_reversed_non_negative"), "reversed >= 0")
        batch.create_check_constraint(op.f("ck_accounts_balance_above_floor"), "balance + reversed >= 0")
        batch.create_check_constraint(op.f("ck_accounts_balance_covers_held"), "balance + reversed >= held")
    with op.batch_alter_table("ledger") as batch:
        batch.add_column(sa.Column("reversed_after", sa.BigInteger(), nullable=False, server_default="0"))
        batch.drop_constraint(op.f("ck_ledger_balance_after_non_negative"), type_="check")
        batch.drop_constraint(op.f("ck_ledger_kind_known"), type_="check")
        batch.create_check_constraint(
            op.f("ck_ledger_balance_after_above_floor"), "balance_after + reversed_after >= 0"
        )
        batch.create_check_constraint(op.f("ck_ledger_kind_known"), NEW_KINDS)
    with op.batch_alter_table("console_payments") as batch:
        batch.add_column(sa.Column("payment_intent", sa.String(255), nullable=True))
        batch.create_index("ix_console_payments_payment_intent", ["payment_intent"], unique=True)


def downgrade() -> None:
    # Only possible while no reversal was ever written (the old checks would fail otherwise).
    with op.batch_alter_table("console_payments") as batch:
        batch.drop_index("ix_console_payments_payment_intent")
        batch.drop_column("payment_intent")
    with op.batch_alter_table("ledger") as batch:
        batch.drop_constraint(op.f("ck_ledger_kind_known"), type_="check")
        batch.drop_constraint(op.f("ck_ledger_balance_after_above_floor"), type_="check")
        batch.create_check_constraint(op.f("ck_ledger_kind_known"), OLD_KINDS)
        batch.create_check_constraint(op.f("ck_ledger_balance_after_non_negative"), "balance_after >= 0")
        batch.drop_column("reversed_after")
    with op.batch_alter_table("accounts") as batch:
        batch.drop_constraint(op.f("ck_accounts_balance_covers_held"), type_="check")
        batch.drop_constraint(op.f("ck_accounts_balance_above_floor"), type_="check")
        batch.drop_constraint(op.f("ck_accounts_reversed_non_negative"), type_="check")
        batch.create_check_constraint(op.f("ck_accounts_balance_non_negative"), "balance >= 0")
        batch.create_check_constraint(op.f("ck_accounts_balance_covers_held"), "balance >= held")
        batch.drop_column("reversed")
