"""Module identities in SQL: one row per module, keyed (device id, module id), with the same
optimistic concurrency as devices (`UPDATE … WHERE etag = :expected`) and the same split of the
document (`doc`) from the activity columns, which the device repository's batched `apply_activity`
writes for devices and modules alike.

`device_id` references `devices` with `ON DELETE CASCADE`, and `module_twins` references `modules`
the same way: deleting a device deletes its modules and their twins in the same transaction on both
backends. An insert takes the device row's lock first (`SELECT … FOR UPDATE` on PostgreSQL; SQLite
writers are serialised anyway), so the per-device module limit holds under concurrent creates and a
device deleted meanwhile is a clean 404.

The tables live on their own `MetaData` (created by migration 0007), like the twin and CA tables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert as sql_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from tether.errors import Conflict, NotFound, PreconditionFailed, QuotaExceeded
from tether.registry.models import ConnectionState, Module, utcnow
from tether.storage.base import ActivityUpdate, ModuleKey
from tether.storage.sql.engine import Database
from tether.storage.sql.tables import DeviceRow, UtcDateTime, ident

__all__ = [
    "SqlModuleRepository",
    "apply_module_activity",
    "module_metadata",
    "module_twins_table",
    "modules_table",
    "reset_module_connection_states",
]

_ACTIVITY_FIELDS = ("connectionState", "connectionStateUpdatedTime", "lastActivityTime")
_IN_CHUNK = 250  # (device, module) pairs per IN (...) lookup: two parameters each

module_metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

modules_table = Table(
    "modules",
    module_metadata,
    Column("device_id", ident(128), ForeignKey(DeviceRow.__table__.c.device_id, ondelete="CASCADE"),
           primary_key=True),
    Column("module_id", ident(128), primary_key=True),
    Column("etag", String(64), nullable=False),
    Column("auth_type", String(32), nullable=False),
    Column("generation_id", String(64), nullable=False),
    Column("doc", Text, nullable=False),  # Azure's module JSON without the activity fields
    Column("connection_state", String(16), nullable=False),
    Column("connection_state_updated_time", UtcDateTime(), nullable=False),
    Column("last_activity_time", UtcDateTime(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

module_twins_table = Table(
    "module_twins",
    module_metadata,
    Column("device_id", ident(128), primary_key=True),
    Column("module_id", ident(128), primary_key=True),
    Column("etag", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("tags", JSON, nullable=False),
    Column("desired", JSON, nullable=False),
    Column("reported", JSON, nullable=False),
    Column("desired_version", BigInteger, nullable=False),
    Column("reported_version", BigInteger, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("configurations", JSON, nullable=False, server_default="{}"),  # 0008_fleet, as on `twins`
    ForeignKeyConstraint(["device_id", "module_id"], [modules_table.c.device_id, modules_table.c.module_id],
                         ondelete="CASCADE"),
)

_M = modules_table.c
_ROW = (_M.doc, _M.connection_state, _M.connection_state_updated_time, _M.last_activity_time)


def _doc(module: Module) -> str:
    wire = module.to_wire()
    for name in _ACTIVITY_FIELDS:
        wire.pop(name, None)
    return json.dumps(wire, separators=(",", ":"))


def _values(module: Module) -> dict[str, Any]:
    return {
        "etag": module.etag,
        "auth_type": module.authentication.type.value,
        "generation_id": module.generation_id,
        "doc": _doc(module),
        "updated_at": utcnow(),
    }


def _from_row(row: Sequence[Any]) -> Module:
    module = Module.model_validate(json.loads(row[0]))
    module.connection_state = ConnectionState(row[1])
    module.connection_state_updated_time = row[2]
    module.last_activity_time = row[3]
    return module


def _not_found(device_id: str, module_id: str) -> NotFound:
    return NotFound(f"module {module_id} of device {device_id} not found", code="ModuleNotFound",
                    field="moduleId")


def _where(device_id: str, module_id: str) -> Any:
    return and_(_M.device_id == device_id, _M.module_id == module_id)


class SqlModuleRepository:
    """`tether.storage.base.ModuleRepository` over the shared `Database` of a `SqlStorage`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, device_id: str, module_id: str) -> Module | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(*_ROW).where(_where(device_id, module_id)))).first()
        return None if row is None else _from_row(row)

    async def get_many(self, keys: Sequence[ModuleKey]) -> dict[ModuleKey, Module]:
        found: dict[ModuleKey, Module] = {}
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return found
        async with self._db.read() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                stmt = select(*_ROW).where(tuple_(_M.device_id, _M.module_id).in_(chunk))
                for row in await conn.execute(stmt):
                    module = _from_row(row)
                    found[module.key] = module
        return found

    async def for_device(self, device_id: str) -> list[Module]:
        stmt = select(*_ROW).where(_M.device_id == device_id).order_by(_M.module_id)
        async with self._db.read() as conn:
            return [_from_row(r) for r in (await conn.execute(stmt)).all()]

    async def scan(self, *, after: ModuleKey | None, limit: int) -> list[Module]:
        """Up to `limit` modules of every device in (device id, module id) byte order, after `after`."""
        stmt = select(*_ROW).order_by(_M.device_id, _M.module_id).limit(limit)
        if after is not None:
            stmt = stmt.where(or_(_M.device_id > after[0],
                                  and_(_M.device_id == after[0], _M.module_id > after[1])))
        async with self._db.read() as conn:
            return [_from_row(r) for r in (await conn.execute(stmt)).all()]

    async def insert(self, module: Module, *, max_per_device: int) -> None:
        values = _values(module)
        values.update(device_id=module.device_id, module_id=module.module_id,
                      connection_state=module.connection_state.value,
                      connection_state_updated_time=module.connection_state_updated_time,
                      last_activity_time=module.last_activity_time, created_at=values["updated_at"])
        device = DeviceRow.__table__.c
        try:
            async with self._db.write() as conn:
                lock = select(device.device_id).where(device.device_id == module.device_id).with_for_update()
                if (await conn.execute(lock)).first() is None:
                    raise NotFound(f"device {module.device_id} not found", code="DeviceNotFound",
                                   field="deviceId")
                if (await conn.execute(select(_M.module_id).where(_where(*module.key)))).first() is not None:
                    raise _exists(module)
                count = (await conn.execute(
                    select(func.count()).select_from(modules_table).where(_M.device_id == module.device_id)
                )).scalar_one()
                if count >= max_per_device:
                    raise QuotaExceeded(
                        f"device {module.device_id} already has {count} modules (at most {max_per_device})",
                        code="IotHubQuotaExceeded", field="moduleId")
                await conn.execute(sql_insert(modules_table), [values])
        except IntegrityError as exc:  # lost a race with another writer (or the device went away)
            raise _exists(module) from exc

    async def replace(self, module: Module, expected_etag: str | None) -> None:
        stmt = update(modules_table).where(_where(*module.key)).values(**_values(module))
        if expected_etag is not None:
            stmt = stmt.where(_M.etag == expected_etag)
        async with self._db.write() as conn:
            await _checked(conn, (await conn.execute(stmt)).rowcount, module.device_id, module.module_id,
                           expected_etag)

    async def delete(self, device_id: str, module_id: str, expected_etag: str | None) -> None:
        stmt = sql_delete(modules_table).where(_where(device_id, module_id))
        if expected_etag is not None:
            stmt = stmt.where(_M.etag == expected_etag)
        async with self._db.write() as conn:
            await _checked(conn, (await conn.execute(stmt)).rowcount, device_id, module_id, expected_etag)


