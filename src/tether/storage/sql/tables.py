"""Table definitions used by the repositories (and by Alembic autogenerate as `target_metadata`).

The schema itself is created only by the hand-written migrations in `migrations/versions/`; keep this
module and the migrations in step (tests compare them). Identifiers use the `C` collation on PostgreSQL
so that ordering and keyset paging are byte order, as on SQLite, and comparisons are case-sensitive.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, MetaData, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def ident(length: int) -> TypeEngine[str]:
    """A case-sensitive identifier column with byte ordering on both backends."""
    return String(length).with_variant(String(length, collation="C"), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes everywhere: SQLite has no timestamp type and returns naive values."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DeviceRow(Base):
    """A device identity: the full Azure JSON in `doc`, plus the columns queries and writes need.

    Connection state and last activity live only in their own columns (not in `doc`): the hub writes
    them in batches without touching the etag, and keeping them out of the document means such a
    batch can never overwrite a concurrent registry update of the document.
    """

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(ident(128), primary_key=True)
    etag: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    auth_type: Mapped[str] = mapped_column(String(32))
    generation_id: Mapped[str] = mapped_column(String(64))
    doc: Mapped[str] = mapped_column(Text)
    connection_state: Mapped[str] = mapped_column(String(16))
    connection_state_updated_time: Mapped[datetime] = mapped_column(UtcDateTime())
    last_activity_time: Mapped[datetime] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class PolicyRow(Base):
    """A shared access policy; `permissions` is a JSON list of Permission values."""

    __tablename__ = "policies"

    name: Mapped[str] = mapped_column(ident(64), primary_key=True)
    primary_key: Mapped[str] = mapped_column(Text)
    secondary_key: Mapped[str] = mapped_column(Text)
    permissions: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AuditRow(Base):
    """One security-relevant event. Append-only; queried newest first, filtered by time. Text columns
    (no length limit to trip over): `AuditLog` truncates client-supplied values before they get here."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_time", "time"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    time: Mapped[datetime] = mapped_column(UtcDateTime())
    action: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    principal: Mapped[str | None] = mapped_column(Text)
    credential: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    peer: Mapped[str | None] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
