"""Device twins: tags, desired and reported properties with their versions and `$metadata`
(see tether.storage.sql.twins). Deleting a device deletes its twin (ON DELETE CASCADE).

Revision ID: 0003_twins
Revises: 0002_certificate_authorities
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_twins"
down_revision: str | None = "0002_certificate_authorities"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "twins",
        sa.Column(
            "device_id",
            sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("desired", sa.JSON(), nullable=False),
        sa.Column("reported", sa.JSON(), nullable=False),
        sa.Column("desired_version", sa.BigInteger(), nullable=False),
        sa.Column("reported_version", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name="pk_twins"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name="fk_twins_device_id_devices",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("twins")
