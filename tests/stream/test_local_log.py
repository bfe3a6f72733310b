"""The embedded segment log: crash recovery, group commit, segments, retention, files on disk."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tether
from tether.errors import BadRequest
from tether.messaging.events import EventData, StreamError, open_stream
from tether.storage.stream.jetstream import JetStreamEventStream
from tether.storage.stream.local import LocalEventStream
from tether.storage.stream.segment import HEADER_SIZE

NO_PROPS: dict[str, str] = {}
CHILD = Path(__file__).with_name("child_appender.py")


def one_partition(directory: Path, **kw: object) -> LocalEventStream:
    return LocalEventStream(directory, 1, 24.0, 1 << 30, **kw)  # type: ignore[arg-type]


async def fill(stream: LocalEventStream, n: int, size: int = 100, device: str = "dev") -> list[EventData]:
    return [await stream.append(device, bytes([i % 256]) * size, properties={"i": str(i)},
                                system_properties=NO_PROPS) for i in range(n)]


def segments(directory: Path, partition: int = 0) -> list[Path]:
    return sorted((directory / f"p{partition}").glob("*.seg"))


async def test_offsets_are_byte_positions_in_the_partition(tmp_path: Path) -> None:
    s = one_partition(tmp_path)
    await s.start()
    events = await fill(s, 5)
    await s.close()
    assert events[0].offset == HEADER_SIZE
    size = segments(tmp_path)[0].stat().st_size
    steps = {b.offset - a.offset for a, b in itertools.pairwise(events)}
    assert len(steps) == 1 and events[-1].offset + steps.pop() == size


@pytest.mark.parametrize("damage", ["garbage", "cut_mid_record", "zero_fill", "flipped_byte"])
async def test_torn_tail_is_dropped_and_appends_continue(tmp_path: Path, damage: str) -> None:
    s = one_partition(tmp_path)
    await s.start()
    events = await fill(s, 20)
    await s.close()
    seg = segments(tmp_path)[-1]
    data = seg.read_bytes()
    keep = 20
    if damage == "garbage":
        seg.write_bytes(data + os.urandom(37))
    elif damage == "cut_mid_record":
        seg.write_bytes(data[: events[-1].offset + 30])
        keep = 19
    elif damage == "zero_fill":
        seg.write_bytes(data + bytes(4096))
    else:
        mutable = bytearray(data)
        mutable[events[-1].offset + 40] ^= 0xFF
        seg.write_bytes(bytes(mutable))
        keep = 19
    s = one_partition(tmp_path)
    await s.start()
    try:
        assert s.stats.recovered_truncated_bytes > 0
        got = await s.read(0, max_count=100)
        assert got == events[:keep]
        nxt = await s.append("dev", b"after", properties=NO_PROPS, system_properties=NO_PROPS)
        assert nxt.sequence_number == keep
        assert (await s.read(0, from_sequence=keep))[0] == nxt
    finally:
        await s.close()


async def test_torn_new_segment_from_a_crash_while_rolling_is_removed(tmp_path: Path) -> None:
    s = one_partition(tmp_path)
    await s.start()
    events = await fill(s, 3)
    await s.close()
    (tmp_path / "p0" / f"{3:020d}.seg").write_bytes(b"TTHRSEG1\x03")  # header never completed
    s = one_partition(tmp_path)
    await s.start()
    try:
        assert len(segments(tmp_path)) == 1
        assert await s.read(0) == events
        assert (await fill(s, 1))[0].sequence_number == 3
    finally:
        await s.close()


async def test_kill_9_during_appends_loses_no_acknowledged_event(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(tether.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path / "s"), "16"], stdout=subprocess.PIPE,
                             env=env)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == b"ready"
    seen = b""
    deadline = time.monotonic() + 60
    while seen.count(b"\n") < 1500 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        seen += line
    os.kill(child.pid, signal.SIGKILL)  # mid-run: appends are in flight
    seen += child.stdout.read()  # what it printed before dying is still in the pipe
    child.wait()
    printed = seen.decode(errors="replace").split("\n")[:-1]  # a torn last line is dropped
    acked = [line.split() for line in printed]
    assert len(acked) >= 1500
    s = LocalEventStream(tmp_path / "s", 4, 24.0, 1 << 30, segment_bytes=256 << 10)
    await s.start()
    try:
        stored: dict[tuple[int, int], EventData] = {}
        for p in range(4):
            seq = 0
            while batch := await s.read(p, from_sequence=seq, max_count=1000):
                stored.update({(e.partition, e.sequence_number): e for e in batch})
                seq = batch[-1].sequence_number + 1
        for part, seq_s, device, i in acked:
            ev = stored[(int(part), int(seq_s))]
            assert ev.device_id == device and ev.properties == {"i": i}
        # Sequences are dense: nothing acknowledged is missing and nothing unacknowledged left holes.
        for p in range(4):
            seqs = sorted(q for (pp, q) in stored if pp == p)
            assert seqs == list(range(len(seqs)))
    finally:
        await s.close()


async def test_group_commit_batches_concurrent_appends(tmp_path: Path) -> None:
    s = LocalEventStream(tmp_path, 4, 24.0, 1 << 30)
    await s.start()
    try:
        results = await asyncio.gather(*(s.append(f"d{i}", b"x" * 256, properties=NO_PROPS,
                                                  system_properties=NO_PROPS) for i in range(200)))
        assert len(results) == 200
        assert s.stats.appends == 200
        assert s.stats.batches < s.stats.appends
        assert s.stats.max_batch_size > 1
        assert s.stats.fsyncs == s.stats.batches and s.stats.fsync_seconds_sum > 0
        assert s.stats.fsync_seconds_buckets[float("inf")] == s.stats.fsyncs
    finally:
        await s.close()


async def test_segments_roll_and_reads_cross_them_after_reopen(tmp_path: Path) -> None:
    s = one_partition(tmp_path, segment_bytes=4096)
    await s.start()
    events = await fill(s, 200)
    await s.close()
    segs = segments(tmp_path)
    assert len(segs) > 5
    assert int(segs[0].stem) == 0
    s = one_partition(tmp_path, segment_bytes=4096)
    await s.start()
    try:
        assert await s.read(0, max_count=500) == events
        # Seeking into the middle of a sealed segment uses its (lazily built) sparse index.
        assert await s.read(0, from_sequence=77, max_count=3) == events[77:80]
        assert await s.find_sequence_at(0, events[150].enqueued_time_ms) <= 150
        more = await fill(s, 1)
        assert more[0].sequence_number == 200 and more[0].offset > events[-1].offset
    finally:
        await s.close()


async def test_retention_by_size_deletes_oldest_segments(tmp_path: Path) -> None:
    s = LocalEventStream(tmp_path, 1, 24.0, 16 << 10, segment_bytes=4096)
    await s.start()
    try:
        await fill(s, 300, size=200)
        before = len(segments(tmp_path))
        deleted = await s.apply_retention()
        after = segments(tmp_path)
        assert deleted > 0 and len(after) == before - deleted
        assert sum(p.stat().st_size for p in after) <= (16 << 10) + 4096
        got = await s.read(0, from_sequence=0, max_count=1)
        assert got[0].sequence_number == int(after[0].stem) > 0  # expired sequences: start at the earliest
        assert (await fill(s, 1))[0].sequence_number == 300
    finally:
        await s.close()


async def test_retention_by_age_deletes_old_sealed_segments_but_never_the_active_one(tmp_path: Path) -> None:
    clock = [1_000_000.0]
    s = LocalEventStream(tmp_path, 1, 1.0, 1 << 30, segment_bytes=4096, now=lambda: clock[0])
    await s.start()
    try:
        old = await fill(s, 60)
        count = len(segments(tmp_path))
        assert count >= 3
        clock[0] += 1800  # half the retention: nothing is old enough
        assert await s.apply_retention() == 0
        clock[0] += 2 * 3600
        assert await s.apply_retention() == count - 1
        assert len(segments(tmp_path)) == 1
        kept = await s.read(0, max_count=1000)
        assert kept == old[-len(kept) :] and kept[0].sequence_number > 0
        new = await fill(s, 5)
        clock[0] += 10 * 3600
        await s.apply_retention()
        assert len(segments(tmp_path)) >= 1
        assert (await s.read(0, max_count=1000))[-5:] == new
    finally:
        await s.close()


async def test_find_sequence_at_uses_segment_times_and_the_index(tmp_path: Path) -> None:
    clock = [2_000_000.0]
    s = one_partition(tmp_path, segment_bytes=4096, now=lambda: clock[0])
    await s.start()
    try:
        events = []
        for _ in range(100):
            events += await fill(s, 1)
            clock[0] += 0.5
        for ev in events[::7]:
            assert await s.find_sequence_at(0, ev.enqueued_time_ms) == ev.sequence_number
            assert await s.find_sequence_at(0, ev.enqueued_time_ms - 250) == ev.sequence_number
        assert await s.find_sequence_at(0, events[-1].enqueued_time_ms + 1) == 100
    finally:
        await s.close()


async def test_enqueued_time_never_goes_backwards(tmp_path: Path) -> None:
    clock = [3_000_000.0]
    s = one_partition(tmp_path, now=lambda: clock[0])
    await s.start()
    try:
        a = (await fill(s, 1))[0]
        clock[0] -= 60  # wall clock stepped back
        b = (await fill(s, 1))[0]
        assert b.enqueued_time_ms == a.enqueued_time_ms
    finally:
        await s.close()


async def test_a_second_process_cannot_open_the_same_directory(tmp_path: Path) -> None:
    s = one_partition(tmp_path)
    await s.start()
    try:
        with pytest.raises(StreamError, match="another process"):
            await one_partition(tmp_path).start()
    finally:
        await s.close()


async def test_changing_the_partition_count_is_refused(tmp_path: Path) -> None:
    s = LocalEventStream(tmp_path, 2, 24.0, 1 << 30)
    await s.start()
    await s.close()
    with pytest.raises(StreamError, match="partitions"):
        await LocalEventStream(tmp_path, 3, 24.0, 1 << 30).start()


async def test_oversized_device_id_is_a_bad_request(tmp_path: Path) -> None:
    s = one_partition(tmp_path)
    await s.start()
    try:
        with pytest.raises(BadRequest):
            await s.append("d" * 70_000, b"", properties=NO_PROPS, system_properties=NO_PROPS)
    finally:
        await s.close()


def test_open_stream_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    local = open_stream(f"file://{tmp_path}/s?segment_bytes=8192", partitions=2, retention_hours=1,
                        retention_bytes=1 << 20)
    assert isinstance(local, LocalEventStream) and local.segment_bytes == 8192
    assert local.directory == tmp_path / "s"
    js = open_stream("nats://127.0.0.1:4222?stream=X_EV&bucket=x_cp", partitions=3, retention_hours=1,
                     retention_bytes=1 << 20)
    assert isinstance(js, JetStreamEventStream)
    assert (js.url, js.stream_name, js.kv_bucket, js.partition_count) == ("nats://127.0.0.1:4222", "X_EV",
                                                                           "x_cp", 3)
    for bad in ("file://relative/path", "redis://x", "file:relative"):
        with pytest.raises(ValueError):
            open_stream(bad, partitions=1, retention_hours=1, retention_bytes=1 << 20)


def test_event_json_round_trips_text_and_binary_bodies() -> None:
    text = EventData(1, 40, 0, 123, "d", None, {"message-id": "m"}, {"é": "ü"}, "héllo".encode())
    binary = EventData(1, 90, 1, 124, "d", "m", {}, {}, b"\xff\x00\xfe")
    assert text.to_json()["body"] == "héllo" and text.to_json()["body_encoding"] == "utf-8"
    assert binary.to_json()["body_encoding"] == "base64"
    for ev in (text, binary):
        assert EventData.from_json(ev.to_json()) == ev
        assert EventData.from_json(ev.to_json(body_as_text=False)) == ev
    with pytest.raises(BadRequest):
        EventData.from_json({"body": 5})


async def test_large_events_are_returned_in_bounded_reads(tmp_path: Path) -> None:
    s = one_partition(tmp_path)
    await s.start()
    try:
        big = b"B" * (256 << 10)
        for _ in range(40):
            await s.append("dev", big, properties=NO_PROPS, system_properties=NO_PROPS)
        first = await s.read(0, max_count=100)
        assert 1 <= len(first) < 40 and all(e.body == big for e in first)
        rest = await s.read(0, from_sequence=len(first), max_count=100)
        assert rest[0].sequence_number == len(first)
    finally:
        await s.close()


async def test_a_follower_sees_every_event_in_order_while_segments_roll(tmp_path: Path) -> None:
    s = LocalEventStream(tmp_path, 1, 24.0, 1 << 30, segment_bytes=8192)
    await s.start()
    total = 600

    async def follow() -> list[int]:
        seqs: list[int] = []
        async for ev in s.subscribe(0, 0, batch=17, poll_s=5.0):
            seqs.append(ev.sequence_number)
            if len(seqs) == total:
                break
        return seqs

    async def write(n: int) -> None:
        for i in range(total // 6):
            await s.append(f"w{n}", b"%d" % i * 20, properties={"n": str(n)}, system_properties=NO_PROPS)

    try:
        follower = asyncio.create_task(follow())
        await asyncio.gather(*(write(n) for n in range(6)))
        assert await asyncio.wait_for(follower, 20) == list(range(total))
        assert s.stats.segments_rolled > 5
    finally:
        await s.close()
