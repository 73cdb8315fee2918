"""The tables, as SQLAlchemy Core metadata. Migrations in ``migrations/versions`` create them.

Money columns are BIGINT micro-credits (1 credit = 1,000,000). CHECK constraints keep
``balance + reversed >= held >= 0`` on every dialect, so no code path can overdraw an account;
``reversed`` (credit taken back by a Stripe refund or dispute) is the only way below zero.
A test compares this metadata against the migrated schema; change both together.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

from mesh.store.types import BigIntPK, UTCDateTime

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

LEDGER_KINDS = ("grant", "purchase", "redeem", "usage", "refund", "adjustment", "reversal")

metadata = MetaData(naming_convention=NAMING)

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("balance", BigInteger, nullable=False, server_default="0"),
    Column("held", BigInteger, nullable=False, server_default="0"),
    Column("created_at", UTCDateTime, nullable=False),
    Column("rate_limits", JSON, nullable=True),
    # Low-balance alert state (billing/alerts.py): null, "armed" (above), "sent" (alerted).
    Column("balance_alert", String(8), nullable=True),
    # Credit taken back by Stripe refunds and disputes (net of disputes won): the only
    # thing that may take the balance below zero, and only by this much (migration 0008).
    Column("reversed", BigInteger, nullable=False, server_default="0"),
    CheckConstraint("reversed >= 0", name="reversed_non_negative"),
    CheckConstraint("balance + reversed >= 0", name="balance_above_floor"),
    CheckConstraint("held >= 0", name="held_non_negative"),
    CheckConstraint("balance + reversed >= held", name="balance_covers_held"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False, server_default=""),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False),
    Column("allowed_models", JSON, nullable=True),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("spend_limit", BigInteger, nullable=True),
    Column("spent", BigInteger, nullable=False, server_default="0"),
    Column("held", BigInteger, nullable=False, server_default="0"),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("last_used_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("rate_limits", JSON, nullable=True),
    # A budget that resets (mesh.billing.budgets): spend_limit per period; spent is this period's.
    Column("budget_period", String(16), nullable=True),
    Column("budget_reset_day", SmallInteger, nullable=True),
    Column("budget_resets_at", UTCDateTime, nullable=True),
    # Budget-threshold alerts (billing/alerts.py): the highest percent alerted, in the period
    # that ends at budget_alert_period (the key's budget_resets_at then).
    Column("budget_alert", SmallInteger, nullable=True),
    Column("budget_alert_period", UTCDateTime, nullable=True),
    # Per end user cap (the request's ``user``) per budget period; null: none (key_user_spend).
    Column("user_budget", BigInteger, nullable=True),
    # The console user who created the key (None: the admin API, or before 0014).
    Column("created_by", String(40), nullable=True),
    CheckConstraint("spent >= 0", name="spent_non_negative"),
    CheckConstraint("held >= 0", name="held_non_negative"),
    CheckConstraint("spend_limit IS NULL OR spend_limit >= 0", name="spend_limit_non_negative"),
    Index("ix_api_keys_key_hash", "key_hash", unique=True),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("balance_after", BigInteger, nullable=False),
    Column("idempotency_key", String(200), nullable=False),
    Column("request_id", String(100), nullable=True),
    Column("key_id", String(40), nullable=True),
    Column("memo", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    # The account's ``reversed`` after this row: its balance_after may be below zero by that.
    Column("reversed_after", BigInteger, nullable=False, server_default="0"),
    CheckConstraint(
        "kind IN ('grant', 'purchase', 'redeem', 'usage', 'refund', 'adjustment', 'reversal')", name="kind_known"
    ),
    CheckConstraint("balance_after + reversed_after >= 0", name="balance_after_above_floor"),
    Index("ix_ledger_idempotency_key", "idempotency_key", unique=True),
    Index("ix_ledger_account_id_id", "account_id", "id"),
)

holds = Table(
    "holds",
    metadata,
    Column("request_id", String(100), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("amount", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # The end user whose cap (key_user_spend) also counts this hold; null: none.
    Column("end_user", String(256), nullable=True),
    CheckConstraint("amount > 0", name="amount_positive"),
    Index("ix_holds_created_at", "created_at"),
)

# What each end user of a key with a user_budget spent this budget period, and holds now
# (mesh.billing.settlement); ``resets_at`` is the key's budget_resets_at the row counts for.
key_user_spend = Table(
    "key_user_spend",
    metadata,
    Column("key_id", String(40), primary_key=True),
    Column("end_user", String(256), primary_key=True),
    Column("spent", BigInteger, nullable=False, server_default="0"),
    Column("held", BigInteger, nullable=False, server_default="0"),
    Column("resets_at", UTCDateTime, nullable=True),
    CheckConstraint("spent >= 0", name="spent_non_negative"),
    CheckConstraint("held >= 0", name="held_non_negative"),
)

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("request_id", String(100), nullable=False),
    Column("account_id", String(40), nullable=False),
    Column("key_id", String(40), nullable=True),
    Column("model", String(200), nullable=False),
    Column("replica", String(200), nullable=True),
    Column("protocol", String(32), nullable=True),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("cost", BigInteger, nullable=False),
    Column("status", String(32), nullable=False),
    Column("ttft_ms", Integer, nullable=True),
    Column("duration_ms", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    # Attribution (mesh.billing.attribution): the client's end user, x-mesh-tags, metadata.
    Column("end_user", String(256), nullable=True),
    Column("tags", JSON, nullable=True),
    Column("meta", JSON, nullable=True),
    Column("finish_reason", String(16), nullable=True),
    Index("ix_usage_records_account_id_created_at", "account_id", "created_at"),
    Index("ix_usage_records_created_at", "created_at"),
    Index("ix_usage_records_request_id", "request_id"),
)

# Settled requests waiting for the settlement webhook stream (billing/stream.py), written in
# the usage records' transaction; a row is deleted once a batch holding it was delivered.
settlement_outbox = Table(
    "settlement_outbox",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("request_id", String(100), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("claimed_until", UTCDateTime, nullable=True),  # a process is sending it until then
    Column("attempts", Integer, nullable=False, server_default="0"),
    Index("ix_settlement_outbox_claimed_until", "claimed_until"),
)

usage_daily = Table(
    "usage_daily",
    metadata,
    Column("account_id", String(40), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("input_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("reasoning_tokens", BigInteger, nullable=False),
    Column("cost", BigInteger, nullable=False),
    Index("ix_usage_daily_day", "day"),
)

redeem_codes = Table(
    "redeem_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("prefix", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("redeemed_by", String(40), ForeignKey("accounts.id"), nullable=True),
    Column("redeemed_at", UTCDateTime, nullable=True),
    CheckConstraint("amount > 0", name="amount_positive"),
)
