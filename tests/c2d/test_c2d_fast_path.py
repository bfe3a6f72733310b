"""The C2D fast path on SQLite and PostgreSQL: a send to a connected, idle device is locked for its
pump in the send's own write and handed over in memory; PUBACK completions are group-committed
later; concurrent writes share one commit. None of it may lose a message or reorder a queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from c2d.helpers import create_device
from c2d.test_c2d_pump import FakeLink
from tether.messaging.c2d import C2DMessage, C2DService
from tether.messaging.c2d_delivery import C2DPump
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage

ACTOR = "policy:service"


@pytest.fixture
async def c2d(storage: SqlStorage, registry: RegistryService) -> AsyncIterator[C2DService]:
    await create_device(registry, "dev1")
    service = C2DService(storage.db)
    try:
        yield service
    finally:
        await service.close()


async def eventually(check: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def idle_pump(c2d: C2DService, link: FakeLink, **options: Any) -> C2DPump:
    """A started pump whose first (empty) receive is done, so it takes sends directly."""
    pump = C2DPump(c2d, "dev1", link.deliver, **options)
    pump.start()
    await eventually(lambda: _idle(pump))
    return pump


async def _idle(pump: C2DPump) -> bool:
    await asyncio.sleep(0.02)
    return pump.reserve() and (pump.unreserve() is None)


async def test_send_to_an_idle_pump_is_locked_in_the_same_write(c2d: C2DService) -> None:
    link = FakeLink()
    pump = await idle_pump(c2d, link)
    try:
        commits = c2d.writer.commits
        sent = await c2d.send("dev1", b"hi", message_id="m1", ack="positive", actor=ACTOR)
        assert sent.lock_token is not None and sent.delivery_count == 1
        await link.wait_for(1)
        assert c2d.writer.commits == commits + 1  # one write: no receive transaction
        [row] = await c2d.repo.peek("dev1")
        assert (row.message_id, row.lock_token, row.delivery_count) == ("m1", sent.lock_token, 1)
        link.acks[0].set_result(True)
        batch = await c2d.feedback.receive(timeout_s=3)
        assert batch is not None and [(r.original_message_id, r.status_code) for r in batch.records] == [
            ("m1", "Success")]
        assert await c2d.queue_depth("dev1") == 0
    finally:
        await pump.stop()


async def test_locked_on_enqueue_is_redelivered_after_the_connection_drops(c2d: C2DService) -> None:
    link = FakeLink()
    pump = await idle_pump(c2d, link)
    sent = await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
    assert sent.lock_token is not None
    await link.wait_for(1)
    link.acks[0].set_result(False)  # the connection dropped before the PUBACK
    await eventually(lambda: _stopped(pump))
    await pump.stop()
    [row] = await c2d.repo.peek("dev1")
    assert row.lock_token is None and row.delivery_count == 1  # abandoned: visible again, counted

    again = FakeLink()
    pump = C2DPump(c2d, "dev1", again.deliver)
    pump.start()
    try:
        await again.wait_for(1)
        [row] = await c2d.repo.peek("dev1")
        assert row.message_id == "m1" and row.delivery_count == 2
        again.acks[0].set_result(True)
        await eventually(lambda: _depth_is(c2d, 0))
    finally:
        await pump.stop()


async def _stopped(pump: C2DPump) -> bool:
    return not pump.running


async def _depth_is(c2d: C2DService, depth: int) -> bool:
    return await c2d.queue_depth("dev1") == depth


class RefusingConsumer:
    """Reserves a slot, then finds its connection closed when the message arrives."""

    def __init__(self) -> None:
        self.reserved = 0
        self.offered: list[C2DMessage] = []

    def reserve(self) -> bool:
        self.reserved += 1
        return True

    def unreserve(self) -> None:
        self.reserved -= 1

    def take(self, message: C2DMessage) -> bool:
        self.offered.append(message)
        return False


async def test_a_consumer_gone_before_the_hand_over_releases_the_message(c2d: C2DService) -> None:
    consumer = RefusingConsumer()
    c2d.attach_consumer("dev1", consumer)
    woken = asyncio.Event()
    c2d.add_enqueue_listener(lambda device_id: woken.set(), device_id="dev1")
    sent = await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
    assert sent.lock_token is not None and [m.message_id for m in consumer.offered] == ["m1"]
    await asyncio.wait_for(woken.wait(), 3)  # released and announced, not left locked for a minute
    [row] = await c2d.repo.peek("dev1")
    assert row.lock_token is None and row.delivery_count == 0  # it never left the hub
    got = await c2d.receive("dev1")
    assert got is not None and got.message_id == "m1" and got.delivery_count == 1


async def test_a_busy_queue_is_not_overtaken_by_a_direct_hand_over(c2d: C2DService) -> None:
    for i in range(3):
        await c2d.send("dev1", b"%d" % i, message_id=f"m{i}", actor=ACTOR)  # while offline
    consumer = RefusingConsumer()
    c2d.attach_consumer("dev1", consumer)
    sent = await c2d.send("dev1", b"3", message_id="m3", actor=ACTOR)
    assert sent.lock_token is None and consumer.offered == [] and consumer.reserved == 0
    c2d.detach_consumer("dev1", consumer)

    link = FakeLink()
    pump = C2DPump(c2d, "dev1", link.deliver, max_in_flight=8)
    pump.start()
    try:
        await c2d.send("dev1", b"4", message_id="m4", actor=ACTOR)  # races the pump's first receive
        await link.wait_for(5)
        await c2d.send("dev1", b"5", message_id="m5", actor=ACTOR)
        await link.wait_for(6)
        assert [p for _, p in link.published] == [b"0", b"1", b"2", b"3", b"4", b"5"]
        for ack in link.acks:
            ack.set_result(True)
        await eventually(lambda: _depth_is(c2d, 0))
    finally:
        await pump.stop()


async def test_puback_completions_are_settled_together_with_their_feedback(c2d: C2DService) -> None:
    link = FakeLink()
    pump = await idle_pump(c2d, link, max_in_flight=8)
    try:
        acks = ("none", "positive", "negative", "full")
        for i, ack in enumerate(acks):
            await c2d.send("dev1", b"x", message_id=f"m{i}", ack=ack, actor=ACTOR)
        await link.wait_for(4)
        await c2d.writer.flush()  # the sends' and locks' writes are done: count only the completions
        commits = c2d.writer.commits
        for future in link.acks:
            future.set_result(True)
        await eventually(lambda: _depth_is(c2d, 0))
        assert c2d.writer.commits == commits + 1  # four completions, one transaction
        batch = await c2d.feedback.receive(timeout_s=3)
        assert batch is not None
        assert sorted((r.original_message_id, r.status_code) for r in batch.records) == [
            ("m1", "Success"), ("m3", "Success")]
    finally:
        await pump.stop()


async def test_a_late_completion_loses_to_the_expired_lock(storage: SqlStorage,
                                                         registry: RegistryService) -> None:
    await create_device(registry, "dev1")
    c2d = C2DService(storage.db, lock_timeout_s=0.1)
    c2d.writer.defer_s = 10.0
    try:
        await c2d.send("dev1", b"x", message_id="m1", actor=ACTOR)
        got = await c2d.receive("dev1")
        assert got is not None
        c2d.complete_later(got)
        await asyncio.sleep(0.15)
        await c2d.writer.flush()  # the completion is written after the lock expired
        [row] = await c2d.repo.peek("dev1")
        assert row.message_id == "m1"  # not completed: it will be delivered again
    finally:
        await c2d.close()


async def test_concurrent_sends_share_commits(c2d: C2DService) -> None:
    commits = c2d.writer.commits
    sent = await asyncio.gather(*(c2d.send("dev1", b"%d" % i, message_id=f"m{i}", actor=ACTOR)
                                  for i in range(16)))
    assert c2d.writer.commits - commits <= 3
    assert [m.sequence_number for m in sent] == sorted(m.sequence_number for m in sent)
    assert [m.message_id for m in await c2d.repo.peek("dev1")] == [f"m{i}" for i in range(16)]


async def test_a_failing_write_does_not_fail_the_others_in_its_batch(c2d: C2DService) -> None:
    async def broken(conn: AsyncConnection) -> None:
        raise ValueError("boom")

    results = await asyncio.gather(
        c2d.send("dev1", b"a", message_id="a", actor=ACTOR),
        c2d.writer.run(broken),
        c2d.send("dev1", b"b", message_id="b", actor=ACTOR),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert [m.message_id for m in await c2d.repo.peek("dev1")] == ["a", "b"]


async def test_expired_messages_do_not_count_against_the_depth(storage: SqlStorage,
                                                               registry: RegistryService) -> None:
    await create_device(registry, "dev1")
    c2d = C2DService(storage.db, max_queue_depth=2)  # no sweeper running
    try:
        for i in range(2):
            await c2d.send("dev1", b"x", message_id=f"old{i}", ack="negative", ttl_s=0.05, actor=ACTOR)
        await asyncio.sleep(0.1)
        await c2d.send("dev1", b"x", message_id="new", actor=ACTOR)
        await c2d.sweep()
        assert [m.message_id for m in await c2d.repo.peek("dev1")] == ["new"]
        batch = await c2d.feedback.receive(timeout_s=3)
        assert batch is not None and sorted(r.original_message_id for r in batch.records) == ["old0", "old1"]
    finally:
        await c2d.close()


async def test_a_crash_after_the_send_loses_nothing(db_url: str) -> None:
    """Durable before `send` returns: storage reopened after "the hub died" (its deferred PUBACK
    completion never written) holds the message locked on enqueue, receivable once the lock
    expires: a second delivery, never a lost message."""
    first = SqlStorage(db_url)
    await first.start()
    try:
        await create_device(RegistryService(first.devices, AuditLog(first.audit)), "dev1")
        c2d = C2DService(first.db, lock_timeout_s=0.3)
        c2d.writer.defer_s = 60.0  # completions stay in memory until the "crash"
        link = FakeLink()
        pump = await idle_pump(c2d, link)
        sent = await c2d.send("dev1", b"durable", message_id="keep", ack="full", actor=ACTOR)
        assert sent.lock_token is not None
        await link.wait_for(1)
        link.acks[0].set_result(True)  # acknowledged by the device, completion still pending
        await pump.stop()  # nothing in flight: writes nothing
    finally:
        await first.close()  # the writer is never flushed: its pending completion is lost

    second = SqlStorage(db_url)
    await second.start()
    survivor = C2DService(second.db)
    try:
        [row] = await survivor.repo.peek("dev1")
        assert (row.message_id, row.body, row.delivery_count) == ("keep", b"durable", 1)
        assert row.lock_token == sent.lock_token
        await asyncio.sleep(0.35)  # the dead hub's lock expires
        got = await survivor.receive("dev1")
        assert got is not None and got.message_id == "keep" and got.delivery_count == 2
        assert got.ack == "full" and got.body == b"durable"
    finally:
        await survivor.close()
        await second.close()
