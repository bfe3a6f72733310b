"""The audit trail in SQL: batched appends, newest-first queries filtered by time/outcome/action, and
the reads and deletes of retention (oldest first, in id ranges)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, delete, or_, select
from sqlalchemy import insert as sql_insert

from tether.storage.base import AuditRecord
from tether.storage.sql.engine import Database
from tether.storage.sql.tables import AuditRow

MAX_QUERY_LIMIT = 10_000
_COLUMNS = (
    AuditRow.id,
    AuditRow.time,
    AuditRow.action,
    AuditRow.outcome,
    AuditRow.principal,
    AuditRow.credential,
    AuditRow.reason,
    AuditRow.peer,
    AuditRow.target,
    AuditRow.details,
)


def _escape_like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class SqlAuditRepository:
    """`tether.storage.base.AuditRepository` over SQL."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def append(self, records: Sequence[AuditRecord]) -> None:
        if not records:
            return
        rows = [
            {
                "time": r.time,
                "action": r.action,
                "outcome": r.outcome,
                "principal": r.principal,
                "credential": r.credential,
                "reason": r.reason,
                "peer": r.peer,
                "target": r.target,
                "details": dict(r.details),
            }
            for r in records
        ]
        async with self._db.write() as conn:
            await conn.execute(sql_insert(AuditRow), rows)

    async def query(
        self,
        *,
        limit: int = 100,
        since: datetime | None = None,
        outcome: str | None = None,
        action_prefix: str | None = None,
        principal: str | None = None,
    ) -> list[AuditRecord]:
        """Newest first: at most `limit` records with `time >= since` matching every given filter."""
        limit = max(1, min(limit, MAX_QUERY_LIMIT))
        stmt = select(*_COLUMNS).order_by(AuditRow.time.desc(), AuditRow.id.desc()).limit(limit)
        if since is not None:
            stmt = stmt.where(AuditRow.time >= since)
        if outcome is not None:
            stmt = stmt.where(AuditRow.outcome == outcome)
        if action_prefix:
            stmt = stmt.where(AuditRow.action.like(_escape_like(action_prefix) + "%", escape="\\"))
        if principal is not None:
            stmt = stmt.where(AuditRow.principal == principal)
        async with self._db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return _records(rows)

    async def first_beyond(self, keep: int) -> int | None:
        """The id of the newest record beyond the `keep` newest ones (None when there are at most
        `keep`): retention by size deletes it and everything older."""
        stmt = select(AuditRow.id).order_by(AuditRow.id.desc()).offset(keep).limit(1)
        async with self._db.read() as conn:
            found = (await conn.execute(stmt)).scalar_one_or_none()
        return int(found) if found is not None else None

    async def expired(self, *, before: datetime | None, through_id: int | None, limit: int
                      ) -> list[AuditRecord]:
        """Oldest first: up to `limit` records older than `before` or with an id up to `through_id`."""
        condition = _expired(before, through_id)
        if condition is None:
            return []
        stmt = select(*_COLUMNS).where(condition).order_by(AuditRow.id).limit(limit)
        async with self._db.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return _records(rows)

    async def delete(self, ids: Sequence[int]) -> int:
        """Delete these records (retention, once they are exported); at most 500 ids per call."""
        if not ids:
            return 0
        async with self._db.write() as conn:
            result = await conn.execute(delete(AuditRow).where(AuditRow.id.in_(list(ids))))
        return int(result.rowcount or 0)


def _expired(before: datetime | None, through_id: int | None) -> ColumnElement[bool] | None:
    parts: list[ColumnElement[bool]] = []
    if before is not None:
        parts.append(AuditRow.time < before)
    if through_id is not None:
        parts.append(AuditRow.id <= through_id)
    return or_(*parts) if parts else None


def _records(rows: Sequence[Any]) -> list[AuditRecord]:
    return [
        AuditRecord(
            time=r.time,
            action=r.action,
            outcome=r.outcome,
            principal=r.principal,
            credential=r.credential,
            reason=r.reason,
            peer=r.peer,
            target=r.target,
            details=dict(r.details or {}),
            id=r.id,
        )
        for r in rows
    ]
