"""The jobs API behind the REST routes: create, read, list and cancel scheduled device jobs (jobs v2)
and import/export jobs, and the `devices.jobs` query source. Running them is `runner.JobRunner`'s,
on whichever hub node holds the jobs lease; this service only writes requests and reads state, so
any node answers any call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tether.errors import BadRequest, NotFound
from tether.messaging.jobs.model import (
    JOB_STATUSES,
    device_job_row,
    parse_device_job,
    parse_registry_job,
    render_job_response,
    render_registry_job,
    validate_job_id,
)
from tether.messaging.query.service import After, Source
from tether.security.audit import AuditLog
from tether.storage.sql.jobs import JobRecord, SqlJobRepository

__all__ = ["JobService"]

_ACTIVE = ("queued", "scheduled", "running", "enqueued")


class JobService:
    def __init__(
        self, repo: SqlJobRepository, audit: AuditLog, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._repo = repo
        self._audit = audit
        self._clock = clock
        self._wake: Callable[[], None] = lambda: None

    def on_created(self, wake: Callable[[], None]) -> None:
        """`wake()` after a job is created or cancelled (the runner, when it leads here)."""
        self._wake = wake

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def _get(self, job_id: str, kind: str) -> JobRecord:
        job = await self._repo.get(validate_job_id(job_id))
        if job is None or job.kind != kind:
            raise NotFound(f"job {job_id} not found", code="JobNotFound", field="jobId")
        return job

    # --- scheduled device jobs (jobs v2) --------------------------------------------------------
    async def create_device_job(self, job_id: str, body: dict[str, Any], *, actor: str) -> dict[str, Any]:
        validate_job_id(job_id)
        now = self._now_ms()
        job_type, start_ms, doc = parse_device_job(job_id, body, now)
        status = "scheduled" if start_ms > now else "queued"
        await self._repo.create(JobRecord(job_id, "device", job_type, status, now, start_ms, None, doc))
        await self._audit.record(
            "job.create",
            "ok",
            principal=actor,
            target=job_id,
            details={"type": job_type, "queryCondition": doc["queryCondition"][:200]},
        )
        self._wake()
        return await self.get_device_job(job_id)

    async def get_device_job(self, job_id: str) -> dict[str, Any]:
        job = await self._get(job_id, "device")
        return render_job_response(job, await self._repo.statistics(job.job_id))

    async def cancel_device_job(self, job_id: str, *, actor: str) -> dict[str, Any]:
        job = await self._get(job_id, "device")
        if job.status in _ACTIVE:
            now = self._now_ms()
            if await self._repo.update(
                job.job_id, status="cancelled", doc=job.doc, now_ms=now, end_ms=now, only_if=_ACTIVE
            ):
                await self._repo.finish_pending(job.job_id, status="canceled", now_ms=now)
                await self._audit.record("job.cancel", "ok", principal=actor, target=job_id)
                self._wake()
        return await self.get_device_job(job_id)

    async def query_device_jobs(self, job_type: str | None, job_status: str | None) -> list[dict[str, Any]]:
        if job_type and job_type not in ("scheduleUpdateTwin", "scheduleDeviceMethod"):
            raise BadRequest("jobType must be scheduleUpdateTwin or scheduleDeviceMethod", field="jobType")
        if job_status and job_status not in JOB_STATUSES:
            raise BadRequest(f"jobStatus must be one of {', '.join(JOB_STATUSES)}", field="jobStatus")
        jobs = await self._repo.list_jobs(kind="device", type_=job_type or None, status=job_status or None)
        return [render_job_response(j, await self._repo.statistics(j.job_id)) for j in jobs]

    # --- import / export --------------------------------------------------------------------------
    async def create_registry_job(self, body: dict[str, Any], *, actor: str) -> dict[str, Any]:
        job_type, doc = parse_registry_job(body)
        given = body.get("jobId")
        job_id = validate_job_id(given) if given else f"{job_type}-{self._now_ms()}-{id(doc) & 0xFFFF:x}"
        now = self._now_ms()
        await self._repo.create(JobRecord(job_id, "registry", job_type, "enqueued", now, now, None, doc))
        await self._audit.record(
            "job.create",
            "ok",
            principal=actor,
            target=job_id,
            details={"type": job_type, "excludeKeysInExport": doc["excludeKeysInExport"]},
        )
        self._wake()
        return render_registry_job(await self._get(job_id, "registry"))

    async def get_registry_job(self, job_id: str) -> dict[str, Any]:
        return render_registry_job(await self._get(job_id, "registry"))

    async def list_registry_jobs(self) -> list[dict[str, Any]]:
        return [render_registry_job(j) for j in await self._repo.list_jobs(kind="registry")]

    async def cancel_registry_job(self, job_id: str, *, actor: str) -> dict[str, Any]:
        job = await self._get(job_id, "registry")
        if job.status in _ACTIVE:
            now = self._now_ms()
            if await self._repo.update(
                job.job_id, status="cancelled", doc=job.doc, now_ms=now, end_ms=now, only_if=_ACTIVE
            ):
                await self._audit.record("job.cancel", "ok", principal=actor, target=job_id)
        return render_registry_job(await self._get(job_id, "registry"))

    # --- FROM devices.jobs --------------------------------------------------------------------------
    async def _scan_device_jobs(self, after: After | None, limit: int) -> list[dict[str, Any]]:
        rows = await self._repo.device_rows(after=after if isinstance(after, tuple) else None, limit=limit)
        types = await self._repo.types_of(sorted({r.job_id for r in rows}))
        return [device_job_row(r, types.get(r.job_id, "unknown")) for r in rows]

    def query_source(self) -> Source:
        """`FROM devices.jobs`: one row per (job, device), keyed in that order."""
        return Source(self._scan_device_jobs, lambda doc: (doc["jobId"], doc["deviceId"]), compound=True,
                      item_type="deviceJob", prefix=("devices", "jobs"))
