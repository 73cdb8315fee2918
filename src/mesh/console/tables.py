"""The console's tables, on the shared :data:`mesh.store.tables.metadata`.

``console_users``    one row per person who signs in; ``account_id`` is the organization
                     their next session opens in (the one they used last).
``memberships``      who belongs to which organization (an ``accounts`` row), with what role.
``console_sessions`` server-side sessions: the cookie carries a random token, the row
                     keeps only its SHA-256, the CSRF token and the expiry, so signing
                     out (or changing the password) ends a session everywhere at once.
``console_payments`` credit purchases, from checkout to the verified webhook.
``console_secrets``  the generated console secret when none is configured, shared by
                     every gateway replica on the database.

Import this module wherever the metadata must be complete (the Alembic environment does).
``invitations``      a pending invitation to an organization: the link's token only as SHA-256.
``sso_settings``     an organization's single sign-on: email domains whose verified SSO
                     sign-ins join it (with a default role), and whether it requires SSO.
``email_tokens``     single-use links mailed to a person (verify the email, reset the
                     password): only their SHA-256, with an expiry.
``audit_events``     who did what to an organization (``account_id``), or through the admin
                     API (``account_id`` null: the operator's log); pruned after a retention.

Migration ``0004`` creates these tables; ``0014`` adds memberships, invitations and the audit log.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, CheckConstraint, Column, ForeignKey, Index, String, Table, Text, false

from mesh.store.tables import metadata
from mesh.store.types import BigIntPK, UTCDateTime

EMAIL_LENGTH = 254

console_users = Table(
    "console_users",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("email", String(EMAIL_LENGTH), nullable=False),
    Column("password_hash", String(200), nullable=False),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("is_admin", Boolean, nullable=False, server_default=false()),
    Column("playground_key_id", String(40), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("password_changed_at", UTCDateTime, nullable=False),
    # When the person proved the email is theirs (a mailed link, an invitation, SSO).
    Column("email_verified_at", UTCDateTime, nullable=True),
    Index("ix_console_users_email", "email", unique=True),
)

console_sessions = Table(
    "console_sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", String(40), ForeignKey("console_users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False, index=True),
    # The organization this session works in (switched in the console); its membership is
    # checked on every request, so a removed member's session ends at once.
    Column("account_id", String(40), nullable=True),
)

ROLES = ("owner", "admin", "billing", "developer", "viewer")

memberships = Table(
    "memberships",
    metadata,
    Column("user_id", String(40), ForeignKey("console_users.id", ondelete="CASCADE"), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), primary_key=True, index=True),
    Column("role", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint("role IN ('owner', 'admin', 'billing', 'developer', 'viewer')", name="role_known"),
)

console_payments = Table(
    "console_payments",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("user_id", String(40), nullable=True),
    Column("provider", String(16), nullable=False),
    Column("provider_ref", String(255), nullable=True),
    Column("pack_id", String(40), nullable=False),
    Column("credits", BigInteger, nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("completed_at", UTCDateTime, nullable=True),
    # The Stripe PaymentIntent the checkout paid with: refunds and disputes name it.
    Column("payment_intent", String(255), nullable=True),
    Index("ix_console_payments_account_id_created_at", "account_id", "created_at"),
    Index("ix_console_payments_provider_ref", "provider_ref", unique=True),
    Index("ix_console_payments_payment_intent", "payment_intent", unique=True),
)

# Automatic top-ups (console/topups.py): when the account's balance falls under
# ``threshold``, its saved card (Stripe customer and payment method) buys ``pack_id``.
# ``pending_payment`` is the console_payments row of the attempt in flight (one at a time).
auto_topups = Table(
    "auto_topups",
    metadata,
    Column("account_id", String(40), ForeignKey("accounts.id"), primary_key=True),
    Column("customer", String(255), nullable=False),
    Column("payment_method", String(255), nullable=False),
    Column("threshold", BigInteger, nullable=False),
    Column("pack_id", String(40), nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=false()),
    Column("attempts", BigInteger, nullable=False, server_default="0"),
    Column("failures", BigInteger, nullable=False, server_default="0"),
    Column("pending_payment", String(40), nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)

console_secrets = Table(
    "console_secrets",
    metadata,
    Column("name", String(40), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

invitations = Table(
    "invitations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("email", String(EMAIL_LENGTH), nullable=False),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(64), nullable=False),
    Column("invited_by", String(40), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("accepted_at", UTCDateTime, nullable=True),
    Column("accepted_by", String(40), nullable=True),
    Column("revoked_at", UTCDateTime, nullable=True),
    Index("ix_invitations_token_hash", "token_hash", unique=True),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigIntPK, primary_key=True, autoincrement=True),
    Column("account_id", String(40), nullable=True),
    Column("actor", String(300), nullable=False),
    Column("actor_id", String(40), nullable=True),
    Column("ip", String(64), nullable=True),
    Column("request_id", String(100), nullable=True),
    Column("action", String(64), nullable=False),
    Column("target", String(300), nullable=True),
    Column("detail", JSON, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_audit_events_account_id_id", "account_id", "id"),
    Index("ix_audit_events_created_at", "created_at"),
)

sso_settings = Table(
    "sso_settings",
    metadata,
    Column("account_id", String(40), ForeignKey("accounts.id"), primary_key=True),
    Column("domains", JSON, nullable=False),
    Column("default_role", String(16), nullable=False),
    Column("require_sso", Boolean, nullable=False, server_default=false()),
    Column("updated_at", UTCDateTime, nullable=False),
)

email_tokens = Table(
    "email_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("user_id", String(40), ForeignKey("console_users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("purpose", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("used_at", UTCDateTime, nullable=True),
)
