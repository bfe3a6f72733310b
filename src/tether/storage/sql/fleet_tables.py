"""Tables of the fleet features (migration 0008_fleet): file uploads and their notifications, jobs and
their per-device rows, configurations, and leases (which hub node leads background work).

They live on their own `MetaData`, like the CA, twin and C2D tables. Times are integer milliseconds
since the epoch, so comparisons behave the same on SQLite and PostgreSQL.

- `file_uploads`: an upload a device asked for (`POST /devices/{id}/files`) and has not yet notified;
  its correlation id is the key, it expires with its SAS. Deleting the device deletes them.
- `file_notifications`: the service-bound queue of finished uploads, locked in batches like C2D
  feedback (and, like feedback, outliving the device).
- `jobs` / `job_devices`: every job (scheduled twin update or method, import, export) with its request
  and state in `doc`; the devices of a scheduled job, one row each, with the outcome once known.
- `configurations`: automatic device configurations, the document in `doc`.
- `leases`: one row per background role; the holder renews it before `expires_ms`.
"""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, ForeignKey, Index, Integer, MetaData, String, Table, Text

from tether.storage.sql.tables import DeviceRow, ident

__all__ = [
    "configurations_table",
    "file_notifications",
    "file_uploads",
    "fleet_metadata",
    "job_devices",
    "jobs_table",
    "leases_table",
]


def _serial() -> BigInteger:
    return BigInteger().with_variant(Integer(), "sqlite")


fleet_metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

file_uploads = Table(
    "file_uploads",
    fleet_metadata,
    Column("correlation_id", String(64), primary_key=True),
    Column("device_id", ident(128), ForeignKey(DeviceRow.__table__.c.device_id, ondelete="CASCADE"),
           nullable=False),
    Column("blob_name", Text, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("expiry_ms", BigInteger, nullable=False),
    Index("ix_file_uploads_device_id", "device_id"),
    Index("ix_file_uploads_expiry_ms", "expiry_ms"),
)

file_notifications = Table(
    "file_notifications",
    fleet_metadata,
    Column("id", _serial(), primary_key=True, autoincrement=True),
    Column("device_id", ident(128), nullable=False),
    Column("blob_name", Text, nullable=False),
    Column("blob_uri", Text, nullable=False),
    Column("blob_size", BigInteger, nullable=False),
    Column("last_updated_ms", BigInteger, nullable=False),
    Column("enqueued_ms", BigInteger, nullable=False),
    Column("expiry_ms", BigInteger, nullable=False),
    Column("delivery_count", Integer, nullable=False),
    Column("lock_token", String(64), nullable=True),
    Column("lock_expiry_ms", BigInteger, nullable=True),
    Index("ix_file_notifications_lock_token", "lock_token"),
    Index("ix_file_notifications_expiry_ms", "expiry_ms"),
)

jobs_table = Table(
    "jobs",
    fleet_metadata,
    Column("job_id", ident(128), primary_key=True),
    Column("kind", String(16), nullable=False),  # "device" (jobs v2) | "registry" (import/export)
    Column("type", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("start_ms", BigInteger, nullable=False),
    Column("end_ms", BigInteger, nullable=True),
    Column("updated_ms", BigInteger, nullable=False),
    Column("doc", JSON, nullable=False),
    Index("ix_jobs_status", "status"),
    Index("ix_jobs_created_ms", "created_ms"),
)

job_devices = Table(
    "job_devices",
    fleet_metadata,
    Column("job_id", ident(128), ForeignKey(jobs_table.c.job_id, ondelete="CASCADE"), primary_key=True),
    Column("device_id", ident(128), primary_key=True),
    Column("status", String(16), nullable=False),  # pending | running | completed | failed | canceled
    Column("created_ms", BigInteger, nullable=False),
    Column("start_ms", BigInteger, nullable=True),
    Column("end_ms", BigInteger, nullable=True),
    Column("updated_ms", BigInteger, nullable=False),
    Column("outcome", JSON, nullable=True),
    Column("error", JSON, nullable=True),
    Index("ix_job_devices_job_id_status", "job_id", "status"),
)

configurations_table = Table(
    "configurations",
    fleet_metadata,
    Column("id", ident(128), primary_key=True),
    Column("etag", String(64), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("updated_ms", BigInteger, nullable=False),
    Column("doc", JSON, nullable=False),
)

leases_table = Table(
    "leases",
    fleet_metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
)
