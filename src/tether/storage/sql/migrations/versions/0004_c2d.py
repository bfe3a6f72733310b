"""Cloud-to-device queues and the feedback queue (see tether.storage.sql.c2d). Deleting a device
deletes its queued messages (ON DELETE CASCADE); feedback records outlive the device.

Revision ID: 0004_c2d
Revises: 0003_twins
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_c2d"
down_revision: str | None = "0003_twins"
branch_labels: str | None = None
depends_on: str | None = None


def _ident(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(sa.String(length, collation="C"), "postgresql")


def _serial() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "c2d_messages",
        sa.Column("seq", _serial(), autoincrement=True, nullable=False),
        sa.Column("device_id", _ident(128), nullable=False),
        sa.Column("generation_id", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("correlation_id", sa.String(128), nullable=True),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("ack", sa.String(16), nullable=False),
        sa.Column("content_type", sa.String(128), nullable=True),
        sa.Column("content_encoding", sa.String(64), nullable=True),
        sa.Column("properties", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("enqueued_ms", sa.BigInteger(), nullable=False),
        sa.Column("expiry_ms", sa.BigInteger(), nullable=False),
        sa.Column("lock_token", sa.String(64), nullable=True),
        sa.Column("lock_expiry_ms", sa.BigInteger(), nullable=True),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_c2d_messages"),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name="fk_c2d_messages_device_id_devices",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_c2d_messages_device_id_seq", "c2d_messages", ["device_id", "seq"])
    op.create_index("ix_c2d_messages_expiry_ms", "c2d_messages", ["expiry_ms"])
    op.create_index("ix_c2d_messages_lock_expiry_ms", "c2d_messages", ["lock_expiry_ms"])

    op.create_table(
        "c2d_feedback",
        sa.Column("id", _serial(), autoincrement=True, nullable=False),
        sa.Column("device_id", _ident(128), nullable=False),
        sa.Column("generation_id", sa.String(64), nullable=False),
        sa.Column("original_message_id", sa.String(128), nullable=False),
        sa.Column("status_code", sa.String(32), nullable=False),
        sa.Column("description", sa.String(128), nullable=False),
        sa.Column("enqueued_ms", sa.BigInteger(), nullable=False),
        sa.Column("lock_token", sa.String(64), nullable=True),
        sa.Column("lock_expiry_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_c2d_feedback"),
    )
    op.create_index("ix_c2d_feedback_lock_token", "c2d_feedback", ["lock_token"])
    op.create_index("ix_c2d_feedback_enqueued_ms", "c2d_feedback", ["enqueued_ms"])


def downgrade() -> None:
    op.drop_table("c2d_feedback")
    op.drop_table("c2d_messages")
