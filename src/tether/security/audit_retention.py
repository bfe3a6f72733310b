"""Audit log retention: records older than `audit.retention_days`, or beyond the newest
`audit.max_records`, are written to a JSON-lines file under `audit.export_dir` (default
`{data_dir}/audit`), made durable (fsync), and only then deleted.

The hub runs `AuditRetention.run()` shortly after start and then every `audit.retention_interval_s`.
Each run that expires anything writes one new file `audit-{UTC time}.jsonl` (mode 0600: records name
principals and peers), one record per line with the fields of `GET /tether/audit`, oldest first, and
then one `audit.retention` record saying how many records went where. A run works in batches of
`batch` records (written, fsynced, deleted), so a huge backlog neither holds a long transaction nor
loses anything if the process stops half-way: a batch is deleted only after it is on disk, and at worst
re-exported by the next run. The exported files are the operator's to ship off-host and remove.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Protocol

from tether.registry.models import utcnow
from tether.security.audit import AuditLog
from tether.storage.base import AuditRecord

__all__ = ["AuditRetention", "RetentionRepository", "RetentionResult", "export_line"]

log = logging.getLogger(__name__)

BATCH = 500  # ids per delete stay below SQLite's bound-parameter limit


class RetentionRepository(Protocol):
    """What retention needs of the audit repository (`SqlAuditRepository`)."""

    async def first_beyond(self, keep: int) -> int | None: ...
    async def expired(self, *, before: datetime | None, through_id: int | None, limit: int
                      ) -> list[AuditRecord]: ...
    async def delete(self, ids: Sequence[int]) -> int: ...


@dataclass(frozen=True, slots=True)
class RetentionResult:
    deleted: int
    file: Path | None  # where they were exported (None: nothing expired)


def export_line(record: AuditRecord) -> str:
    """One record as a JSON line (the fields and names of `GET /tether/audit`)."""
    return json.dumps({
        "id": record.id, "time": record.time.isoformat(), "action": record.action, "outcome": record.outcome,
        "principal": record.principal, "credential": record.credential, "reason": record.reason,
        "peer": record.peer, "target": record.target, "details": record.details,
    }, separators=(",", ":"), ensure_ascii=False) + "\n"


class AuditRetention:
    """Applies the age and size limits to the audit table, exporting before deleting."""

    def __init__(
        self,
        repo: RetentionRepository,
        audit: AuditLog,
        export_dir: Path,
        *,
        max_age_s: float | None,
        max_records: int | None,
        batch: int = BATCH,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._repo = repo
        self._audit = audit
        self.export_dir = export_dir
        self.max_age_s = max_age_s
        self.max_records = max_records
        self._batch = max(1, min(batch, BATCH))
        self._clock = clock

    async def run(self) -> RetentionResult:
        """Export and delete what is expired now; one file per run that finds anything."""
        await self._audit.flush()  # records still buffered count towards the size limit
        before = self._clock() - timedelta(seconds=self.max_age_s) if self.max_age_s is not None else None
        through_id = await self._repo.first_beyond(self.max_records) if self.max_records is not None else None
        if before is None and through_id is None:
            return RetentionResult(0, None)
        path: Path | None = None
        out: IO[str] | None = None
        deleted = 0
        try:
            while True:
                records = await self._repo.expired(before=before, through_id=through_id, limit=self._batch)
                if not records:
                    break
                if out is None:
                    path, out = self._open()
                out.write("".join(export_line(r) for r in records))
                out.flush()
                os.fsync(out.fileno())  # on disk before the rows go
                deleted += await self._repo.delete([r.id for r in records if r.id is not None])
                if len(records) < self._batch:
                    break
        finally:
            if out is not None:
                out.close()
                _fsync_dir(self.export_dir)
        if path is None:
            return RetentionResult(0, None)
        log.info("audit retention: %d records exported to %s and deleted", deleted, path)
        await self._audit.record("audit.retention", "ok", principal="system", target=path.name,
                                 details={"deleted": deleted, "maxAgeSeconds": self.max_age_s,
                                          "maxRecords": self.max_records})
        return RetentionResult(deleted, path)

    def _open(self) -> tuple[Path, IO[str]]:
        self.export_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = self._clock().strftime("%Y%m%dT%H%M%SZ")
        for n in range(1000):
            path = self.export_dir / (f"audit-{stamp}.jsonl" if n == 0 else f"audit-{stamp}-{n}.jsonl")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            return path, os.fdopen(fd, "w", encoding="utf-8")
        raise FileExistsError(f"no free audit export file name in {self.export_dir}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
