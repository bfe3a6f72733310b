"""Durable cloud-to-device queues and the feedback queue in SQL (SQLite and PostgreSQL).

One row per queued message. Azure's states map onto the lock columns: `lock_token IS NULL` is
Enqueued, a lock whose expiry is in the future is Invisible, an expired lock is visible again (the
sweeper also clears it, so connected devices are woken). Completed, rejected, expired, purged and
dead-lettered messages are deleted; what the service may learn about them lives on as a feedback
row, written in the same transaction as the state change, so an outcome and its feedback are never
half recorded.

Per-device serialisation: every queue mutation first locks the device's `devices` row
(`FOR NO KEY UPDATE` on PostgreSQL, which still lets foreign-key inserts through; SQLite's
`BEGIN IMMEDIATE` already serialises writers), so the depth check and the insert of a send cannot
race, and queue rows of two hub nodes are taken with `SKIP LOCKED`. `device_id` references
`devices` with `ON DELETE CASCADE`: deleting a device drops its queue in the same transaction.

The tables live on their own `MetaData` (created by migration 0004_c2d), like the CA and twin tables.
Times are integer milliseconds since the epoch, so comparisons behave the same on both backends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Row,
    String,
    Table,
    Text,
    func,
    or_,
    select,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert as sql_insert
from sqlalchemy import update as sql_update
from sqlalchemy.ext.asyncio import AsyncConnection

from tether.storage.sql.engine import Database
from tether.storage.sql.tables import DeviceRow, ident

__all__ = [
    "C2DMessage",
    "FeedbackRecord",
    "FeedbackRule",
    "NewC2DMessage",
    "SqlC2DRepository",
    "SweepResult",
    "c2d_messages",
    "c2d_metadata",
    "feedback_table",
]

c2d_metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _serial() -> BigInteger:
    return BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


c2d_messages = Table(
    "c2d_messages",
    c2d_metadata,
    Column("seq", _serial(), primary_key=True, autoincrement=True),  # iothub-sequencenumber
    Column(
        "device_id",
        ident(128),
        ForeignKey(DeviceRow.__table__.c.device_id, ondelete="CASCADE"),
        nullable=False,
    ),
    Column("generation_id", String(64), nullable=False),
    Column("message_id", String(128), nullable=False),
    Column("correlation_id", String(128), nullable=True),
    Column("user_id", String(128), nullable=True),
    Column("ack", String(16), nullable=False),
    Column("content_type", String(128), nullable=True),
    Column("content_encoding", String(64), nullable=True),
    Column("properties", Text, nullable=False),  # JSON object of application properties
    Column("body", LargeBinary, nullable=False),
    Column("enqueued_ms", BigInteger, nullable=False),
    Column("expiry_ms", BigInteger, nullable=False),
    Column("lock_token", String(64), nullable=True),
    Column("lock_expiry_ms", BigInteger, nullable=True),
    Column("delivery_count", Integer, nullable=False),
    Index("ix_c2d_messages_device_id_seq", "device_id", "seq"),
    Index("ix_c2d_messages_expiry_ms", "expiry_ms"),
    Index("ix_c2d_messages_lock_expiry_ms", "lock_expiry_ms"),
)

feedback_table = Table(
    "c2d_feedback",
    c2d_metadata,
    Column("id", _serial(), primary_key=True, autoincrement=True),
    Column("device_id", ident(128), nullable=False),  # no foreign key: feedback outlives its device
    Column("generation_id", String(64), nullable=False),
    Column("original_message_id", String(128), nullable=False),
    Column("status_code", String(32), nullable=False),
    Column("description", String(128), nullable=False),
    Column("enqueued_ms", BigInteger, nullable=False),
    Column("lock_token", String(64), nullable=True),
    Column("lock_expiry_ms", BigInteger, nullable=True),
    Index("ix_c2d_feedback_lock_token", "lock_token"),
    Index("ix_c2d_feedback_enqueued_ms", "enqueued_ms"),
)

FeedbackRule = Callable[[str, str], bool]
"""(ack mode, status code) → whether the sender asked for that feedback."""

DESCRIPTIONS = {
    "Success": "Success",
    "Expired": "Message expired",
    "DeliveryCountExceeded": "Message delivery count exceeded",
    "Rejected": "Message rejected",
    "Purged": "Message purged",
}


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000.0, tz=UTC)


@dataclass(frozen=True, slots=True)
class NewC2DMessage:
    """What a sender hands over; the repository adds sequence number, times and the lock state."""

    device_id: str
    message_id: str
    body: bytes
    ack: str = "none"
    correlation_id: str | None = None
    user_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    properties: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class C2DMessage:
    """A queued cloud-to-device message; `lock_token` is set when it was handed to a device."""

    device_id: str
    sequence_number: int
    message_id: str
    body: bytes
    ack: str
    correlation_id: str | None
    user_id: str | None
    content_type: str | None
    content_encoding: str | None
    properties: dict[str, str]
    generation_id: str
    enqueued_time: datetime
    expiry_time: datetime
    delivery_count: int
    lock_token: str | None = None
    lock_expiry: datetime | None = None


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """One feedback record, in Azure's JSON shape via `to_wire()`."""

    original_message_id: str
    device_id: str
    device_generation_id: str
    status_code: str
    description: str
    enqueued_time: datetime

    def to_wire(self) -> dict[str, str]:
        stamp = self.enqueued_time.astimezone(UTC).isoformat(timespec="milliseconds")
        return {
            "originalMessageId": self.original_message_id,
            "description": self.description,
            "deviceGenerationId": self.device_generation_id,
            "deviceId": self.device_id,
            "enqueuedTimeUtc": stamp.replace("+00:00", "Z"),
            "statusCode": self.status_code,
        }


