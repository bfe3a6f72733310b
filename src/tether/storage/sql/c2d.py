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

Writes come as `x_in(conn, …)` operations that share a transaction the caller owns (the service's
group commit), plus `x(…)` wrappers running through `run`. A send is one prebuilt INSERT … SELECT
(depth check and optional lock-on-enqueue included); PUBACK completions are one DELETE … RETURNING.

The tables live on their own `MetaData` (created by migration 0004_c2d), like the CA and twin tables.
Times are integer milliseconds since the epoch, so comparisons behave the same on both backends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar

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
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    true,
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
    "TransactionRunner",
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

T = TypeVar("T")

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


def _visible(now_ms: Any) -> Any:
    return or_(c2d_messages.c.lock_token.is_(None), c2d_messages.c.lock_expiry_ms <= now_ms)


def _enqueue_statement() -> Any:
    """A send as one INSERT … SELECT, built once: the device's generation, the depth check and the
    lock decision are part of it, so a send is one round trip (and no statement compilation)."""
    c, device = c2d_messages.c, DeviceRow.__table__
    now = bindparam("e_now", type_=BigInteger)
    counts = (
        select(func.count().label("depth"), func.count(case((_visible(now), 1))).label("visible"))
        .where(c.device_id == bindparam("e_device", type_=c.device_id.type), c.expiry_ms > now)
        .subquery()
    )
    idle = and_(bindparam("e_lock", type_=Integer) == 1, counts.c.visible == 0)  # nothing older waits
    columns: dict[str, Any] = {"device_id": device.c.device_id, "generation_id": device.c.generation_id}
    for name in ("message_id", "correlation_id", "user_id", "ack", "content_type", "content_encoding",
                 "properties", "body", "expiry_ms"):
        columns[name] = bindparam(f"e_{name}", type_=c[name].type)
    columns["enqueued_ms"] = now
    columns["lock_token"] = case((idle, bindparam("e_token", type_=c.lock_token.type)))
    columns["lock_expiry_ms"] = case((idle, bindparam("e_lock_expiry", type_=BigInteger)))
    columns["delivery_count"] = case((idle, 1), else_=0)
    source = (
        select(*columns.values())
        .select_from(device.join(counts, true()))
        .where(device.c.device_id == bindparam("e_device"),
               counts.c.depth < bindparam("e_max_depth", type_=Integer))
    )
    insert = sql_insert(c2d_messages).from_select(list(columns), source)
    return insert.returning(c.seq, c.generation_id, c.lock_token)


_ENQUEUE = _enqueue_statement()


class TransactionRunner(Protocol):
    """Runs `op(conn)` in a write transaction, returns its result once committed (e.g. a group commit:
    `tether.messaging.c2d.GroupCommit`). An op may run again after a rollback: no outside effects."""

    def __call__(self, op: Callable[[AsyncConnection], Awaitable[T]]) -> Awaitable[T]: ...


