"""Organizations: several people share an account (the organization) through memberships
with roles; a key records who created it; a console session works in one organization;
invitations; the audit log.

Every existing account becomes an organization whose console users are its owners (before
this, each user belonged to exactly one account, the one they signed up with).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mesh.store.types import BigIntPK, UTCDateTime

revision = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "memberships",
        sa.Column("user_id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "account_id", name=op.f("pk_memberships")),
        sa.ForeignKeyConstraint(["user_id"], ["console_users.id"], name=op.f("fk_memberships_user_id_console_users"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_memberships_account_id_accounts")),
        sa.CheckConstraint("role IN ('owner', 'admin', 'billing', 'developer', 'viewer')",
                           name=op.f("ck_memberships_role_known")),
    )
    op.create_index(op.f("ix_memberships_account_id"), "memberships", ["account_id"])
    op.create_table(
        "invitations",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("invited_by", sa.String(40), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("accepted_at", UTCDateTime(), nullable=True),
        sa.Column("accepted_by", sa.String(40), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invitations")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_invitations_account_id_accounts")),
    )
    op.create_index(op.f("ix_invitations_account_id"), "invitations", ["account_id"])
    op.create_index("ix_invitations_token_hash", "invitations", ["token_hash"], unique=True)
    op.create_table(
        "sso_settings",
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("domains", sa.JSON(), nullable=False),
        sa.Column("default_role", sa.String(16), nullable=False),
        sa.Column("require_sso", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_sso_settings")),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_sso_settings_account_id_accounts")),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", BigIntPK, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(40), nullable=True),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("actor_id", sa.String(40), nullable=True),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(100), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(300), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index("ix_audit_events_account_id_id", "audit_events", ["account_id", "id"])
    op.create_index("ix_audit_events_created_at", "audit_events", ["created_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("created_by", sa.String(40), nullable=True))
    with op.batch_alter_table("console_sessions") as batch:
        batch.add_column(sa.Column("account_id", sa.String(40), nullable=True))
    with op.batch_alter_table("console_users") as batch:
        batch.add_column(sa.Column("email_verified_at", UTCDateTime(), nullable=True))
    # People who signed up before verification existed are not locked out.
    op.execute("UPDATE console_users SET email_verified_at = created_at")
    op.create_table(
        "email_tokens",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(40), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_email_tokens")),
        sa.ForeignKeyConstraint(["user_id"], ["console_users.id"], name=op.f("fk_email_tokens_user_id_console_users"),
                                ondelete="CASCADE"),
    )
    op.create_index(op.f("ix_email_tokens_user_id"), "email_tokens", ["user_id"])
    op.execute(
        "INSERT INTO memberships (user_id, account_id, role, created_at) "
        "SELECT id, account_id, 'owner', created_at FROM console_users"
    )
    op.execute(
        "UPDATE console_sessions SET account_id = "
        "(SELECT account_id FROM console_users WHERE console_users.id = console_sessions.user_id)"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_email_tokens_user_id"), table_name="email_tokens")
    op.drop_table("email_tokens")
    with op.batch_alter_table("console_users") as batch:
        batch.drop_column("email_verified_at")
    with op.batch_alter_table("console_sessions") as batch:
        batch.drop_column("account_id")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("created_by")
    op.drop_table("audit_events")
    op.drop_table("sso_settings")
    op.drop_table("invitations")
    op.drop_index(op.f("ix_memberships_account_id"), table_name="memberships")
    op.drop_table("memberships")
