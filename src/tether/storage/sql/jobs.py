"""Jobs in SQL: one `jobs` row per job (request and state in `doc`), one `job_devices` row per device of
a scheduled job, and the leases that decide which hub node runs them.

A job's devices are written in the same transaction that moves it to `running` (`start`), so a job is
either not started or has its whole device list. Each device's outcome is written by itself with
`status = 'running'` as the guard (`finish_device`): an outcome is recorded once, and a device a
cancelled job had not reached stays `canceled`. After a restart `resume` puts the devices that were
`running` back to `pending` (their outcome was never recorded); finished ones are never repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, and_, bindparam, func, or_, select, tuple_
from sqlalchemy import delete as sql_delete
from sqlalchemy import insert as sql_insert
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError

from tether.errors import Conflict
from tether.storage.sql.engine import Database
from tether.storage.sql.fleet_tables import job_devices, jobs_table, leases_table

__all__ = ["DEVICE_STATUSES", "DeviceJobRecord", "JobRecord", "SqlJobRepository", "SqlLeaseRepository"]

DEVICE_STATUSES = ("pending", "scheduled", "running", "completed", "failed", "canceled")
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class JobRecord:
    job_id: str
    kind: str
    type: str
    status: str
    created_ms: int
    start_ms: int
    end_ms: int | None
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeviceJobRecord:
    job_id: str
    device_id: str
    status: str
    created_ms: int
    start_ms: int | None
    end_ms: int | None
    updated_ms: int
    outcome: dict[str, Any] | None
    error: dict[str, Any] | None


def _job(row: Row[Any]) -> JobRecord:
    m = row._mapping
    return JobRecord(
        m["job_id"],
        m["kind"],
        m["type"],
        m["status"],
        int(m["created_ms"]),
        int(m["start_ms"]),
        None if m["end_ms"] is None else int(m["end_ms"]),
        dict(m["doc"]),
    )


def _device(row: Row[Any]) -> DeviceJobRecord:
    m = row._mapping
    return DeviceJobRecord(
        m["job_id"],
        m["device_id"],
        m["status"],
        int(m["created_ms"]),
        None if m["start_ms"] is None else int(m["start_ms"]),
        None if m["end_ms"] is None else int(m["end_ms"]),
        int(m["updated_ms"]),
        m["outcome"],
        m["error"],
    )


class SqlJobRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, job: JobRecord) -> None:
        try:
            async with self._db.write() as conn:
                await conn.execute(
                    sql_insert(jobs_table),
                    [
                        {
                            "job_id": job.job_id,
                            "kind": job.kind,
                            "type": job.type,
                            "status": job.status,
                            "created_ms": job.created_ms,
                            "start_ms": job.start_ms,
                            "end_ms": job.end_ms,
                            "updated_ms": job.created_ms,
                            "doc": job.doc,
                        }
                    ],
                )
        except IntegrityError:
            raise Conflict(
                f"job {job.job_id} already exists", code="JobAlreadyExists", field="jobId"
            ) from None

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(jobs_table).where(jobs_table.c.job_id == job_id))).first()
        return None if row is None else _job(row)

    async def list_jobs(
        self, *, kind: str, type_: str | None = None, status: str | None = None, limit: int = 1000
    ) -> list[JobRecord]:
        stmt = select(jobs_table).where(jobs_table.c.kind == kind)
        if type_:
            stmt = stmt.where(jobs_table.c.type == type_)
        if status:
            stmt = stmt.where(jobs_table.c.status == status)
        async with self._db.read() as conn:
            rows = (await conn.execute(stmt.order_by(jobs_table.c.created_ms.desc()).limit(limit))).all()
        return [_job(r) for r in rows]

    async def due(self, now_ms: int, statuses: Sequence[str]) -> list[JobRecord]:
        """Jobs in `statuses` whose start time has come, oldest first."""
        stmt = (
            select(jobs_table)
            .where(jobs_table.c.status.in_(list(statuses)), jobs_table.c.start_ms <= now_ms)
            .order_by(jobs_table.c.created_ms)
        )
        async with self._db.read() as conn:
            return [_job(r) for r in (await conn.execute(stmt)).all()]

    async def update(
        self,
        job_id: str,
        *,
        status: str,
        doc: dict[str, Any],
        now_ms: int,
        end_ms: int | None = None,
        only_if: Sequence[str] | None = None,
    ) -> bool:
        """Set the job's status and document; with `only_if`, only from one of those statuses."""
        stmt = sql_update(jobs_table).where(jobs_table.c.job_id == job_id)
        if only_if is not None:
            stmt = stmt.where(jobs_table.c.status.in_(list(only_if)))
        values: dict[str, Any] = {"status": status, "doc": doc, "updated_ms": now_ms}
        if end_ms is not None:
            values["end_ms"] = end_ms
        async with self._db.write() as conn:
            return bool((await conn.execute(stmt.values(**values))).rowcount)

    async def start(
        self, job_id: str, device_ids: Sequence[str], *, doc: dict[str, Any], now_ms: int
    ) -> bool:
        """queued/scheduled → running, with the job's devices (all pending), in one transaction."""
        async with self._db.write() as conn:
            moved = await conn.execute(
                sql_update(jobs_table)
                .where(jobs_table.c.job_id == job_id, jobs_table.c.status.in_(("queued", "scheduled")))
                .values(status="running", doc=doc, updated_ms=now_ms)
            )
            if not moved.rowcount:
                return False
            for start in range(0, len(device_ids), _CHUNK):
                await conn.execute(
                    sql_insert(job_devices),
                    [
                        {
                            "job_id": job_id,
                            "device_id": d,
                            "status": "pending",
                            "created_ms": now_ms,
                            "start_ms": None,
                            "end_ms": None,
                            "updated_ms": now_ms,
                            "outcome": None,
                            "error": None,
                        }
                        for d in device_ids[start : start + _CHUNK]
                    ],
                )
        return True

    async def resume(self, job_id: str, now_ms: int) -> None:
        """Devices left `running` by a stopped node: their outcome was never recorded, run them again."""
        async with self._db.write() as conn:
            await conn.execute(
                sql_update(job_devices)
                .where(job_devices.c.job_id == job_id, job_devices.c.status == "running")
                .values(status="pending", updated_ms=now_ms)
            )

    async def claim(self, job_id: str, limit: int, now_ms: int) -> list[str]:
        """Up to `limit` pending devices of the job, moved to running."""
        async with self._db.write() as conn:
            ids = list(
                (
                    await conn.execute(
                        select(job_devices.c.device_id)
                        .where(job_devices.c.job_id == job_id, job_devices.c.status == "pending")
                        .order_by(job_devices.c.device_id)
                        .limit(limit)
                    )
                ).scalars()
            )
            if ids:
                await conn.execute(
                    sql_update(job_devices)
                    .where(
                        job_devices.c.job_id == job_id,
                        job_devices.c.device_id.in_(ids),
                        job_devices.c.status == "pending",
                    )
                    .values(status="running", start_ms=now_ms, updated_ms=now_ms)
                )
        return ids

    async def finish_device(
        self,
        job_id: str,
        device_id: str,
        *,
        status: str,
        now_ms: int,
        outcome: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        async with self._db.write() as conn:
            result = await conn.execute(
                sql_update(job_devices)
                .where(
                    job_devices.c.job_id == job_id,
                    job_devices.c.device_id == device_id,
                    job_devices.c.status == "running",
                )
                .values(status=status, end_ms=now_ms, updated_ms=now_ms, outcome=outcome, error=error)
            )
            return bool(result.rowcount)

    async def finish_pending(
        self, job_id: str, *, status: str, now_ms: int, error: dict[str, Any] | None = None
    ) -> int:
        """Every device not yet finished (pending or running) gets `status` (cancel, timeout)."""
        async with self._db.write() as conn:
            result = await conn.execute(
                sql_update(job_devices)
                .where(job_devices.c.job_id == job_id, job_devices.c.status.in_(("pending", "running")))
                .values(status=status, end_ms=now_ms, updated_ms=now_ms, error=error)
            )
            return int(result.rowcount or 0)

    async def statistics(self, job_id: str) -> dict[str, int]:
        async with self._db.read() as conn:
            rows = (
                await conn.execute(
                    select(job_devices.c.status, func.count())
                    .where(job_devices.c.job_id == job_id)
                    .group_by(job_devices.c.status)
                )
            ).all()
        return {str(status): int(count) for status, count in rows}

    async def device_rows(self, *, after: tuple[str, str] | None, limit: int) -> list[DeviceJobRecord]:
        """`devices.jobs` rows in (jobId, deviceId) order after `after`."""
        stmt = select(job_devices)
        if after is not None:
            stmt = stmt.where(
                tuple_(job_devices.c.job_id, job_devices.c.device_id)
                > tuple_(bindparam("a0", after[0]), bindparam("a1", after[1]))
            )
        stmt = stmt.order_by(job_devices.c.job_id, job_devices.c.device_id).limit(limit)
        async with self._db.read() as conn:
            return [_device(r) for r in (await conn.execute(stmt)).all()]

    async def types_of(self, job_ids: Sequence[str]) -> dict[str, str]:
        if not job_ids:
            return {}
        async with self._db.read() as conn:
            rows = (
                await conn.execute(
                    select(jobs_table.c.job_id, jobs_table.c.type).where(
                        jobs_table.c.job_id.in_(list(job_ids))
                    )
                )
            ).all()
        return {str(a): str(b) for a, b in rows}

    async def purge(self, before_ms: int) -> int:
        """Delete finished jobs (and their devices) that ended before `before_ms`."""
        async with self._db.write() as conn:
            result = await conn.execute(
                sql_delete(jobs_table).where(
                    jobs_table.c.end_ms.is_not(None),
                    jobs_table.c.end_ms < before_ms,
                    jobs_table.c.status.in_(("completed", "failed", "cancelled")),
                )
            )
            return int(result.rowcount or 0)


class SqlLeaseRepository:
    """Named leases: `acquire` takes or renews the lease when it is free, expired or already ours."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def acquire(self, name: str, holder: str, *, now_ms: int, ttl_ms: int) -> bool:
        expires = now_ms + ttl_ms
        async with self._db.write() as conn:
            taken = await conn.execute(
                sql_update(leases_table)
                .where(
                    leases_table.c.name == name,
                    or_(leases_table.c.holder == holder, leases_table.c.expires_ms <= now_ms),
                )
                .values(holder=holder, expires_ms=expires)
            )
            if taken.rowcount:
                return True
            exists = (
                await conn.execute(select(leases_table.c.holder).where(leases_table.c.name == name))
            ).first()
            if exists is not None:
                return False
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        sql_insert(leases_table), [{"name": name, "holder": holder, "expires_ms": expires}]
                    )
            except IntegrityError:
                return False
        return True

    async def release(self, name: str, holder: str) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                sql_delete(leases_table).where(
                    and_(leases_table.c.name == name, leases_table.c.holder == holder)
                )
            )

    async def holder(self, name: str, now_ms: int) -> str | None:
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    select(leases_table.c.holder).where(
                        leases_table.c.name == name, leases_table.c.expires_ms > now_ms
                    )
                )
            ).first()
        return None if row is None else str(row[0])
