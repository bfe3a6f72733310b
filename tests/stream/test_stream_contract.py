"""Behaviour every EventStream backend shares (each test runs on the embedded log and on JetStream)."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import defaultdict

import pytest

from tether.errors import BadRequest, Conflict, NotFound
from tether.messaging.events import EventData, EventStream, StreamError, partition_for_device, subscribe

from .conftest import PARTITIONS, Backend

NO_PROPS: dict[str, str] = {}


def device_on(stream: EventStream, partition: int, prefix: str = "dev") -> str:
    """A device id that hashes to the wanted partition."""
    for i in range(10_000):
        name = f"{prefix}-{i}"
        if stream.partition_for(name) == partition:
            return name
    raise AssertionError("no device id found")


async def test_both_backends_satisfy_the_protocol(stream: EventStream) -> None:
    assert isinstance(stream, EventStream)
    assert stream.partition_count == PARTITIONS


async def test_partition_for_is_a_stable_crc32_of_the_device_id(stream: EventStream) -> None:
    assert stream.partition_for("dev1") == zlib.crc32(b"dev1") % PARTITIONS
    assert stream.partition_for("dev1") == partition_for_device("dev1", PARTITIONS)


async def test_append_returns_increasing_sequence_per_partition(stream: EventStream) -> None:
    seen: dict[int, list[EventData]] = defaultdict(list)
    for i in range(24):
        device = f"device-{i % 6}"
        ev = await stream.append(device, b"x%d" % i, properties=NO_PROPS, system_properties=NO_PROPS)
        assert ev.partition == stream.partition_for(f"device-{i % 6}")
        seen[ev.partition].append(ev)
    for events in seen.values():
        assert [e.sequence_number for e in events] == list(range(len(events)))
        offsets = [e.offset for e in events]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


async def test_properties_and_body_round_trip_exactly(stream: EventStream) -> None:
    body = bytes(range(256)) * 3 + b"\x00\r\n"
    props = {"température": "21,5 °C ✓", "zone": "a/b&c=d", "empty": "", "quote": 'say "hi"\nnext line'}
    sys_props = {"message-id": "msg-1", "correlation-id": "c-ü", "content-type": "application/json",
                 "content-encoding": "utf-8"}
    sent = await stream.append("dev-ü-1", body, module_id="mod.1", properties=props,
                               system_properties=sys_props)
    empty = await stream.append("dev-ü-1", b"", properties=NO_PROPS, system_properties=NO_PROPS)
    got = await stream.read(sent.partition, from_sequence=sent.sequence_number, max_count=10)
    assert got == [sent, empty]
    assert got[0].body == body and got[0].properties == props and got[0].system_properties == sys_props
    assert got[0].module_id == "mod.1" and got[1].module_id is None and got[1].body == b""


async def test_per_device_order_is_preserved_under_concurrency(stream: EventStream) -> None:
    devices = [f"ordered-{d}" for d in range(8)]

    async def send(device: str) -> None:
        for i in range(25):
            await stream.append(device, f"{device}:{i}".encode(), properties={"i": str(i)},
                                system_properties=NO_PROPS)

    # Pipelined too: appends issued without awaiting keep their issue order.
    pipelined = [stream.append("piped", b"%d" % i, properties=NO_PROPS, system_properties=NO_PROPS)
                 for i in range(30)]
    await asyncio.gather(*(send(d) for d in devices), *pipelined)
    per_device: dict[str, list[int]] = defaultdict(list)
    for p in range(PARTITIONS):
        for ev in await stream.read(p, max_count=1000):
            per_device[ev.device_id].append(int(ev.body.split(b":")[-1]))
    for d in devices:
        assert per_device[d] == list(range(25))
    assert per_device["piped"] == list(range(30))


async def test_read_from_a_sequence_returns_that_event_and_later_ones(stream: EventStream) -> None:
    dev = device_on(stream, 1)
    for i in range(10):
        await stream.append(dev, b"%d" % i, properties=NO_PROPS, system_properties=NO_PROPS)
    got = await stream.read(1, from_sequence=4, max_count=3)
    assert [e.sequence_number for e in got] == [4, 5, 6]
    assert [e.body for e in got] == [b"4", b"5", b"6"]
    rest = await stream.read(1, from_sequence=7, max_count=100)
    assert [e.sequence_number for e in rest] == [7, 8, 9]
    assert await stream.read(1, from_sequence=10) == []
    assert await stream.read(2) == []


async def test_long_poll_wakes_on_append(stream: EventStream) -> None:
    dev = device_on(stream, 0)
    await stream.append(dev, b"first", properties=NO_PROPS, system_properties=NO_PROPS)
    reader = asyncio.create_task(stream.read(0, from_sequence=1, max_count=10, timeout_s=10.0))
    await asyncio.sleep(0.2)
    assert not reader.done()
    started = time.monotonic()
    appended = await stream.append(dev, b"second", properties=NO_PROPS, system_properties=NO_PROPS)
    got = await asyncio.wait_for(reader, 5)
    assert time.monotonic() - started < 2.0
    assert got == [appended]


async def test_long_poll_times_out_with_an_empty_list(stream: EventStream) -> None:
    started = time.monotonic()
    assert await stream.read(3, from_sequence=0, timeout_s=0.3) == []
    assert 0.25 <= time.monotonic() - started < 3.0


async def test_sequential_reads_continue_where_the_last_one_stopped(stream: EventStream) -> None:
    dev = device_on(stream, 2)
    for i in range(50):
        await stream.append(dev, b"%d" % i, properties=NO_PROPS, system_properties=NO_PROPS)
    seqs: list[int] = []
    next_seq = 0
    while len(seqs) < 50:
        batch = await stream.read(2, from_sequence=next_seq, max_count=7, timeout_s=1.0)
        assert batch
        seqs += [e.sequence_number for e in batch]
        next_seq = batch[-1].sequence_number + 1
    assert seqs == list(range(50))


async def test_subscribe_yields_existing_then_new_events(stream: EventStream) -> None:
    dev = device_on(stream, 3)
    await stream.append(dev, b"a", properties=NO_PROPS, system_properties=NO_PROPS)
    it = subscribe(stream, 3, 0, poll_s=5.0)
    assert (await anext(it)).body == b"a"
    nxt = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.1)
    await stream.append(dev, b"b", properties=NO_PROPS, system_properties=NO_PROPS)
    assert (await asyncio.wait_for(nxt, 5)).body == b"b"
    await it.aclose()


async def test_bad_partition_and_count_are_rejected(stream: EventStream) -> None:
    with pytest.raises(BadRequest):
        await stream.read(PARTITIONS)
    with pytest.raises(BadRequest):
        await stream.read(0, max_count=0)
    with pytest.raises(BadRequest):
        await stream.checkpoint("$Default", -1, 0)


async def test_consumer_groups_create_list_delete(stream: EventStream) -> None:
    assert await stream.consumer_groups() == ["$Default"]
    await stream.create_consumer_group("analytics")
    await stream.create_consumer_group("alerts.v2")
    assert await stream.consumer_groups() == ["$Default", "alerts.v2", "analytics"]
    with pytest.raises(Conflict):
        await stream.create_consumer_group("analytics")
    with pytest.raises(Conflict):
        await stream.create_consumer_group("$Default")
    with pytest.raises(BadRequest):
        await stream.create_consumer_group("bad name!")
    with pytest.raises(BadRequest):
        await stream.delete_consumer_group("$Default")
    await stream.checkpoint("analytics", 0, 5)
    await stream.delete_consumer_group("analytics")
    assert await stream.consumer_groups() == ["$Default", "alerts.v2"]
    with pytest.raises(NotFound):
        await stream.delete_consumer_group("analytics")
    with pytest.raises(NotFound):
        await stream.get_checkpoint("analytics", 0)
    await stream.create_consumer_group("analytics")
    assert await stream.get_checkpoint("analytics", 0) is None  # old checkpoints went with the group


async def test_checkpoints_survive_close_and_reopen(backend: Backend) -> None:
    first = backend.make()
    await first.start()
    await first.create_consumer_group("billing")
    await first.checkpoint("$Default", 0, 41)
    await first.checkpoint("$Default", 0, 42)
    await first.checkpoint("billing", 3, 7)
    assert await first.get_checkpoint("$Default", 1) is None
    await first.close()
    second = backend.make()
    await second.start()
    try:
        assert await second.consumer_groups() == ["$Default", "billing"]
        assert await second.get_checkpoint("$Default", 0) == 42
        assert await second.get_checkpoint("billing", 3) == 7
        assert await second.get_checkpoint("billing", 0) is None
        with pytest.raises(NotFound):
            await second.checkpoint("nope", 0, 1)
    finally:
        await second.close()


async def test_events_survive_close_and_reopen(backend: Backend) -> None:
    first = backend.make()
    await first.start()
    dev = device_on(first, 1)
    sent = [await first.append(dev, b"%d" % i, properties={"k": "v"}, system_properties=NO_PROPS)
            for i in range(5)]
    await first.close()
    second = backend.make()
    await second.start()
    try:
        assert await second.read(1, max_count=10) == sent
        more = await second.append(dev, b"5", properties=NO_PROPS, system_properties=NO_PROPS)
        assert more.sequence_number == 5 and more.offset > sent[-1].offset
    finally:
        await second.close()


async def test_find_sequence_at(stream: EventStream) -> None:
    dev = device_on(stream, 2)
    events = []
    for i in range(6):
        events.append(await stream.append(dev, b"%d" % i, properties=NO_PROPS, system_properties=NO_PROPS))
        await asyncio.sleep(0.03)
    assert await stream.find_sequence_at(2, 0) == 0
    for ev in events:
        assert await stream.find_sequence_at(2, ev.enqueued_time_ms) == ev.sequence_number
    assert await stream.find_sequence_at(2, events[3].enqueued_time_ms - 10) == 3
    assert await stream.find_sequence_at(2, events[-1].enqueued_time_ms + 60_000) == 6
    assert await stream.find_sequence_at(0, int(time.time() * 1000)) == 0  # empty partition


async def test_closed_stream_refuses_appends(backend: Backend) -> None:
    s = backend.make()
    await s.start()
    await s.close()
    with pytest.raises(Exception) as info:
        await s.append("dev", b"x", properties=NO_PROPS, system_properties=NO_PROPS)
    assert "closed" in str(info.value)


async def test_close_ends_long_polls_and_subscriptions(backend: Backend) -> None:
    s = backend.make()
    await s.start()
    waiting = asyncio.ensure_future(s.read(1, timeout_s=30.0))
    it = subscribe(s, 2, 0, poll_s=30.0)
    following = asyncio.ensure_future(anext(it, None))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await s.close()
    with pytest.raises(StreamError):
        await asyncio.wait_for(waiting, 10)
    assert await asyncio.wait_for(following, 10) is None
    assert time.monotonic() - started < 5
