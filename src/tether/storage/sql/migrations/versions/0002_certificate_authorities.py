"""Registered certificate authorities for X.509 CA device authentication (see tether.storage.sql.cas).

Revision ID: 0002_certificate_authorities
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_certificate_authorities"
down_revision: str | None = "0001_initial"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "certificate_authorities",
        sa.Column(
            "name",
            sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("certificate", sa.Text(), nullable=False),
        sa.Column("thumbprint", sa.String(64), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("verification_code", sa.String(128), nullable=True),
        sa.Column("crl", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_certificate_authorities"),
        sa.UniqueConstraint("thumbprint", name="uq_certificate_authorities_thumbprint"),
    )


def downgrade() -> None:
    op.drop_table("certificate_authorities")
