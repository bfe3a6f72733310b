"""Shared access policies in SQL (few rows, rarely written)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import delete as sql_delete
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from tether.registry.models import utcnow
from tether.storage.base import PolicyRecord
from tether.storage.sql.engine import Database
from tether.storage.sql.tables import PolicyRow

_COLUMNS = (PolicyRow.name, PolicyRow.primary_key, PolicyRow.secondary_key, PolicyRow.permissions)


def _record(row: Any) -> PolicyRecord:
    return PolicyRecord(
        name=row[0],
        primary_key=row[1],
        secondary_key=row[2],
        permissions=frozenset(json.loads(row[3])),
    )


class SqlPolicyRepository:
    """`tether.storage.base.PolicyRepository` over SQL."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def list(self) -> list[PolicyRecord]:
        async with self._db.read() as conn:
            rows = (await conn.execute(select(*_COLUMNS).order_by(PolicyRow.name))).all()
        return [_record(r) for r in rows]

    async def get(self, name: str) -> PolicyRecord | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(PolicyRow.name == name))).first()
        return None if row is None else _record(row)

    async def upsert(self, policy: PolicyRecord) -> None:
        values = {
            "name": policy.name,
            "primary_key": policy.primary_key,
            "secondary_key": policy.secondary_key,
            "permissions": json.dumps(sorted(policy.permissions)),
            "updated_at": utcnow(),
        }
        changes = {k: v for k, v in values.items() if k != "name"}
        if self._db.is_postgres:
            pg_stmt = postgresql.insert(PolicyRow).values(values)
            stmt: Any = pg_stmt.on_conflict_do_update(index_elements=[PolicyRow.name], set_=changes)
        else:
            lite_stmt = sqlite.insert(PolicyRow).values(values)
            stmt = lite_stmt.on_conflict_do_update(index_elements=[PolicyRow.name], set_=changes)
        async with self._db.write() as conn:
            await conn.execute(stmt)

    async def delete(self, name: str) -> bool:
        async with self._db.write() as conn:
            result = await conn.execute(sql_delete(PolicyRow).where(PolicyRow.name == name))
        return result.rowcount > 0
