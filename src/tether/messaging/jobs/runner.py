"""Runs jobs on the one hub node that holds the `jobs` lease (`Leadership`).

A scheduled job whose start time has come is started in one transaction (`queued`/`scheduled` →
`running` with its devices, selected by `queryCondition` at that moment, all `pending`); then the
leader claims pending devices in batches and works on `jobs.concurrency` at a time: a twin update is a
service PATCH (`If-Match` from `updateTwin.etag`), a method call a direct method with the job's
timeouts. Each device's outcome is written as soon as it is known, once. A device the method could
not reach is `failed` with the error (`DeviceNotOnline`, `GatewayTimeout`, …); a device that
answered is `completed` with `outcome.deviceMethodResponse` whatever status it answered.

When the job has run for `maxExecutionTimeInSeconds`, its unfinished devices are `failed`
(`JobTimeout`) and the job is `failed`. A cancel (any node) is seen before every batch. If the leader
stops, another node takes the lease and resumes the job: devices that were `running` are pending
again, finished ones are never repeated.

Import/export jobs run whole on the leader (`registry_io`); one interrupted by a stop is run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from tether.errors import TetherError
from tether.messaging.jobs.registry_io import export_registry, import_registry
from tether.messaging.jobs.targets import matching_twins, parse_condition
from tether.messaging.lease import Leadership
from tether.messaging.methods import MethodService
from tether.messaging.twins import TwinService
from tether.registry.modules import ModuleService
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.blob import ContainerUri
from tether.storage.sql.jobs import JobRecord, SqlJobRepository

__all__ = ["JobRunner"]

log = logging.getLogger("tether.jobs")

RETENTION_SWEEP_S: Final = 3600.0


class JobRunner:
    def __init__(
        self,
        repo: SqlJobRepository,
        leadership: Leadership,
        *,
        twins: TwinService,
        methods: MethodService,
        registry: RegistryService,
        modules: ModuleService,
        audit: AuditLog,
        concurrency: int,
        poll_interval_s: float,
        retention_s: float,
        blob_ca_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._repo = repo
        self.leadership = leadership
        self._twins, self._methods, self._registry, self._audit = twins, methods, registry, audit
        self._modules = modules
        self._concurrency = concurrency
        self._poll_s = poll_interval_s
        self._retention_s = retention_s
        self._ca_file = blob_ca_file
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_purge = 0.0

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def wake(self) -> None:
        self._wakeup.set()

    def start(self) -> None:
        self.leadership.start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="job-runner")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.leadership.close()

    async def _run(self) -> None:
        while True:
            if self.leadership.leading:
                try:
                    await self.run_once()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("job runner round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._poll_s)
            self._wakeup.clear()

    async def run_once(self) -> None:
        """Advance every due job (the leader's round)."""
        now = self._now_ms()
        for job in await self._repo.due(now, ("queued", "scheduled", "running", "enqueued")):
            if not self.leadership.leading:
                return
            if job.kind == "device":
                await self._run_device_job(job)
            else:
                await self._run_registry_job(job)
        if self._clock() - self._last_purge > RETENTION_SWEEP_S:
            self._last_purge = self._clock()
            await self._repo.purge(now - int(self._retention_s * 1000))

    # --- scheduled device jobs ----------------------------------------------------------------------
    async def _run_device_job(self, job: JobRecord) -> None:
        if job.status in ("queued", "scheduled"):
            query = parse_condition(job.doc["queryCondition"])
            ids = [doc["deviceId"] async for doc in matching_twins(self._twins, query)]
            if not await self._repo.start(job.job_id, ids, doc=job.doc, now_ms=self._now_ms()):
                return  # cancelled meanwhile
            log.info("job %s started on %d devices", job.job_id, len(ids))
        else:
            await self._repo.resume(job.job_id, self._now_ms())
        deadline_ms = job.start_ms + int(job.doc.get("maxExecutionTimeInSeconds", 3600)) * 1000
        semaphore = asyncio.Semaphore(self._concurrency)

        async def one(device_id: str) -> None:
            async with semaphore:
                await self._run_device(job, device_id)

        while self.leadership.leading:
            current = await self._repo.get(job.job_id)
            if current is None or current.status != "running":
                return  # cancelled (by any node) or gone
            if self._now_ms() >= deadline_ms:
                await self._repo.finish_pending(
                    job.job_id,
                    status="failed",
                    now_ms=self._now_ms(),
                    error={"code": "JobTimeout", "description": "maxExecutionTimeInSeconds elapsed"},
                )
                await self._end(
                    current, "failed", "maxExecutionTimeInSeconds elapsed before every device ran"
                )
                return
            batch = await self._repo.claim(job.job_id, self._concurrency * 4, self._now_ms())
            if not batch:
                break
            await asyncio.gather(*(one(d) for d in batch))
        else:
            return  # lost the lease: the next leader resumes
        current = await self._repo.get(job.job_id)
        if current is not None and current.status == "running":
            stats = await self._repo.statistics(job.job_id)
            if not stats.get("pending") and not stats.get("running"):
                await self._end(current, "completed", None)

    async def _end(self, job: JobRecord, status: str, reason: str | None) -> None:
        doc = {**job.doc, **({"failureReason": reason} if reason else {})}
        if await self._repo.update(
            job.job_id,
            status=status,
            doc=doc,
            now_ms=self._now_ms(),
            end_ms=self._now_ms(),
            only_if=("running",),
        ):
            await self._audit.record(
                "job.end",
                "ok" if status == "completed" else "failed",
                principal="hub:jobs",
                target=job.job_id,
                details={"status": status, **await self._repo.statistics(job.job_id)},
            )

    async def _run_device(self, job: JobRecord, device_id: str) -> None:
        actor = f"job:{job.job_id}"
        outcome: dict[str, Any] | None = None
        try:
            if job.type == "scheduleDeviceMethod":
                method = job.doc["cloudToDeviceMethod"]
                result = await self._methods.invoke(
                    device_id,
                    method_name=method["methodName"],
                    payload=method.get("payload"),
                    response_timeout_s=method.get("responseTimeoutInSeconds"),
                    connect_timeout_s=method.get("connectTimeoutInSeconds"),
                    actor=actor,
                )
                outcome = {"deviceMethodResponse": {"status": result.status, "payload": result.payload}}
            else:
                twin = job.doc["updateTwin"]
                etag = twin.get("etag")
                body = {k: v for k, v in twin.items() if k in ("tags", "properties")}
                await self._twins.patch(
                    device_id, body, actor=actor, if_match=None if etag in (None, "", "*") else f'"{etag}"'
                )
        except TetherError as exc:
            await self._repo.finish_device(
                job.job_id,
                device_id,
                status="failed",
                now_ms=self._now_ms(),
                error={"code": exc.code, "description": exc.message},
            )
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one device's surprise must not stop the job
            log.exception("job %s: device %s failed", job.job_id, device_id)
            await self._repo.finish_device(
                job.job_id,
                device_id,
                status="failed",
                now_ms=self._now_ms(),
                error={"code": "ServerError", "description": type(exc).__name__},
            )
            return
        await self._repo.finish_device(
            job.job_id, device_id, status="completed", now_ms=self._now_ms(), outcome=outcome
        )

    # --- import / export ------------------------------------------------------------------------------
    async def _run_registry_job(self, job: JobRecord) -> None:
        now = self._now_ms()
        if not await self._repo.update(
            job.job_id, status="running", doc=job.doc, now_ms=now, only_if=("enqueued", "queued", "running")
        ):
            return
        doc = dict(job.doc)

        async def progress(count: int) -> None:
            doc["progress"] = count
            await self._repo.update(
                job.job_id, status="running", doc=doc, now_ms=self._now_ms(), only_if=("running",)
            )

        try:
            output = ContainerUri(
                doc["outputBlobContainerUri"], ca_file=self._ca_file, field="outputBlobContainerUri"
            )
            if job.type == "export":
                devices, modules = await export_registry(
                    self._registry,
                    self._modules,
                    self._twins,
                    output,
                    blob_name=doc.get("outputBlobName"),
                    exclude_keys=bool(doc.get("excludeKeysInExport")),
                    progress=progress,
                )
                doc["statusMessage"] = f"exported {devices} devices and {modules} modules"
            else:
                source = ContainerUri(
                    doc["inputBlobContainerUri"], ca_file=self._ca_file, field="inputBlobContainerUri"
                )
                applied, failed = await import_registry(
                    self._registry,
                    self._modules,
                    self._twins,
                    source,
                    output,
                    blob_name=doc.get("inputBlobName"),
                    actor=f"job:{job.job_id}",
                    progress=progress,
                )
                doc["statusMessage"] = f"imported {applied} lines, {failed} failed (importErrors.log)"
            doc["progress"] = 100
            status, reason = "completed", None
        except TetherError as exc:
            status, reason = "failed", f"{exc.code}: {exc.message}"
        if reason:
            doc["failureReason"] = reason
        if await self._repo.update(
            job.job_id,
            status=status,
            doc=doc,
            now_ms=self._now_ms(),
            end_ms=self._now_ms(),
            only_if=("running",),
        ):
            await self._audit.record(
                "job.end",
                "ok" if status == "completed" else "failed",
                principal="hub:jobs",
                target=job.job_id,
                details={"type": job.type, "status": status, "reason": reason},
            )
