"""Audit retention by age and by size, exporting before deleting, on real SQLite and PostgreSQL, and the
hub's periodic run (issue 14: the audit table had no retention)."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tether.config import load_settings
from tether.hub import Hub
from tether.security.audit import AuditLog
from tether.security.audit_retention import AuditRetention
from tether.storage.base import AuditRecord
from tether.storage.sql import SqlStorage

NOW = datetime.now(UTC)  # the retention record itself is stamped with the real clock
DAY = 86400.0


def record(n: int, at: datetime) -> AuditRecord:
    return AuditRecord(time=at, action="auth.mqtt", outcome="refused", principal=f"device:d{n}",
                       reason="bad-signature", peer=f"192.0.2.{n % 250}:1", details={"n": n, "ü": "✓"})


async def stored(storage: SqlStorage) -> list[AuditRecord]:
    return sorted(await storage.audit.query(limit=10_000), key=lambda r: r.id or 0)


def exported(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_records_older_than_the_age_limit_are_exported_then_deleted(storage: SqlStorage,
                                                                          tmp_path: Path) -> None:
    audit = AuditLog(storage.audit)
    old = [record(n, NOW - timedelta(days=100, minutes=n)) for n in range(7)]
    recent = [record(100 + n, NOW - timedelta(days=1, minutes=n)) for n in range(5)]
    await storage.audit.append([*old, *recent])
    ids = {r.principal: r.id for r in await stored(storage)}
    retention = AuditRetention(storage.audit, audit, tmp_path / "export", max_age_s=90 * DAY,
                               max_records=None, batch=3, clock=lambda: NOW)  # three batches: 3 + 3 + 1

    result = await retention.run()
    await audit.flush()

    assert result.deleted == 7 and result.file is not None
    assert stat.S_IMODE(result.file.stat().st_mode) == 0o600
    lines = exported(result.file)
    assert [line["principal"] for line in lines] == [r.principal for r in old]
    assert [line["id"] for line in lines] == [ids[r.principal] for r in old]  # oldest first
    assert lines[0]["details"] == {"n": 0, "ü": "✓"} and lines[0]["reason"] == "bad-signature"
    assert datetime.fromisoformat(str(lines[0]["time"])) == old[0].time
    left = await stored(storage)
    assert {r.principal for r in left if r.action == "auth.mqtt"} == {r.principal for r in recent}
    [note] = [r for r in left if r.action == "audit.retention"]
    assert note.target == result.file.name and note.details["deleted"] == 7

    again = await retention.run()  # nothing expired any more: no new file
    assert again.deleted == 0 and again.file is None
    assert list((tmp_path / "export").iterdir()) == [result.file]
    await audit.close()


async def test_only_the_newest_records_within_the_size_limit_are_kept(storage: SqlStorage,
                                                                      tmp_path: Path) -> None:
    audit = AuditLog(storage.audit)
    records = [record(n, NOW - timedelta(seconds=100 - n)) for n in range(10)]
    await storage.audit.append(records)
    retention = AuditRetention(storage.audit, audit, tmp_path / "export", max_age_s=None, max_records=3,
                               clock=lambda: NOW)
    result = await retention.run()
    assert result.deleted == 7 and result.file is not None
    assert [line["principal"] for line in exported(result.file)] == [r.principal for r in records[:7]]
    await audit.flush()
    left = [r.principal for r in await stored(storage) if r.action == "auth.mqtt"]
    assert left == [r.principal for r in records[7:]]
    await audit.close()


async def test_without_limits_nothing_is_touched(storage: SqlStorage, tmp_path: Path) -> None:
    audit = AuditLog(storage.audit)
    await storage.audit.append([record(1, NOW - timedelta(days=9999))])
    retention = AuditRetention(storage.audit, audit, tmp_path / "export", max_age_s=None, max_records=None)
    assert (await retention.run()).file is None
    assert len(await stored(storage)) == 1 and not (tmp_path / "export").exists()
    await audit.close()


async def test_the_hub_applies_retention_periodically(tmp_path: Path) -> None:
    """`audit.retention_days` / `retention_interval_s` through the hub: its own start-up records
    (policy creation) expire within a second and land in `{data_dir}/audit`."""
    data = tmp_path / "data"
    settings = load_settings(hub={"hostname": "localhost", "data_dir": data},
                             audit={"retention_days": 1.0 / DAY, "retention_interval_s": 0.3})
    async with Hub(settings) as hub:
        deadline = time.monotonic() + 30
        while True:  # the file is written first, the rows deleted after: poll for both
            files = sorted((data / "audit").glob("audit-*.jsonl")) if (data / "audit").exists() else []
            lines = [line for f in files for line in exported(f)]
            created = {line["target"] for line in lines if line["action"] == "policy.create"}
            left = {r.target for r in await hub.audit.query(limit=1000) if r.action == "policy.create"}
            if (created and not left) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert len(created) == 5, lines  # the five default policies' records, exported...
        assert not left  # ...then deleted
