"""Module identities and module twins (see tether.storage.sql.modules). Deleting a device deletes its
modules, deleting a module its twin (ON DELETE CASCADE on both foreign keys).

Revision ID: 0007_modules
Revises: 0006_operators
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_modules"
down_revision: str | None = "0006_operators"
branch_labels: str | None = None
depends_on: str | None = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "modules",
        sa.Column("device_id", _ident(128), nullable=False),
        sa.Column("module_id", _ident(128), nullable=False),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("auth_type", sa.String(32), nullable=False),
        sa.Column("generation_id", sa.String(64), nullable=False),
        sa.Column("doc", sa.Text(), nullable=False),
        sa.Column("connection_state", sa.String(16), nullable=False),
        sa.Column("connection_state_updated_time", _ts(), nullable=False),
        sa.Column("last_activity_time", _ts(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "module_id", name="pk_modules"),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name="fk_modules_device_id_devices", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "module_twins",
        sa.Column("device_id", _ident(128), nullable=False),
        sa.Column("module_id", _ident(128), nullable=False),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("desired", sa.JSON(), nullable=False),
        sa.Column("reported", sa.JSON(), nullable=False),
        sa.Column("desired_version", sa.BigInteger(), nullable=False),
        sa.Column("reported_version", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "module_id", name="pk_module_twins"),
        sa.ForeignKeyConstraint(
            ["device_id", "module_id"],
            ["modules.device_id", "modules.module_id"],
            name="fk_module_twins_device_id_modules",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("module_twins")
    op.drop_table("modules")