@dataclass(frozen=True, slots=True)
class SweepResult:
    expired: int  # messages dead-lettered because their TTL passed
    unlocked: tuple[str, ...]  # devices that have a message visible again after a lock expired
    feedback_dropped: int  # feedback records older than the feedback TTL


_MESSAGE_COLUMNS = tuple(c2d_messages.c)


def _message(row: Row[Any]) -> C2DMessage:
    m = row._mapping
    lock_expiry = m["lock_expiry_ms"]
    return C2DMessage(
        device_id=m["device_id"],
        sequence_number=int(m["seq"]),
        message_id=m["message_id"],
        body=bytes(m["body"]),
        ack=m["ack"],
        correlation_id=m["correlation_id"],
        user_id=m["user_id"],
        content_type=m["content_type"],
        content_encoding=m["content_encoding"],
        properties=dict(json.loads(m["properties"])),
        generation_id=m["generation_id"],
        enqueued_time=ms_to_datetime(int(m["enqueued_ms"])),
        expiry_time=ms_to_datetime(int(m["expiry_ms"])),
        delivery_count=int(m["delivery_count"]),
        lock_token=m["lock_token"],
        lock_expiry=None if lock_expiry is None else ms_to_datetime(int(lock_expiry)),
    )


def _visible(now_ms: int) -> Any:
    return or_(c2d_messages.c.lock_token.is_(None), c2d_messages.c.lock_expiry_ms <= now_ms)


