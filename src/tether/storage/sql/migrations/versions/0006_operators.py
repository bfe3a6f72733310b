"""Operators: local operator accounts, console sessions and role assignments (see
tether.storage.sql.operators).

Revision ID: 0006
Revises: 0004_c2d
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_operators"
down_revision: str | None = "0004_c2d"
branch_labels: str | None = None
depends_on: str | None = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _serial() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "operators",
        sa.Column("username", _ident(64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("totp_secret", sa.Text(), nullable=True),
        sa.Column("totp_last_step", sa.BigInteger(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("failed_logins", sa.Integer(), nullable=False),
        sa.Column("locked_until", _ts(), nullable=True),
        sa.Column("created", _ts(), nullable=False),
        sa.Column("updated", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("username", name="pk_operators"),
    )
    op.create_table(
        "operator_sessions",
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(512), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("display_name", sa.String(255), nullable=True),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("grants", sa.Text(), nullable=False),
        sa.Column("created", _ts(), nullable=False),
        sa.Column("expires", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name="pk_operator_sessions"),
    )
    op.create_index("ix_operator_sessions_issuer_subject", "operator_sessions", ["issuer", "subject"])
    op.create_index("ix_operator_sessions_expires", "operator_sessions", ["expires"])
    op.create_table(
        "role_assignments",
        sa.Column("id", _serial(), autoincrement=True, nullable=False),
        sa.Column("issuer", sa.String(512), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column("created", _ts(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_role_assignments"),
    )
    op.create_index("ix_role_assignments_issuer_subject", "role_assignments", ["issuer", "subject"])


def downgrade() -> None:
    op.drop_table("role_assignments")
    op.drop_table("operator_sessions")
    op.drop_table("operators")
