"""Automatic device configurations in SQL: one row per configuration, the Azure document in `doc`,
optimistic concurrency on `etag` (compare-and-set in the UPDATE / DELETE itself)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert as sql_insert
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError

from tether.errors import Conflict, NotFound, PreconditionFailed
from tether.storage.sql.engine import Database
from tether.storage.sql.fleet_tables import configurations_table as t

__all__ = ["ConfigurationRecord", "SqlConfigurationRepository"]


@dataclass(frozen=True, slots=True)
class ConfigurationRecord:
    id: str
    etag: str
    priority: int
    created_ms: int
    updated_ms: int
    doc: dict[str, Any]


def _record(row: Row[Any]) -> ConfigurationRecord:
    m = row._mapping
    return ConfigurationRecord(
        m["id"], m["etag"], int(m["priority"]), int(m["created_ms"]), int(m["updated_ms"]), dict(m["doc"])
    )


def _missing(config_id: str) -> NotFound:
    return NotFound(f"configuration {config_id} not found", code="ConfigurationNotFound", field="id")


class SqlConfigurationRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, config_id: str) -> ConfigurationRecord | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(t).where(t.c.id == config_id))).first()
        return None if row is None else _record(row)

    async def list(self, limit: int = 1000) -> list[ConfigurationRecord]:
        async with self._db.read() as conn:
            rows = (await conn.execute(select(t).order_by(t.c.id).limit(limit))).all()
        return [_record(r) for r in rows]

    async def insert(self, record: ConfigurationRecord) -> None:
        try:
            async with self._db.write() as conn:
                await conn.execute(
                    sql_insert(t),
                    [
                        {
                            "id": record.id,
                            "etag": record.etag,
                            "priority": record.priority,
                            "created_ms": record.created_ms,
                            "updated_ms": record.updated_ms,
                            "doc": record.doc,
                        }
                    ],
                )
        except IntegrityError:
            raise Conflict(
                f"configuration {record.id} already exists", code="ConfigurationAlreadyExists", field="id"
            ) from None

    async def replace(self, record: ConfigurationRecord, expected_etag: str | None) -> None:
        stmt = sql_update(t).where(t.c.id == record.id)
        if expected_etag is not None:
            stmt = stmt.where(t.c.etag == expected_etag)
        async with self._db.write() as conn:
            result = await conn.execute(
                stmt.values(
                    etag=record.etag, priority=record.priority, updated_ms=record.updated_ms, doc=record.doc
                )
            )
        if not result.rowcount:
            if await self.get(record.id) is None:
                raise _missing(record.id)
            raise PreconditionFailed(f"configuration {record.id}: If-Match etag does not match")

    async def set_results(self, config_id: str, system: dict[str, int], custom: dict[str, int]) -> None:
        """Store freshly counted metrics (no etag change: they are the hub's, not the caller's)."""
        current = await self.get(config_id)
        if current is None:
            return
        doc = dict(current.doc)
        doc["systemMetrics"] = {**doc.get("systemMetrics", {}), "results": system}
        doc["metrics"] = {**doc.get("metrics", {}), "results": custom}
        async with self._db.write() as conn:
            await conn.execute(
                sql_update(t).where(t.c.id == config_id, t.c.etag == current.etag).values(doc=doc)
            )

    async def delete(self, config_id: str, expected_etag: str | None) -> None:
        stmt = sql_delete(t).where(t.c.id == config_id)
        if expected_etag is not None:
            stmt = stmt.where(t.c.etag == expected_etag)
        async with self._db.write() as conn:
            result = await conn.execute(stmt)
        if not result.rowcount:
            if await self.get(config_id) is None:
                raise _missing(config_id)
            raise PreconditionFailed(f"configuration {config_id}: If-Match etag does not match")
