"""Initial schema: devices, shared access policies, audit log.

Revision ID: 0001_initial
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    # Byte-order, case-sensitive identifiers on PostgreSQL (SQLite's default BINARY collation already is).
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", _ident(128), nullable=False),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("auth_type", sa.String(32), nullable=False),
        sa.Column("generation_id", sa.String(64), nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("connection_state", sa.String(16), nullable=False),
        sa.Column("connection_state_updated_time", _ts(), nullable=False),
        sa.Column("last_activity_time", _ts(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_devices"),
    )
    op.create_index("ix_devices_status", "devices", ["status"])

    op.create_table(
        "policies",
        sa.Column("name", _ident(64), nullable=False),
        sa.Column("primary_key", sa.Text(), nullable=False),
        sa.Column("secondary_key", sa.Text(), nullable=False),
        sa.Column("permissions", sa.Text(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_policies"),
    )

    op.create_table(
        "audit",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("time", _ts(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("principal", sa.Text(), nullable=True),
        sa.Column("credential", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("peer", sa.Text(), nullable=True),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit"),
    )
    op.create_index("ix_audit_time", "audit", ["time"])


def downgrade() -> None:
    op.drop_index("ix_audit_time", table_name="audit")
    op.drop_table("audit")
    op.drop_table("policies")
    op.drop_index("ix_devices_status", table_name="devices")
    op.drop_table("devices")