async def _checked(conn: AsyncConnection, rowcount: int | None, device_id: str, module_id: str,
                   expected_etag: str | None) -> None:
    """A guarded single-row write touched no row: the module is gone (404) or the etag is stale (412)."""
    if rowcount:
        return
    current = (await conn.execute(select(_M.etag).where(_where(device_id, module_id)))).scalar()
    if current is None:
        raise _not_found(device_id, module_id)
    raise PreconditionFailed(
        f"module {device_id}/{module_id}: etag {expected_etag!r} does not match the current version",
        code="PreconditionFailed",
    )


def _exists(module: Module) -> Conflict:
    return Conflict(f"module {module.module_id} of device {module.device_id} already exists",
                    code="ModuleAlreadyExistsOnDevice", field="moduleId")


async def apply_module_activity(conn: AsyncConnection, updates: Sequence[ActivityUpdate]) -> None:
    """The modules' part of a batched activity write (same rules as the devices': the connection
    state only moves forward in time, `connectionStateUpdatedTime` only on a real change)."""
    with_state = [{"b_d": u.device_id, "b_m": u.module_id, "b_state": u.connection_state.value, "b_at": u.at}
                  for u in updates if u.connection_state is not None]
    activity_only = [{"b_d": u.device_id, "b_m": u.module_id, "b_at": u.at}
                     for u in updates if u.connection_state is None]
    b_d, b_m = bindparam("b_d", type_=String()), bindparam("b_m", type_=String())
    b_state, b_at = bindparam("b_state", type_=String()), bindparam("b_at", type_=UtcDateTime())
    same = and_(_M.device_id == b_d, _M.module_id == b_m)
    if with_state:
        stmt = (
            update(modules_table)
            .where(same, _M.connection_state_updated_time <= b_at)
            .values(
                connection_state_updated_time=case((_M.connection_state != b_state, b_at),
                                                   else_=_M.connection_state_updated_time),
                connection_state=b_state,
                last_activity_time=b_at,
            )
        )
        await conn.execute(stmt, with_state)
    if activity_only:
        await conn.execute(update(modules_table).where(same).values(last_activity_time=b_at), activity_only)


async def reset_module_connection_states(conn: AsyncConnection, at: datetime) -> int:
    result = await conn.execute(
        update(modules_table)
        .where(_M.connection_state == ConnectionState.connected.value)
        .values(connection_state=ConnectionState.disconnected.value, connection_state_updated_time=at)
    )
    return int(result.rowcount or 0)
