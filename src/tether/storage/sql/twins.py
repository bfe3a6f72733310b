"""Device and module twins in SQL: one row per identity whose twin has ever been written (device
twins in `twins`, module twins in `module_twins`, migration 0007, which references `modules`).

A device whose twin was never written has no row; `TwinService` shows it as an empty twin with
version 1. Concurrency is optimistic: `update` is `UPDATE … WHERE device_id = :id AND version = :v`
(one statement, so on SQLite no read lock is ever upgraded and on PostgreSQL a concurrent writer
blocks, re-checks the version and matches nothing), and `insert` fails on a concurrent insert. The
service re-reads and retries in both cases.

`device_id` references `devices` with `ON DELETE CASCADE`, so deleting a device deletes its twin in
the same transaction on both backends (the engine turns SQLite's foreign keys on), and a twin can
never be inserted for a device that does not exist.

The table lives on its own `MetaData` (created by migration 0003_twins), like the CA table, so this
module does not touch the shared `tables.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    MetaData,
    Row,
    String,
    Table,
    and_,
    select,
    tuple_,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert as sql_insert
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError

from tether.registry.models import utcnow
from tether.storage.base import ModuleKey
from tether.storage.sql.engine import Database
from tether.storage.sql.modules import module_twins_table
from tether.storage.sql.tables import DeviceRow, UtcDateTime, ident

__all__ = ["SqlTwinRepository", "TwinRecord", "TwinRepository", "twin_metadata", "twins_table"]

_IN_CHUNK = 500  # ids per IN (...) lookup; well under SQLite's and asyncpg's parameter limits
_PAIR_CHUNK = 250  # (device, module) pairs per lookup: two parameters each

twin_metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

twins_table = Table(
    "twins",
    twin_metadata,
    Column(
        "device_id",
        ident(128),
        ForeignKey(DeviceRow.__table__.c.device_id, ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("etag", String(64), nullable=False),
    Column("version", BigInteger, nullable=False),  # +1 per write of any section
    Column("tags", JSON, nullable=False),
    Column("desired", JSON, nullable=False),
    Column("reported", JSON, nullable=False),
    Column("desired_version", BigInteger, nullable=False),
    Column("reported_version", BigInteger, nullable=False),
    Column("metadata", JSON, nullable=False),  # {"desired": {$metadata tree}, "reported": {…}}
    Column("updated_at", UtcDateTime(), nullable=False),
    # {configurationId: {"status": "Applied" | "Targeted", …}} (0008_fleet; messaging.configurations)
    Column("configurations", JSON, nullable=False, server_default="{}"),
)

_SECTIONS = ("etag", "version", "tags", "desired", "reported", "desired_version", "reported_version",
             "metadata", "configurations")
_COLUMNS = (twins_table.c.device_id, *(twins_table.c[name] for name in _SECTIONS))
_MT = module_twins_table.c
_MODULE_COLUMNS = (_MT.device_id, *(_MT[name] for name in _SECTIONS), _MT.module_id)
_MODULE_ID = len(_MODULE_COLUMNS) - 1  # where a module twin row holds its module id


@dataclass(frozen=True, slots=True)
class TwinRecord:
    """The stored twin of one device (or, with `module_id`, of one module): the three sections, their
    versions and Azure's `$metadata` trees (`metadata["desired"]`, `metadata["reported"]`), without
    `$version`/`$metadata` keys in the sections themselves."""

    device_id: str
    etag: str
    version: int
    tags: dict[str, Any]
    desired: dict[str, Any]
    reported: dict[str, Any]
    desired_version: int
    reported_version: int
    metadata: dict[str, Any]
    configurations: dict[str, Any] = field(default_factory=dict)
    module_id: str | None = None


class TwinRepository(Protocol):
    """Twins of devices and (`module_id` given) of modules."""

    async def get(self, device_id: str, module_id: str | None = None) -> TwinRecord | None: ...
    async def get_many(self, device_ids: Sequence[str]) -> dict[str, TwinRecord]: ...  # device twins
    async def get_module_twins(self, keys: Sequence[ModuleKey]) -> dict[ModuleKey, TwinRecord]: ...
    async def insert(self, record: TwinRecord) -> bool: ...  # False: exists already, or no such identity
    async def update(self, record: TwinRecord, expected_version: int) -> bool: ...  # False: version moved
    async def delete(self, device_id: str, module_id: str | None = None) -> bool: ...


def _from_row(row: Row[Any]) -> TwinRecord:
    return TwinRecord(
        device_id=row[0],
        etag=row[1],
        version=int(row[2]),
        tags=dict(row[3]),
        desired=dict(row[4]),
        reported=dict(row[5]),
        desired_version=int(row[6]),
        reported_version=int(row[7]),
        metadata=dict(row[8]),
        configurations=dict(row[9] or {}),
        module_id=row[_MODULE_ID] if len(row) > _MODULE_ID else None,
    )


def _table(module_id: str | None) -> Table:
    return twins_table if module_id is None else module_twins_table


def _key(device_id: str, module_id: str | None) -> Any:
    if module_id is None:
        return twins_table.c.device_id == device_id
    return and_(_MT.device_id == device_id, _MT.module_id == module_id)


def _values(record: TwinRecord) -> dict[str, Any]:
    return {
        "etag": record.etag,
        "version": record.version,
        "tags": record.tags,
        "desired": record.desired,
        "reported": record.reported,
        "desired_version": record.desired_version,
        "reported_version": record.reported_version,
        "metadata": record.metadata,
        "configurations": record.configurations,
        "updated_at": utcnow(),
    }


class SqlTwinRepository:
    """`TwinRepository` over the shared `Database` of a `SqlStorage` (`SqlTwinRepository(storage.db)`)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, device_id: str, module_id: str | None = None) -> TwinRecord | None:
        columns = _COLUMNS if module_id is None else _MODULE_COLUMNS
        stmt = select(*columns).where(_key(device_id, module_id))
        async with self._db.read() as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else _from_row(row)

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, TwinRecord]:
        """The stored twins among `device_ids` (ids without a row are simply absent)."""
        found: dict[str, TwinRecord] = {}
        if not device_ids:
            return found
        async with self._db.read() as conn:
            for start in range(0, len(device_ids), _IN_CHUNK):
                chunk = list(device_ids[start : start + _IN_CHUNK])
                stmt = select(*_COLUMNS).where(twins_table.c.device_id.in_(chunk))
                for row in (await conn.execute(stmt)).all():
                    record = _from_row(row)
                    found[record.device_id] = record
        return found

    async def get_module_twins(self, keys: Sequence[ModuleKey]) -> dict[ModuleKey, TwinRecord]:
        """The stored twins among these modules (modules without a row are absent)."""
        found: dict[ModuleKey, TwinRecord] = {}
        wanted = list(dict.fromkeys(keys))
        async with self._db.read() as conn:
            for start in range(0, len(wanted), _PAIR_CHUNK):
                chunk = wanted[start : start + _PAIR_CHUNK]
                stmt = select(*_MODULE_COLUMNS).where(tuple_(_MT.device_id, _MT.module_id).in_(chunk))
                for row in (await conn.execute(stmt)).all():
                    record = _from_row(row)
                    found[(record.device_id, row[_MODULE_ID])] = record
        return found

    async def insert(self, record: TwinRecord) -> bool:
        """First write of a twin. False when another writer inserted first or the device (module) is
        gone (primary key or foreign key violation); the caller re-reads and decides."""
        values = _values(record)
        values["device_id"] = record.device_id
        if record.module_id is not None:
            values["module_id"] = record.module_id
        try:
            async with self._db.write() as conn:
                await conn.execute(sql_insert(_table(record.module_id)), [values])
        except IntegrityError:
            return False
        return True

    async def update(self, record: TwinRecord, expected_version: int) -> bool:
        """Compare-and-set on the twin version: True only if the row still had `expected_version`."""
        table = _table(record.module_id)
        stmt = (
            sql_update(table)
            .where(_key(record.device_id, record.module_id))
            .where(table.c.version == expected_version)
            .values(**_values(record))
        )
        async with self._db.write() as conn:
            result = await conn.execute(stmt)
            return bool(result.rowcount == 1)

    async def delete(self, device_id: str, module_id: str | None = None) -> bool:
        stmt = sql_delete(_table(module_id)).where(_key(device_id, module_id))
        async with self._db.write() as conn:
            result = await conn.execute(stmt)
            return bool(result.rowcount > 0)
