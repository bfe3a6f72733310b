"""Device identities in SQL: optimistic concurrency by etag, all-or-nothing batches (bulk insert and the
mixed insert/replace/delete batches of Azure's bulk registry call), keyset paging, and batched
connection-state updates that leave the etag alone (as Azure does).

Every write is built by the same few helpers (`_replace_stmt`, `_delete_stmt`, `_insert_new`,
`_checked`), so a single replace and the same replace inside a batch cannot drift apart."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Delete, String, Update, bindparam, case, func, or_, select, update
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert as sql_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from tether.errors import Conflict, NotFound, PreconditionFailed
from tether.registry.models import ConnectionState, Device, DeviceStatus, RegistryStatistics, utcnow
from tether.storage.base import ActivityUpdate
from tether.storage.sql.engine import Database
from tether.storage.sql.modules import apply_module_activity, reset_module_connection_states
from tether.storage.sql.tables import DeviceRow, UtcDateTime

# Kept in their own columns, never in `doc` (see DeviceRow).
_ACTIVITY_FIELDS = {"connectionState", "connectionStateUpdatedTime", "lastActivityTime"}
_ROW_COLUMNS = (
    DeviceRow.doc,
    DeviceRow.connection_state,
    DeviceRow.connection_state_updated_time,
    DeviceRow.last_activity_time,
)
_IN_CHUNK = 500  # ids per IN (...) lookup; well under SQLite's and asyncpg's parameter limits
_PG_DUP_KEY = re.compile(r"\(device_id\)=\((.*)\) already exists")
ITER_PAGE = 500


def _doc(device: Device) -> str:
    wire = device.to_wire()
    for name in _ACTIVITY_FIELDS:
        wire.pop(name, None)
    return json.dumps(wire, separators=(",", ":"))


def _values(device: Device) -> dict[str, Any]:
    """Columns written by insert and replace (activity columns are owned by `apply_activity`)."""
    return {
        "etag": device.etag,
        "status": device.status.value,
        "auth_type": device.authentication.type.value,
        "generation_id": device.generation_id,
        "doc": _doc(device),
        "updated_at": utcnow(),
    }


def _insert_values(device: Device) -> dict[str, Any]:
    values = _values(device)
    values.update(
        device_id=device.device_id,
        connection_state=device.connection_state.value,
        connection_state_updated_time=device.connection_state_updated_time,
        last_activity_time=device.last_activity_time,
        created_at=values["updated_at"],
    )
    return values


def _from_row(row: Sequence[Any]) -> Device:
    doc: dict[str, Any] = json.loads(row[0])
    device = Device.model_validate(doc)
    device.connection_state = ConnectionState(row[1])
    device.connection_state_updated_time = row[2]
    device.last_activity_time = row[3]
    return device


class SqlDeviceRepository:
    """`tether.storage.base.DeviceRepository` over SQL."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, device_id: str) -> Device | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(*_ROW_COLUMNS).where(DeviceRow.device_id == device_id))).first()
        return None if row is None else _from_row(row)

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, Device]:
        """The stored devices among `device_ids` (unknown ids are absent), in one read transaction:
        the registry coalesces concurrent authentication lookups into one of these."""
        found: dict[str, Device] = {}
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            return found
        async with self._db.read() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                stmt = select(DeviceRow.device_id, *_ROW_COLUMNS).where(DeviceRow.device_id.in_(chunk))
                for row in await conn.execute(stmt):
                    found[row[0]] = _from_row(row[1:])
        return found

    async def insert(self, device: Device) -> None:
        with _duplicates_as_conflict(device.device_id):
            async with self._db.write() as conn:
                await conn.execute(sql_insert(DeviceRow), [_insert_values(device)])

    async def insert_many(self, devices: Sequence[Device]) -> None:
        """One transaction: any duplicate (within the batch or already stored) writes nothing."""
        await self.apply_batch(devices, (), ())

    async def replace(self, device: Device, expected_etag: str | None) -> None:
        async with self._db.write() as conn:
            await _checked(conn, _replace_stmt(device, expected_etag), device.device_id, expected_etag)

    async def delete(self, device_id: str, expected_etag: str | None) -> None:
        async with self._db.write() as conn:
            await _checked(conn, _delete_stmt(device_id, expected_etag), device_id, expected_etag)

    async def apply_batch(
        self,
        inserts: Sequence[Device],
        replaces: Sequence[tuple[Device, str | None]],
        deletes: Sequence[tuple[str, str | None]],
    ) -> None:
        """Inserts, etag-guarded replaces and deletes in ONE write transaction: the first failure
        (Conflict for an existing or repeated id, NotFound, PreconditionFailed) rolls all of it back,
        so a lost race or a crash never leaves a batch half applied and nothing has to be undone by
        hand (a deleted device keeps its cascaded twin and C2D rows). An id may appear only once.

        Replaces and deletes run in id order, so two batches on PostgreSQL lock shared rows in the
        same order instead of deadlocking; their compare-and-set runs before the (larger) insert."""
        _check_distinct([*(d.device_id for d in inserts), *(d.device_id for d, _ in replaces),
                         *(i for i, _ in deletes)])
        if not (inserts or replaces or deletes):
            return
        guarded = sorted(
            [(d.device_id, _replace_stmt(d, etag), etag) for d, etag in replaces]
            + [(i, _delete_stmt(i, etag), etag) for i, etag in deletes],
            key=lambda w: w[0],
        )
        with _duplicates_as_conflict():
            async with self._db.write() as conn:
                for device_id, stmt, etag in guarded:
                    await _checked(conn, stmt, device_id, etag)
                await _insert_new(conn, inserts)

    async def list(self, *, top: int, after: str | None = None) -> list[Device]:
        """Up to `top` devices ordered by id (byte order), starting after the id `after`."""
        stmt = select(*_ROW_COLUMNS).order_by(DeviceRow.device_id).limit(top)
        if after is not None:
            stmt = stmt.where(DeviceRow.device_id > after)
        async with self._db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [_from_row(r) for r in rows]

    async def iter_all(self) -> AsyncIterator[Device]:
        """Every device in id order, one short read transaction per page (no long-held connection)."""
        after: str | None = None
        while True:
            page = await self.list(top=ITER_PAGE, after=after)
            for device in page:
                yield device
            if len(page) < ITER_PAGE:
                return
            after = page[-1].device_id

    async def statistics(self) -> RegistryStatistics:
        stmt = select(DeviceRow.status, func.count()).group_by(DeviceRow.status)
        async with self._db.read() as conn:
            counts: dict[str, int] = {str(s): int(n) for s, n in (await conn.execute(stmt)).all()}
        enabled = counts.get(DeviceStatus.enabled.value, 0)
        disabled = counts.get(DeviceStatus.disabled.value, 0)
        return RegistryStatistics(
            total_device_count=enabled + disabled,
            enabled_device_count=enabled,
            disabled_device_count=disabled,
        )

    async def reset_connection_states(self, at: datetime) -> int:
        """A single gateway starting up holds no connections: no device or module is Connected (after
        a crash the last flush may have left some so). Returns how many were reset."""
        return await _reset_connection_states(self._db, at)

    async def apply_activity(self, updates: Sequence[ActivityUpdate]) -> None:
        """Batch-write connection state and last activity of devices and modules (updates with a
        `module_id`) in one transaction; the etags and documents are untouched.

        `connectionStateUpdatedTime` moves only when the state really changes; unknown (deleted) ids
        are skipped silently.
        """
        modules = [u for u in updates if u.module_id is not None]
        devices = [u for u in updates if u.module_id is None] if modules else updates
        with_state = [
            {"b_id": u.device_id, "b_state": u.connection_state.value, "b_at": u.at}
            for u in devices
            if u.connection_state is not None
        ]
        activity_only = [{"b_id": u.device_id, "b_at": u.at} for u in devices if u.connection_state is None]
        b_id = bindparam("b_id", type_=String())
        b_state = bindparam("b_state", type_=String())
        b_at = bindparam("b_at", type_=UtcDateTime())
        async with self._db.write() as conn:
            if with_state:
                # Flushes from several gateways can arrive out of order: a state older than the
                # last recorded change must not overwrite it.
                state_stmt = (
                    update(DeviceRow)
                    .where(
                        DeviceRow.device_id == b_id,
                        or_(
                            DeviceRow.connection_state_updated_time.is_(None),
                            DeviceRow.connection_state_updated_time <= b_at,
                        ),
                    )
                    .values(
                        connection_state_updated_time=case(
                            (DeviceRow.connection_state != b_state, b_at),
                            else_=DeviceRow.connection_state_updated_time,
                        ),
                        connection_state=b_state,
                        last_activity_time=b_at,
                    )
                )
                await conn.execute(state_stmt, with_state)
            if activity_only:
                activity_stmt = (
                    update(DeviceRow).where(DeviceRow.device_id == b_id).values(last_activity_time=b_at)
                )
                await conn.execute(activity_stmt, activity_only)
            if modules:
                await apply_module_activity(conn, modules)


