"""File uploads in SQL: the uploads devices asked for, and the service-bound notification queue.

An upload (`file_uploads`) is admitted under the device's cap of uploads in flight in one write
transaction (expired ones of the device are dropped first), and removed by the device's completion
(matched on correlation id AND device id, so one device cannot complete another's upload).

Notifications (`file_notifications`) are handed out in locked batches like C2D feedback: a lock
counts a delivery; a batch not completed within its lock is offered again, until the delivery count
or the notification's time to live runs out (then `sweep` deletes it).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, and_, func, or_, select
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert as sql_insert
from sqlalchemy import update as sql_update
from sqlalchemy.ext.asyncio import AsyncConnection

from tether.storage.sql.engine import Database
from tether.storage.sql.fleet_tables import file_notifications, file_uploads

__all__ = ["NOTIFY_GRACE_MS", "FileNotificationRecord", "SqlFileUploadRepository"]

NOTIFY_GRACE_MS = 3_600_000  # a device may still notify this long after its SAS expired


@dataclass(frozen=True, slots=True)
class FileNotificationRecord:
    id: int
    device_id: str
    blob_name: str
    blob_uri: str
    blob_size: int
    last_updated_ms: int
    enqueued_ms: int
    delivery_count: int


def _record(row: Row[Any]) -> FileNotificationRecord:
    m = row._mapping
    return FileNotificationRecord(int(m["id"]), m["device_id"], m["blob_name"], m["blob_uri"],
                                  int(m["blob_size"]), int(m["last_updated_ms"]), int(m["enqueued_ms"]),
                                  int(m["delivery_count"]))


class SqlFileUploadRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    # --- uploads --------------------------------------------------------------------------------
    async def begin(self, *, correlation_id: str, device_id: str, blob_name: str, now_ms: int,
                    expiry_ms: int, max_in_flight: int) -> bool:
        """Admit an upload; False when the device already has `max_in_flight` whose SAS is still valid."""
        async with self._db.write() as conn:
            await conn.execute(sql_delete(file_uploads).where(and_(
                file_uploads.c.device_id == device_id,
                file_uploads.c.expiry_ms <= now_ms - NOTIFY_GRACE_MS)))
            count = await conn.scalar(select(func.count()).select_from(file_uploads).where(and_(
                file_uploads.c.device_id == device_id, file_uploads.c.expiry_ms > now_ms)))
            if int(count or 0) >= max_in_flight:
                return False
            await conn.execute(sql_insert(file_uploads), [{
                "correlation_id": correlation_id, "device_id": device_id, "blob_name": blob_name,
                "created_ms": now_ms, "expiry_ms": expiry_ms}])
        return True

    async def finish(self, *, correlation_id: str, device_id: str) -> str | None:
        """Remove the device's upload; its blob name, or None when there is no such upload."""
        async with self._db.write() as conn:
            row = (await conn.execute(select(file_uploads.c.blob_name).where(and_(
                file_uploads.c.correlation_id == correlation_id,
                file_uploads.c.device_id == device_id)))).first()
            if row is None:
                return None
            await conn.execute(sql_delete(file_uploads).where(
                file_uploads.c.correlation_id == correlation_id))
        return str(row[0])

    async def in_flight(self, device_id: str, now_ms: int) -> int:
        async with self._db.read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(file_uploads).where(and_(
                file_uploads.c.device_id == device_id, file_uploads.c.expiry_ms > now_ms))) or 0)

    # --- notifications ----------------------------------------------------------------------------
    async def enqueue(self, *, device_id: str, blob_name: str, blob_uri: str, blob_size: int,
                      last_updated_ms: int, now_ms: int, ttl_ms: int) -> None:
        async with self._db.write() as conn:
            await conn.execute(sql_insert(file_notifications), [{
                "device_id": device_id, "blob_name": blob_name, "blob_uri": blob_uri, "blob_size": blob_size,
                "last_updated_ms": last_updated_ms, "enqueued_ms": now_ms, "expiry_ms": now_ms + ttl_ms,
                "delivery_count": 0, "lock_token": None, "lock_expiry_ms": None}])

    async def lock(self, *, max_records: int, now_ms: int, lock_ms: int,
                   max_delivery_count: int) -> tuple[str, list[FileNotificationRecord]] | None:
        """Lock up to `max_records` of the oldest deliverable notifications under one new token."""
        t = file_notifications
        async with self._db.write() as conn:
            rows = (await conn.execute(
                select(t)
                .where(or_(t.c.lock_token.is_(None), t.c.lock_expiry_ms <= now_ms))
                .where(t.c.expiry_ms > now_ms, t.c.delivery_count < max_delivery_count)
                .order_by(t.c.id).limit(max_records).with_for_update(skip_locked=True)
            )).all()
            if not rows:
                return None
            token = uuid.uuid4().hex
            await conn.execute(sql_update(t).where(t.c.id.in_([r._mapping["id"] for r in rows]))
                               .values(lock_token=token, lock_expiry_ms=now_ms + lock_ms,
                                       delivery_count=t.c.delivery_count + 1))
        return token, [_record(r) for r in rows]

    async def settle(self, lock_token: str, *, complete: bool, now_ms: int) -> bool:
        """Delete (complete) or release (abandon) a locked batch; False when the lock is unknown or lost."""
        t = file_notifications
        where = (t.c.lock_token == lock_token, t.c.lock_expiry_ms > now_ms)
        stmt: Any = (sql_delete(t).where(*where) if complete
                     else sql_update(t).where(*where).values(lock_token=None, lock_expiry_ms=None))
        async with self._db.write() as conn:
            return bool((await conn.execute(stmt)).rowcount)

    async def count(self) -> int:
        async with self._db.read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(file_notifications)) or 0)

    async def sweep(self, *, now_ms: int, max_delivery_count: int) -> int:
        """Delete expired uploads, and notifications past their TTL or delivery count (not locked)."""
        t = file_notifications

        async def run(conn: AsyncConnection) -> int:
            await conn.execute(sql_delete(file_uploads).where(
                file_uploads.c.expiry_ms <= now_ms - NOTIFY_GRACE_MS))
            result = await conn.execute(sql_delete(t).where(
                or_(t.c.expiry_ms <= now_ms, t.c.delivery_count >= max_delivery_count),
                or_(t.c.lock_token.is_(None), t.c.lock_expiry_ms <= now_ms)))
            return int(result.rowcount or 0)

        async with self._db.write() as conn:
            return await run(conn)