class SqlC2DRepository:
    """Queue and feedback storage over the shared `Database` of a `SqlStorage`.

    `wants_feedback(ack, status)` decides which outcomes leave a feedback record (the rule belongs
    to `tether.messaging.feedback`; it is injected so storage does not import upward). Every write
    exists twice: `x_in(conn, …)` works inside a transaction the caller owns (so several can share
    one commit), `x(…)` runs it through `run` (one transaction per call unless a group commit is
    plugged in)."""

    def __init__(self, db: Database, wants_feedback: FeedbackRule, *,
                 run: TransactionRunner | None = None) -> None:
        self._db = db
        self._wants = wants_feedback
        self.run: TransactionRunner = run or self._transaction

    async def _transaction(self, op: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self._db.write() as conn:
            return await op(conn)

    # --- queue --------------------------------------------------------------------------------
    async def enqueue(
        self, new: NewC2DMessage, *, now_ms: int, expiry_ms: int, max_depth: int, lock_ms: int | None = None
    ) -> C2DMessage | int | None:
        return await self.run(lambda conn: self.enqueue_in(
            conn, new, now_ms=now_ms, expiry_ms=expiry_ms, max_depth=max_depth, lock_ms=lock_ms))

    async def enqueue_in(
        self, conn: AsyncConnection, new: NewC2DMessage, *, now_ms: int, expiry_ms: int, max_depth: int,
        lock_ms: int | None = None,
    ) -> C2DMessage | int | None:
        """Append to the device's queue: the stored message, None for an unknown device, or the depth
        (an int) when the queue is full. Expired messages do not count (the sweeper dead-letters them).
        With `lock_ms` it is stored locked for one delivery (delivery count 1, as by `receive`) if no
        other message of the device is visible, so the caller may hand it straight to the device's
        connection in queue order; else Enqueued. The returned `lock_token` tells which."""
        if self._db.is_postgres and await self._lock_device(conn, new.device_id) is None:
            return None  # (SQLite's BEGIN IMMEDIATE already serialises the writers)
        params = {
            "e_device": new.device_id, "e_now": now_ms, "e_max_depth": max_depth, "e_expiry_ms": expiry_ms,
            "e_lock": int(lock_ms is not None), "e_token": uuid.uuid4().hex,
            "e_lock_expiry": now_ms + (lock_ms or 0),
            "e_message_id": new.message_id, "e_correlation_id": new.correlation_id, "e_user_id": new.user_id,
            "e_ack": new.ack, "e_content_type": new.content_type, "e_content_encoding": new.content_encoding,
            "e_properties": json.dumps(new.properties, separators=(",", ":")), "e_body": new.body,
        }
        stored = (await conn.execute(_ENQUEUE, params)).first()
        if stored is None:  # no such device, or its queue is full
            if await self._lock_device(conn, new.device_id) is None:
                return None
            return int(await conn.scalar(select(func.count()).where(
                c2d_messages.c.device_id == new.device_id, c2d_messages.c.expiry_ms > now_ms)) or 0)
        seq, generation, token = int(stored[0]), str(stored[1]), stored[2]
        lock_expiry = None if token is None or lock_ms is None else now_ms + lock_ms
        return C2DMessage(
            device_id=new.device_id, sequence_number=seq, message_id=new.message_id, body=new.body,
            ack=new.ack, correlation_id=new.correlation_id, user_id=new.user_id, generation_id=generation,
            content_type=new.content_type, content_encoding=new.content_encoding,
            properties=dict(new.properties), enqueued_time=ms_to_datetime(now_ms),
            expiry_time=ms_to_datetime(expiry_ms), delivery_count=0 if token is None else 1,
            lock_token=token, lock_expiry=None if lock_expiry is None else ms_to_datetime(lock_expiry),
        )

    async def receive(self, device_id: str, *, now_ms: int, lock_ms: int, max_delivery_count: int,
                      limit: int = 1) -> list[C2DMessage]:
        return await self.run(lambda conn: self.receive_in(
            conn, device_id, now_ms=now_ms, lock_ms=lock_ms, max_delivery_count=max_delivery_count,
            limit=limit))

    async def receive_in(
        self, conn: AsyncConnection, device_id: str, *, now_ms: int, lock_ms: int, max_delivery_count: int,
        limit: int = 1,
    ) -> list[C2DMessage]:
        """Lock up to `limit` of the oldest visible messages (each under its own token), in queue
        order: expired ones met on the way are dead-lettered (Expired), ones whose delivery count
        would pass the maximum too (DeliveryCountExceeded)."""
        stmt = (
            select(*_MESSAGE_COLUMNS)
            .where(c2d_messages.c.device_id == device_id, _visible(now_ms))
            .order_by(c2d_messages.c.seq)
            .with_for_update(skip_locked=True)
        )
        taken: list[C2DMessage] = []
        while len(taken) < limit:
            rows = (await conn.execute(stmt.limit(limit - len(taken)))).all()
            if not rows:
                break
            dead: dict[str, list[C2DMessage]] = {"Expired": [], "DeliveryCountExceeded": []}
            locked: list[C2DMessage] = []
            for row, message in zip(rows, map(_message, rows), strict=True):
                if int(row._mapping["expiry_ms"]) <= now_ms:
                    dead["Expired"].append(message)
                elif message.delivery_count + 1 > max_delivery_count:
                    dead["DeliveryCountExceeded"].append(message)
                else:
                    locked.append(replace(message, lock_token=uuid.uuid4().hex,
                                          lock_expiry=ms_to_datetime(now_ms + lock_ms),
                                          delivery_count=message.delivery_count + 1))
            for status, messages in dead.items():
                await self._dead_letter(conn, messages, status, now_ms)
            if locked:
                await conn.execute(
                    sql_update(c2d_messages)
                    .where(c2d_messages.c.seq == bindparam("b_seq"))
                    .values(lock_token=bindparam("b_token"), lock_expiry_ms=now_ms + lock_ms,
                            delivery_count=bindparam("b_count")),
                    [{"b_seq": m.sequence_number, "b_token": m.lock_token, "b_count": m.delivery_count}
                     for m in locked],
                )
                taken.extend(locked)
        return taken

    async def settle(self, device_id: str, token: str, outcome: str, *, now_ms: int) -> C2DMessage | None:
        return await self.run(lambda conn: self.settle_in(conn, device_id, token, outcome, now_ms=now_ms))

    async def settle_in(
        self, conn: AsyncConnection, device_id: str, lock_token: str, outcome: str, *, now_ms: int
    ) -> C2DMessage | None:
        """`complete` | `reject` | `abandon` the message holding this unexpired lock, or `release` it
        (abandon without counting the delivery: it never left the hub); None when no message of the
        device holds the lock (unknown token, lock expired, or already settled)."""
        row = (await conn.execute(
            select(*_MESSAGE_COLUMNS)
            .where(c2d_messages.c.device_id == device_id, c2d_messages.c.lock_token == lock_token,
                   c2d_messages.c.lock_expiry_ms > now_ms)
            .with_for_update()
        )).first()
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

    async def complete_many_in(
        self, conn: AsyncConnection, messages: Sequence[C2DMessage], *, now_ms: int
    ) -> list[C2DMessage]:
        """Complete many locked messages at once (Success feedback where asked), by sequence number
        and lock token; returns those that still held their lock (the others were, or will be,
        delivered again)."""
        seqs = [m.sequence_number for m in messages if m.lock_token is not None]
        if not seqs:
            return []
        # Lock tokens are unique, so "seq in …, token in …" only matches the pairs given.
        rows = (await conn.execute(
            sql_delete(c2d_messages)
            .where(c2d_messages.c.seq.in_(seqs), c2d_messages.c.lock_expiry_ms > now_ms,
                   c2d_messages.c.lock_token.in_([m.lock_token for m in messages if m.lock_token]))
            .returning(*_MESSAGE_COLUMNS)
        )).all()
        done = [_message(r) for r in rows]
        await self._write_feedback(conn, done, "Success", now_ms)
        return done

    async def purge(self, device_id: str, *, now_ms: int) -> int | None:
        return await self.run(lambda conn: self.purge_in(conn, device_id, now_ms=now_ms))

    async def purge_in(self, conn: AsyncConnection, device_id: str, *, now_ms: int) -> int | None:
        """Delete the device's whole queue (Purged feedback where asked); None for an unknown device."""
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
        stmt = select(*_MESSAGE_COLUMNS).where(c2d_messages.c.device_id == device_id).order_by("seq")
        async with self._db.read() as conn:
            return [_message(r) for r in (await conn.execute(stmt)).all()]

    async def sweep(self, *, now_ms: int, feedback_ttl_ms: int, limit: int = 500) -> SweepResult:
        return await self.run(partial(self.sweep_in, now_ms=now_ms, feedback_ttl_ms=feedback_ttl_ms,
                                      limit=limit))

    async def sweep_in(
        self, conn: AsyncConnection, *, now_ms: int, feedback_ttl_ms: int, limit: int
    ) -> SweepResult:
        """Dead-letter expired messages, release expired locks, drop feedback past its TTL."""
        expired = await self._expire(conn, now_ms, limit=limit)
        locked = (await conn.execute(
            select(c2d_messages.c.seq, c2d_messages.c.device_id)
            .where(c2d_messages.c.lock_expiry_ms <= now_ms)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )).all()
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

        async def op(conn: AsyncConnection) -> tuple[str, list[FeedbackRecord]] | None:
            rows = (await conn.execute(
                select(feedback_table)
                .where(or_(feedback_table.c.lock_token.is_(None), feedback_table.c.lock_expiry_ms <= now_ms))
                .order_by(feedback_table.c.id)
                .limit(max_records)
                .with_for_update(skip_locked=True)
            )).all()
            if not rows:
                return None
            token = uuid.uuid4().hex
            await conn.execute(
                sql_update(feedback_table)
                .where(feedback_table.c.id.in_([r._mapping["id"] for r in rows]))
                .values(lock_token=token, lock_expiry_ms=now_ms + lock_ms)
            )
            return token, [_feedback(r) for r in rows]

        return await self.run(op)

    async def feedback_settle(self, lock_token: str, *, complete: bool, now_ms: int) -> bool:
        """Delete (complete) or release (abandon) a locked batch; False when the lock is unknown or lost."""
        where = (feedback_table.c.lock_token == lock_token, feedback_table.c.lock_expiry_ms > now_ms)
        stmt: Any = (
            sql_delete(feedback_table).where(*where)
            if complete
            else sql_update(feedback_table).where(*where).values(lock_token=None, lock_expiry_ms=None)
        )

        async def op(conn: AsyncConnection) -> bool:
            return bool((await conn.execute(stmt)).rowcount)

        return await self.run(op)

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

    async def _expire(self, conn: AsyncConnection, now_ms: int, *, limit: int = 500) -> int:
        stmt = select(*_MESSAGE_COLUMNS).where(c2d_messages.c.expiry_ms <= now_ms)
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
        await self._write_feedback(conn, messages, status, now_ms)

    async def _write_feedback(
        self, conn: AsyncConnection, messages: Sequence[C2DMessage], status: str, now_ms: int
    ) -> None:
        feedback = [
            {"device_id": m.device_id, "generation_id": m.generation_id, "original_message_id": m.message_id,
             "status_code": status, "description": DESCRIPTIONS[status], "enqueued_ms": now_ms,
             "lock_token": None, "lock_expiry_ms": None}
            for m in messages
            if self._wants(m.ack, status)
        ]
        if feedback:
            await conn.execute(sql_insert(feedback_table), feedback)


def _feedback(row: Row[Any]) -> FeedbackRecord:
    m = row._mapping
    return FeedbackRecord(
        original_message_id=m["original_message_id"], device_id=m["device_id"],
        device_generation_id=m["generation_id"], status_code=m["status_code"], description=m["description"],
        enqueued_time=ms_to_datetime(int(m["enqueued_ms"])),
    )