async def _reset_connection_states(db: Database, at: datetime) -> int:
    async with db.write() as conn:
        result = await conn.execute(
            update(DeviceRow)
            .where(DeviceRow.connection_state == ConnectionState.connected.value)
            .values(connection_state=ConnectionState.disconnected.value, connection_state_updated_time=at)
        )
        modules = await reset_module_connection_states(conn, at)
    return int(result.rowcount or 0) + modules


def _replace_stmt(device: Device, expected_etag: str | None) -> Update:
    """The document write of `replace`; with an etag it is a compare-and-set (`WHERE etag = …`)."""
    stmt = update(DeviceRow).where(DeviceRow.device_id == device.device_id).values(**_values(device))
    return stmt if expected_etag is None else stmt.where(DeviceRow.etag == expected_etag)


def _delete_stmt(device_id: str, expected_etag: str | None) -> Delete:
    stmt = sql_delete(DeviceRow).where(DeviceRow.device_id == device_id)
    return stmt if expected_etag is None else stmt.where(DeviceRow.etag == expected_etag)


async def _checked(
    conn: AsyncConnection, stmt: Update | Delete, device_id: str, expected_etag: str | None
) -> None:
    """Run a guarded single-row write; touching no row means the device is gone (404) or the etag is
    stale (412), told apart by a read in the same transaction."""
    if (await conn.execute(stmt)).rowcount != 0:
        return
    current = (await conn.execute(select(DeviceRow.etag).where(DeviceRow.device_id == device_id))).scalar()
    if current is None:
        raise NotFound(f"device {device_id} not found", code="DeviceNotFound", field="deviceId")
    raise PreconditionFailed(
        f"device {device_id}: etag {expected_etag!r} does not match the current version",
        code="PreconditionFailed",
    )