class SqlC2DRepository:
    """Queue and feedback storage over the shared `Database` of a `SqlStorage`.

    `wants_feedback(ack, status)` decides which outcomes leave a feedback record (the rule belongs
    to `tether.messaging.feedback`; it is injected so storage does not import upward)."""

    def __init__(self, db: Database, wants_feedback: FeedbackRule) -> None:
        self._db = db
        self._wants = wants_feedback

    # --- queue --------------------------------------------------------------------------------
    async def enqueue(
        self, new: NewC2DMessage, *, now_ms: int, expiry_ms: int, max_depth: int
    ) -> C2DMessage | int | None:
        """Append to the device's queue. Returns the stored message, None when the device does not
        exist, or the current depth (an int) when the queue is full. Expired messages of the device
        are dead-lettered first so they never count against the depth."""
        async with self._db.write() as conn:
            generation = await self._lock_device(conn, new.device_id)
            if generation is None:
                return None
            await self._expire(conn, now_ms, device_id=new.device_id)
            depth = await conn.scalar(
                select(func.count())
                .select_from(c2d_messages)
                .where(c2d_messages.c.device_id == new.device_id)
            )
            if int(depth or 0) >= max_depth:
                return int(depth or 0)
            values = {
                "device_id": new.device_id,
                "generation_id": generation,
                "message_id": new.message_id,
                "correlation_id": new.correlation_id,
                "user_id": new.user_id,
                "ack": new.ack,
                "content_type": new.content_type,
                "content_encoding": new.content_encoding,
                "properties": json.dumps(new.properties, separators=(",", ":")),
                "body": new.body,
                "enqueued_ms": now_ms,
                "expiry_ms": expiry_ms,
                "lock_token": None,
                "lock_expiry_ms": None,
                "delivery_count": 0,
            }
            seq = await conn.scalar(sql_insert(c2d_messages).values(**values).returning(c2d_messages.c.seq))
        return C2DMessage(
            device_id=new.device_id,
            sequence_number=int(seq or 0),
            message_id=new.message_id,
            body=new.body,
            ack=new.ack,
            correlation_id=new.correlation_id,
            user_id=new.user_id,
            content_type=new.content_type,
            content_encoding=new.content_encoding,
            properties=dict(new.properties),
            generation_id=generation,
            enqueued_time=ms_to_datetime(now_ms),
            expiry_time=ms_to_datetime(expiry_ms),
            delivery_count=0,
        )

    async def receive(
        self, device_id: str, *, now_ms: int, lock_ms: int, max_delivery_count: int
    ) -> C2DMessage | None:
        """Lock the oldest visible message: expired ones met on the way are dead-lettered (Expired),
        one whose delivery count would pass the maximum too (DeliveryCountExceeded)."""
        stmt = (
            select(*_MESSAGE_COLUMNS)
            .where(c2d_messages.c.device_id == device_id, _visible(now_ms))
            .order_by(c2d_messages.c.seq)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        async with self._db.write() as conn:
            while True:
                row = (await conn.execute(stmt)).first()
                if row is None:
                    return None
                message = _message(row)
                seq = message.sequence_number
                if int(row._mapping["expiry_ms"]) <= now_ms:
                    await self._dead_letter(conn, [message], "Expired", now_ms)
                    continue
                if message.delivery_count + 1 > max_delivery_count:
                    await self._dead_letter(conn, [message], "DeliveryCountExceeded", now_ms)
                    continue
                token = uuid.uuid4().hex
                await conn.execute(
                    sql_update(c2d_messages)
                    .where(c2d_messages.c.seq == seq)
                    .values(lock_token=token, lock_expiry_ms=now_ms + lock_ms,
                            delivery_count=message.delivery_count + 1)
                )
                return replace(
                    message,
                    lock_token=token,
                    lock_expiry=ms_to_datetime(now_ms + lock_ms),
                    delivery_count=message.delivery_count + 1,
                )

    async def settle(
        self, device_id: str, lock_token: str, outcome: str, *, now_ms: int
    ) -> C2DMessage | None:
        """`complete` | `reject` | `abandon` the message holding this unexpired lock, or `release` it
        (abandon without counting the delivery: it never left the hub); None when no message of the
        device holds the lock (unknown token, lock expired, or already settled)."""
        stmt = (
            select(*_MESSAGE_COLUMNS)
            .where(
                c2d_messages.c.device_id == device_id,
                c2d_messages.c.lock_token == lock_token,
                c2d_messages.c.lock_expiry_ms > now_ms,
            )
            .with_for_update()
        )
        async with self._db.write() as conn:
            row = (await conn.execute(stmt)).first()
            if row is None:
                return None
            message = _message(row)
            if outcome in ("abandon", "release"):
                count = message.delivery_count - (1 if outcome == "release" else 0)
                await conn.execute(
                    sql_update(c2d_messages)
                    .where(c2d_messages.c.seq == message.sequence_number)
                    .values(lock_token=None, lock_expiry_ms=None, delivery_count=max(0, count))
                )
            else:
                status = "Success" if outcome == "complete" else "Rejected"
                await self._dead_letter(conn, [message], status, now_ms)
        return message

    async def purge(self, device_id: str, *, now_ms: int) -> int | None:
        """Delete the device's whole queue (Purged feedback where asked); None for an unknown device."""
        async with self._db.write() as conn:
            if await self._lock_device(conn, device_id) is None:
                return None
            rows = (
                await conn.execute(select(*_MESSAGE_COLUMNS).where(c2d_messages.c.device_id == device_id))
            ).all()
            await self._dead_letter(conn, [_message(r) for r in rows], "Purged", now_ms)
        return len(rows)

    async def depth(self, device_id: str, *, now_ms: int) -> int:
        """Messages queued for the device (Enqueued or Invisible, not yet expired)."""
        stmt = select(func.count()).select_from(c2d_messages).where(
            c2d_messages.c.device_id == device_id, c2d_messages.c.expiry_ms > now_ms
        )
        async with self._db.read() as conn:
            return int(await conn.scalar(stmt) or 0)

    async def peek(self, device_id: str) -> list[C2DMessage]:
        """Every row of the device's queue in order (diagnostics and tests)."""
        stmt = (
            select(*_MESSAGE_COLUMNS)
            .where(c2d_messages.c.device_id == device_id)
            .order_by(c2d_messages.c.seq)
        )
        async with self._db.read() as conn:
            return [_message(r) for r in (await conn.execute(stmt)).all()]

    async def sweep(self, *, now_ms: int, feedback_ttl_ms: int, limit: int = 500) -> SweepResult:
        """Dead-letter expired messages, release expired locks, drop feedback past its TTL."""
        async with self._db.write() as conn:
            expired = await self._expire(conn, now_ms, limit=limit)
            locked = (
                await conn.execute(
                    select(c2d_messages.c.seq, c2d_messages.c.device_id)
                    .where(c2d_messages.c.lock_expiry_ms <= now_ms)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if locked:
                await conn.execute(
                    sql_update(c2d_messages)
                    .where(c2d_messages.c.seq.in_([r[0] for r in locked]))
                    .values(lock_token=None, lock_expiry_ms=None)
                )
            dropped = await conn.execute(
                sql_delete(feedback_table).where(feedback_table.c.enqueued_ms <= now_ms - feedback_ttl_ms)
            )
        devices = tuple(dict.fromkeys(r[1] for r in locked))
        return SweepResult(expired, devices, int(dropped.rowcount or 0))

    # --- feedback -----------------------------------------------------------------------------
    async def feedback_lock(
        self, *, max_records: int, now_ms: int, lock_ms: int
    ) -> tuple[str, list[FeedbackRecord]] | None:
        """Lock up to `max_records` of the oldest available feedback records under one new token."""
        async with self._db.write() as conn:
            rows = (
                await conn.execute(
                    select(feedback_table)
                    .where(or_(feedback_table.c.lock_token.is_(None),
                               feedback_table.c.lock_expiry_ms <= now_ms))
                    .order_by(feedback_table.c.id)
                    .limit(max_records)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return None
            token = uuid.uuid4().hex
            await conn.execute(
                sql_update(feedback_table)
                .where(feedback_table.c.id.in_([r._mapping["id"] for r in rows]))
                .values(lock_token=token, lock_expiry_ms=now_ms + lock_ms)
            )
        return token, [_feedback(r) for r in rows]

    async def feedback_settle(self, lock_token: str, *, complete: bool, now_ms: int) -> bool:
        """Delete (complete) or release (abandon) a locked batch; False when the lock is unknown or lost."""
        where = (feedback_table.c.lock_token == lock_token, feedback_table.c.lock_expiry_ms > now_ms)
        stmt: Any = (
            sql_delete(feedback_table).where(*where)
            if complete
            else sql_update(feedback_table).where(*where).values(lock_token=None, lock_expiry_ms=None)
        )
        async with self._db.write() as conn:
            result = await conn.execute(stmt)
        return bool(result.rowcount)

    async def feedback_count(self) -> int:
        async with self._db.read() as conn:
            return int(await conn.scalar(select(func.count()).select_from(feedback_table)) or 0)

    # --- helpers ------------------------------------------------------------------------------
    async def _lock_device(self, conn: AsyncConnection, device_id: str) -> str | None:
        """The device's generation id, with its row locked against concurrent queue changes."""
        devices = DeviceRow.__table__
        stmt = select(devices.c.generation_id).where(devices.c.device_id == device_id)
        if self._db.is_postgres:
            stmt = stmt.with_for_update(key_share=True)  # FOR NO KEY UPDATE
        value = await conn.scalar(stmt)
        return None if value is None else str(value)

    async def _expire(
        self, conn: AsyncConnection, now_ms: int, *, device_id: str | None = None, limit: int = 500
    ) -> int:
        stmt = select(*_MESSAGE_COLUMNS).where(c2d_messages.c.expiry_ms <= now_ms)
        if device_id is not None:
            stmt = stmt.where(c2d_messages.c.device_id == device_id)
        rows = (await conn.execute(stmt.order_by(c2d_messages.c.expiry_ms).limit(limit)
                                   .with_for_update(skip_locked=True))).all()
        await self._dead_letter(conn, [_message(r) for r in rows], "Expired", now_ms)
        return len(rows)

    async def _dead_letter(
        self, conn: AsyncConnection, messages: Sequence[C2DMessage], status: str, now_ms: int
    ) -> None:
        """Remove the messages and write the feedback their senders asked for, in one transaction."""
        if not messages:
            return
        await conn.execute(
            sql_delete(c2d_messages).where(c2d_messages.c.seq.in_([m.sequence_number for m in messages]))
        )
        feedback = [
            {
                "device_id": m.device_id,
                "generation_id": m.generation_id,
                "original_message_id": m.message_id,
                "status_code": status,
                "description": DESCRIPTIONS[status],
                "enqueued_ms": now_ms,
                "lock_token": None,
                "lock_expiry_ms": None,
            }
            for m in messages
            if self._wants(m.ack, status)
        ]
        if feedback:
            await conn.execute(sql_insert(feedback_table), feedback)


def _feedback(row: Row[Any]) -> FeedbackRecord:
    m = row._mapping
    return FeedbackRecord(
        original_message_id=m["original_message_id"],
        device_id=m["device_id"],
        device_generation_id=m["generation_id"],
        status_code=m["status_code"],
        description=m["description"],
        enqueued_time=ms_to_datetime(int(m["enqueued_ms"])),
    )
