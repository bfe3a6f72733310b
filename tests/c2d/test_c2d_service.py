"""C2DService on SQLite and PostgreSQL: Azure's message lifecycle, limits, feedback and durability."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from c2d.helpers import create_device
from tether.errors import BadRequest, NotFound, PreconditionFailed, QuotaExceeded
from tether.messaging.c2d import C2DService
from tether.messaging.feedback import FeedbackBatch, wants_feedback
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.c2d import c2d_metadata

ACTOR = "policy:service"


@pytest.fixture
async def c2d(storage: SqlStorage, audit: AuditLog, registry: RegistryService) -> AsyncIterator[C2DService]:
    await create_device(registry, "dev1")
    service = C2DService(storage.db, audit=audit, sweep_interval_s=0.05)
    await service.start()
    try:
        yield service
    finally:
        await service.close()


async def next_feedback(c2d: C2DService, timeout_s: float = 3.0) -> FeedbackBatch:
    batch = await c2d.feedback.receive(timeout_s=timeout_s)
    assert batch is not None, "no feedback arrived"
    return batch


def statuses(batch: FeedbackBatch) -> list[tuple[str, str]]:
    return [(r.original_message_id, r.status_code) for r in batch.records]


def test_feedback_rule_follows_the_ack_mode() -> None:
    assert wants_feedback("positive", "Success") and wants_feedback("full", "Success")
    assert not wants_feedback("negative", "Success") and not wants_feedback("none", "Success")
    for status in ("Expired", "DeliveryCountExceeded", "Rejected", "Purged"):
        assert wants_feedback("negative", status) and wants_feedback("full", status)
        assert not wants_feedback("positive", status) and not wants_feedback("none", status)


async def test_send_receive_complete_gives_success_feedback(c2d: C2DService,
                                                            registry: RegistryService) -> None:
    sent = await c2d.send("dev1", b"hello", message_id="m1", correlation_id="c1", ack="positive",
                          properties={"k": "v"}, content_type="text/plain", actor=ACTOR)
    assert sent.sequence_number > 0 and sent.delivery_count == 0
    got = await c2d.receive("dev1")
    assert got is not None and got.lock_token
    assert (got.message_id, got.body, got.correlation_id, got.properties, got.content_type) == (
        "m1", b"hello", "c1", {"k": "v"}, "text/plain")
    assert got.delivery_count == 1 and await c2d.receive("dev1") is None  # locked: invisible
    await c2d.complete("dev1", got.lock_token)
    assert await c2d.queue_depth("dev1") == 0
    batch = await next_feedback(c2d)
    record = batch.records[0].to_wire()
    device = await registry.get("dev1")
    assert record["originalMessageId"] == "m1" and record["statusCode"] == "Success"
    assert record["description"] == "Success" and record["deviceId"] == "dev1"
    assert record["deviceGenerationId"] == device.generation_id
    assert record["enqueuedTimeUtc"].endswith("Z")


async def test_ack_none_produces_no_feedback(c2d: C2DService) -> None:
    await c2d.send("dev1", b"x", actor=ACTOR)
    got = await c2d.receive("dev1")
    assert got is not None and got.lock_token and got.message_id  # a generated id
    await c2d.complete("dev1", got.lock_token)
    assert await c2d.feedback.receive() is None


async def test_messages_come_out_oldest_first(c2d: C2DService) -> None:
    for i in range(3):
        await c2d.send("dev1", b"%d" % i, message_id=f"m{i}", actor=ACTOR)
    seen = []
    while (got := await c2d.receive("dev1")) is not None:
        seen.append(got.message_id)
    assert seen == ["m0", "m1", "m2"]


async def test_unknown_device_is_404(c2d: C2DService) -> None:
    with pytest.raises(NotFound) as exc:
        await c2d.send("ghost", b"x", actor=ACTOR)
    assert exc.value.code == "DeviceNotFound" and exc.value.http_status == 404
    with pytest.raises(NotFound):
        await c2d.purge("ghost")


async def test_queue_depth_limit(storage: SqlStorage, registry: RegistryService) -> None:
    await create_device(registry, "dev1")
    c2d = C2DService(storage.db, max_queue_depth=3)
    for _ in range(3):
        await c2d.send("dev1", b"x", actor=ACTOR)
    with pytest.raises(QuotaExceeded) as exc:
        await c2d.send("dev1", b"x", actor=ACTOR)
    assert exc.value.http_status == 403 and exc.value.code == "DeviceMaximumQueueDepthExceeded"
    got = await c2d.receive("dev1")
    assert got is not None and got.lock_token
    with pytest.raises(QuotaExceeded):  # a locked message still counts
        await c2d.send("dev1", b"x", actor=ACTOR)
    await c2d.complete("dev1", got.lock_token)
    await c2d.send("dev1", b"x", actor=ACTOR)


async def test_concurrent_sends_never_pass_the_depth_limit(storage: SqlStorage,
                                                           registry: RegistryService) -> None:
    await create_device(registry, "dev1")
    c2d = C2DService(storage.db, max_queue_depth=5)
    results = await asyncio.gather(*(c2d.send("dev1", b"x", actor=ACTOR) for _ in range(12)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 5
    assert all(isinstance(r, QuotaExceeded) for r in results if isinstance(r, BaseException))
    assert await c2d.queue_depth("dev1") == 5


@pytest.mark.parametrize(("kwargs", "code"), [
    ({"body": b"x" * 65_537}, "MessageTooLarge"),
    ({"ttl_s": 172_801}, "ArgumentInvalid"),
    ({"ttl_s": 0}, "ArgumentInvalid"),
    ({"ack": "sometimes"}, "ArgumentInvalid"),
    ({"message_id": "bad id with spaces"}, "ArgumentInvalid"),
    ({"properties": {"bad name": "v"}}, "ArgumentInvalid"),
    ({"properties": {"k": "line\nbreak"}}, "ArgumentInvalid"),
    ({"properties": {"iothub-ack": "full"}}, "ArgumentInvalid"),
])
async def test_invalid_sends_are_400(c2d: C2DService, kwargs: dict[str, Any], code: str) -> None:
    kwargs = dict(kwargs)
    body = kwargs.pop("body", b"x")
    with pytest.raises(BadRequest) as exc:
        await c2d.send("dev1", body, actor=ACTOR, **kwargs)
    assert exc.value.http_status == 400 and exc.value.code == code
    assert await c2d.queue_depth("dev1") == 0


async def test_largest_message_and_ttl_are_accepted(c2d: C2DService) -> None:
    sent = await c2d.send("dev1", b"x" * 65_536, ttl_s=172_800, actor=ACTOR)
    assert (sent.expiry_time - sent.enqueued_time).total_seconds() == pytest.approx(172_800, abs=1)


async def test_abandon_redelivers_with_a_higher_delivery_count(c2d: C2DService) -> None:
    woken: list[str] = []
    c2d.add_enqueue_listener(woken.append)
    await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
    first = await c2d.receive("dev1")
    assert first is not None and first.lock_token
    await c2d.abandon("dev1", first.lock_token)
    assert woken == ["dev1", "dev1"]  # send, abandon
    second = await c2d.receive("dev1")
    assert second is not None and second.message_id == "m1" and second.delivery_count == 2
    assert second.lock_token != first.lock_token
    with pytest.raises(PreconditionFailed) as exc:  # the old lock is gone
        await c2d.complete("dev1", first.lock_token)
    assert exc.value.code == "DeviceMessageLockLost" and exc.value.http_status == 412
    assert second.lock_token
    await c2d.complete("dev1", second.lock_token)
    with pytest.raises(PreconditionFailed):  # settled once only
        await c2d.complete("dev1", second.lock_token)


async def test_reject_dead_letters_with_rejected_feedback(c2d: C2DService) -> None:
    await c2d.send("dev1", b"x", message_id="m1", ack="negative", actor=ACTOR)
    got = await c2d.receive("dev1")
    assert got is not None and got.lock_token
    await c2d.reject("dev1", got.lock_token)
    assert await c2d.receive("dev1") is None
    assert statuses(await next_feedback(c2d)) == [("m1", "Rejected")]


async def test_delivery_count_exhaustion_dead_letters(storage: SqlStorage, registry: RegistryService) -> None:
    await create_device(registry, "dev1")
    c2d = C2DService(storage.db, max_delivery_count=2)
    await c2d.send("dev1", b"x", message_id="m1", ack="full", actor=ACTOR)
    for expected_count in (1, 2):
        got = await c2d.receive("dev1")
        assert got is not None and got.lock_token and got.delivery_count == expected_count
        await c2d.abandon("dev1", got.lock_token)
    assert await c2d.receive("dev1") is None  # a third delivery would exceed the maximum
    assert await c2d.queue_depth("dev1") == 0
    assert statuses(await next_feedback(c2d)) == [("m1", "DeliveryCountExceeded")]


async def test_ttl_expiry_gives_expired_feedback(c2d: C2DService) -> None:
    await c2d.send("dev1", b"x", message_id="short", ack="negative", ttl_s=0.2, actor=ACTOR)
    await c2d.send("dev1", b"x", message_id="long", ack="negative", actor=ACTOR)
    batch = await next_feedback(c2d)  # the sweeper dead-letters it, nobody has to receive
    assert statuses(batch) == [("short", "Expired")]
    got = await c2d.receive("dev1")
    assert got is not None and got.message_id == "long"


async def test_expired_lock_makes_the_message_visible_again(storage: SqlStorage,
                                                           registry: RegistryService) -> None:
    await create_device(registry, "dev1")
    c2d = C2DService(storage.db, sweep_interval_s=0.05)
    woken = asyncio.Event()
    await c2d.start()
    try:
        await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
        first = await c2d.receive("dev1", lock_timeout_s=0.1)
        assert first is not None and first.lock_token
        c2d.add_enqueue_listener(lambda device_id: woken.set(), device_id="dev1")
        await asyncio.wait_for(woken.wait(), 3)  # the sweeper released the lock
        second = await c2d.receive("dev1")
        assert second is not None and second.message_id == "m1" and second.delivery_count == 2
        with pytest.raises(PreconditionFailed):
            await c2d.complete("dev1", first.lock_token)
    finally:
        await c2d.close()


async def test_purge_empties_the_queue_with_purged_feedback(c2d: C2DService, audit: AuditLog) -> None:
    for ack in ("none", "positive", "negative", "full"):
        await c2d.send("dev1", b"x", message_id=f"m-{ack}", ack=ack, actor=ACTOR)
    locked = await c2d.receive("dev1")
    assert locked is not None and locked.lock_token
    assert await c2d.purge("dev1", actor=ACTOR) == 4
    assert await c2d.receive("dev1") is None and await c2d.purge("dev1", actor=ACTOR) == 0
    with pytest.raises(PreconditionFailed):
        await c2d.complete("dev1", locked.lock_token)
    assert sorted(statuses(await next_feedback(c2d))) == [("m-full", "Purged"), ("m-negative", "Purged")]
    await audit.flush()
    records = await audit.query(action_prefix="c2d.purge")
    assert records[0].principal == ACTOR and records[0].target == "dev1"


async def test_feedback_batches_of_64_complete_and_abandon(c2d: C2DService) -> None:
    for start in (0, 35):  # 70 records, from two purges of a queue that holds 50 at most
        for i in range(start, start + 35):
            await c2d.send("dev1", b"x", message_id=f"m{i}", ack="negative", actor=ACTOR)
        assert await c2d.purge("dev1") == 35
    first = await next_feedback(c2d)
    assert len(first.records) == 64
    second = await next_feedback(c2d)
    assert len(second.records) == 6 and second.lock_token != first.lock_token
    assert await c2d.feedback.receive() is None  # everything is locked
    await c2d.feedback.abandon(second.lock_token)
    again = await next_feedback(c2d)
    assert statuses(again) == statuses(second)
    await c2d.feedback.complete(first.lock_token)
    await c2d.feedback.complete(again.lock_token)
    assert await c2d.feedback.pending() == 0
    with pytest.raises(PreconditionFailed):
        await c2d.feedback.complete(first.lock_token)


async def test_feedback_long_poll_wakes_on_new_feedback(c2d: C2DService) -> None:
    waiting = asyncio.create_task(c2d.feedback.receive(timeout_s=10))
    await asyncio.sleep(0.1)
    await c2d.send("dev1", b"x", message_id="m1", ack="positive", actor=ACTOR)
    got = await c2d.receive("dev1")
    assert got is not None and got.lock_token
    await c2d.complete("dev1", got.lock_token)
    batch = await asyncio.wait_for(waiting, 3)
    assert batch is not None and statuses(batch) == [("m1", "Success")]


async def test_deleting_the_device_drops_its_queue(c2d: C2DService, registry: RegistryService) -> None:
    await c2d.send("dev1", b"x", actor=ACTOR)
    await registry.delete("dev1", if_match="*", actor="test")
    assert await c2d.queue_depth("dev1") == 0
    await create_device(registry, "dev1")  # a new identity with the same id starts empty
    assert await c2d.receive("dev1") is None


async def test_queue_survives_a_restart(db_url: str) -> None:
    first = SqlStorage(db_url)
    await first.start()
    try:
        await create_device(RegistryService(first.devices, AuditLog(first.audit)), "dev1")
        await C2DService(first.db).send("dev1", b"durable", message_id="keep", ack="full", actor=ACTOR)
    finally:
        await first.close()
    second = SqlStorage(db_url)
    await second.start()
    try:
        got = await C2DService(second.db).receive("dev1")
        assert got is not None and (got.message_id, got.body, got.ack) == ("keep", b"durable", "full")
    finally:
        await second.close()


def _table_of(diff: Any) -> str | None:
    """The table a compare_metadata entry is about (lists hold column modifications)."""
    if isinstance(diff, list):
        return str(diff[0][2])
    obj = diff[1]
    table = getattr(obj, "table", None)
    return str(obj.name if table is None else table.name)


def _diff(connection: Connection) -> list[Any]:
    ctx = MigrationContext.configure(connection, opts={"compare_type": False})
    return [d for d in compare_metadata(ctx, c2d_metadata) if _table_of(d) in c2d_metadata.tables]


async def test_migration_matches_the_table_definitions(storage: SqlStorage) -> None:
    async with storage.db.read() as conn:
        assert await conn.run_sync(_diff) == []