async def _insert_new(conn: AsyncConnection, devices: Sequence[Device]) -> None:
    """Insert devices that must not exist yet: Conflict naming the first stored id (checked first, so
    SQLite, whose write lock is taken at BEGIN, can name it too), else one multi-row INSERT."""
    if not devices:
        return
    ids = [d.device_id for d in devices]
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        stmt = select(DeviceRow.device_id).where(DeviceRow.device_id.in_(chunk)).limit(1)
        existing = (await conn.execute(stmt)).scalar()
        if existing is not None:
            raise _already_exists(existing)
    await conn.execute(sql_insert(DeviceRow), [_insert_values(d) for d in devices])


@contextmanager
def _duplicates_as_conflict(device_id: str | None = None) -> Iterator[None]:
    """Wrap a write transaction: a unique-key violation (a race with another writer on PostgreSQL)
    becomes Conflict, naming `device_id` or the id PostgreSQL reports. The transaction has already
    rolled back when the error gets here."""
    try:
        yield
    except IntegrityError as exc:
        match = _PG_DUP_KEY.search(str(exc.orig))
        raise _already_exists(device_id or (match.group(1) if match else None)) from exc


def _check_distinct(ids: Iterable[str]) -> None:
    seen: set[str] = set()
    for device_id in ids:
        if device_id in seen:
            raise Conflict(
                f"device {device_id} appears more than once", code="DeviceAlreadyExists", field="deviceId"
            )
        seen.add(device_id)


def _already_exists(device_id: str | None) -> Conflict:
    if device_id is None:
        return Conflict("a device in the batch already exists", code="DeviceAlreadyExists")
    return Conflict(f"device {device_id} already exists", code="DeviceAlreadyExists", field="deviceId")
