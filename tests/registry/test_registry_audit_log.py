"""AuditLog: batched but durable (query/flush/close see everything), bounded without dropping,
filters, and no secrets or unbounded client text in records."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tether.security.audit import MAX_FIELD_CHARS, REDACTED, AuditLog
from tether.storage.sql import SqlStorage


async def test_records_are_queryable_with_filters(audit: AuditLog) -> None:
    start = datetime.now(UTC)
    await audit.record("auth.mqtt", "refused", principal="device:d1", credential="sas",
                       reason="expired", peer="127.0.0.1:5555", target="d1")
    await audit.record("auth.rest", "allowed", principal="policy:service", credential="policy")
    await audit.record("device.create", "ok", principal="policy:iothubowner", target="d2")
    everything = await audit.query()
    assert [r.action for r in everything] == ["device.create", "auth.rest", "auth.mqtt"]
    refused = await audit.query(outcome="refused")
    assert len(refused) == 1
    r = refused[0]
    assert (r.principal, r.credential, r.reason, r.peer, r.target) == (
        "device:d1", "sas", "expired", "127.0.0.1:5555", "d1")
    assert r.time >= start
    assert [x.action for x in await audit.query(action_prefix="auth.")] == ["auth.rest", "auth.mqtt"]
    assert [x.action for x in await audit.query(principal="policy:service")] == ["auth.rest"]
    assert await audit.query(since=datetime.now(UTC) + timedelta(hours=1)) == []
    assert len(await audit.query(limit=1)) == 1


async def test_close_flushes_buffered_records(storage: SqlStorage) -> None:
    log = AuditLog(storage.audit, max_delay_s=60)  # nothing would be written by the timer
    await log.record("device.delete", "ok", target="x")
    await log.close()
    assert [r.action for r in await storage.audit.query()] == ["device.delete"]
    await log.record("late", "ok")  # after close: written straight through
    assert len(await storage.audit.query()) == 2


async def test_background_flusher_writes_without_query(storage: SqlStorage) -> None:
    log = AuditLog(storage.audit, max_delay_s=0.01)
    try:
        await log.record("auth.http", "refused")
        for _ in range(500):
            if await storage.audit.query():
                break
            await asyncio.sleep(0.01)
        assert len(await storage.audit.query()) == 1
    finally:
        await log.close()


async def test_flood_is_bounded_and_nothing_is_dropped(storage: SqlStorage) -> None:
    log = AuditLog(storage.audit, max_batch=50, max_delay_s=60)
    high_water = 0

    async def one(i: int) -> None:
        nonlocal high_water
        await log.record("auth.mqtt", "refused", principal=f"device:{i}", reason="bad-signature")
        high_water = max(high_water, len(log._buffer))

    await asyncio.gather(*(one(i) for i in range(1000)))
    assert high_water <= 50
    records = await log.query(limit=5000)
    assert len(records) == 1000
    assert {r.principal for r in records} == {f"device:{i}" for i in range(1000)}
    await log.close()


async def test_secrets_redacted_and_long_text_clipped(audit: AuditLog) -> None:
    await audit.record(
        "auth.mqtt", "refused", principal="p" * 10_000,
        details={"password": "hunter2", "nested": {"SharedAccessKey": "abc", "ok": 1}, "tags": {"b", "a"}},
    )
    (r,) = await audit.query()
    assert r.principal is not None and len(r.principal) == MAX_FIELD_CHARS
    assert r.details == {"password": REDACTED, "nested": {"SharedAccessKey": REDACTED, "ok": 1},
                         "tags": ["a", "b"]}


async def test_hostile_text_cannot_jam_the_log(audit: AuditLog) -> None:
    # NUL bytes and lone surrogates would make PostgreSQL refuse the whole batch.
    await audit.record("auth.mqtt", "refused", principal="device:a\x00b", reason="bad\udcff",
                       details={"clientId\x00": "x\x00y"})
    await audit.record("auth.mqtt", "refused", principal="device:ok")
    records = await audit.query()
    assert [r.principal for r in records] == ["device:ok", "device:a\\x00b"]
    assert records[1].reason == "bad\\udcff" and records[1].details == {"clientId\\x00": "x\\x00y"}
