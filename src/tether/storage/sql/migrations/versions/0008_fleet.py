"""Fleet features (see tether.storage.sql.fleet_tables): file uploads and file upload notifications,
jobs and their devices, configurations, leases; and the twin's `configurations` section (which
configuration is Applied / Targeted on the device, see tether.messaging.configurations), on device and
module twins alike.

Revision ID: 0008_fleet
Revises: 0007_modules
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_fleet"
down_revision: str | None = "0007_modules"
branch_labels: str | None = None
depends_on: str | None = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def _serial() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "file_uploads",
        sa.Column("correlation_id", sa.String(64), nullable=False),
        sa.Column("device_id", _ident(128), nullable=False),
        sa.Column("blob_name", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("expiry_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("correlation_id", name="pk_file_uploads"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"],
                                name="fk_file_uploads_device_id_devices", ondelete="CASCADE"),
    )
    op.create_index("ix_file_uploads_device_id", "file_uploads", ["device_id"])
    op.create_index("ix_file_uploads_expiry_ms", "file_uploads", ["expiry_ms"])

    op.create_table(
        "file_notifications",
        sa.Column("id", _serial(), autoincrement=True, nullable=False),
        sa.Column("device_id", _ident(128), nullable=False),
        sa.Column("blob_name", sa.Text(), nullable=False),
        sa.Column("blob_uri", sa.Text(), nullable=False),
        sa.Column("blob_size", sa.BigInteger(), nullable=False),
        sa.Column("last_updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("enqueued_ms", sa.BigInteger(), nullable=False),
        sa.Column("expiry_ms", sa.BigInteger(), nullable=False),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.Column("lock_token", sa.String(64), nullable=True),
        sa.Column("lock_expiry_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_file_notifications"),
    )
    op.create_index("ix_file_notifications_lock_token", "file_notifications", ["lock_token"])
    op.create_index("ix_file_notifications_expiry_ms", "file_notifications", ["expiry_ms"])

    op.create_table(
        "jobs",
        sa.Column("job_id", _ident(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("end_ms", sa.BigInteger(), nullable=True),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("doc", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_created_ms", "jobs", ["created_ms"])

    op.create_table(
        "job_devices",
        sa.Column("job_id", _ident(128), nullable=False),
        sa.Column("device_id", _ident(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=True),
        sa.Column("end_ms", sa.BigInteger(), nullable=True),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("job_id", "device_id", name="pk_job_devices"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.job_id"], name="fk_job_devices_job_id_jobs",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_job_devices_job_id_status", "job_devices", ["job_id", "status"])

    op.create_table(
        "configurations",
        sa.Column("id", _ident(128), nullable=False),
        sa.Column("etag", sa.String(64), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("doc", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_configurations"),
    )

    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leases"),
    )

    for table in ("twins", "module_twins"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("configurations", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    for table in ("module_twins", "twins"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("configurations")
    op.drop_table("leases")
    op.drop_table("configurations")
    op.drop_table("job_devices")
    op.drop_table("jobs")
    op.drop_table("file_notifications")
    op.drop_table("file_uploads")
