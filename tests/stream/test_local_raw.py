"""The embedded log's fast paths: pre-encoded system properties are stored as given, `read_raw` hands
out the stored JSON of exactly the events `read` returns, `append_nowait` queues at once, and the
device → partition cache always agrees with `partition_for_device`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tether.errors import BadRequest
from tether.messaging.events import StreamError, partition_for_device
from tether.messaging.telemetry import build_properties
from tether.security.principal import CredentialKind, Principal, PrincipalKind
from tether.storage.stream import local
from tether.storage.stream.base import EncodedProperties
from tether.storage.stream.local import LocalEventStream

LOG_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # the log's property encoding


def principal(device: str, module: str | None = None) -> Principal:
    return Principal(PrincipalKind.module if module else PrincipalKind.device, CredentialKind.device_key,
                     device, module)


async def test_encoded_system_properties_are_stored_and_read_back(tmp_path: Path) -> None:
    s = LocalEventStream(tmp_path, 2, 24.0, 1 << 30)
    await s.start()
    try:
        bag = {"$.mid": "é\"\\\x01\u2028", "$.ct": "text/plain"}
        app, system = build_properties(principal("dév", "m"), bag, {"k": "ü"}, now=1_700_000_000.001)
        assert isinstance(system, EncodedProperties)
        sent = await s.append("dév", b"x", module_id="m", properties=app, system_properties=system)
        assert type(sent.system_properties) is dict and sent.system_properties == system
        [event] = await s.read(sent.partition)
        [raw] = await s.read_raw(sent.partition)
        assert event.system_properties == system and event.properties == app
        assert raw.system_json == system.encoded == LOG_JSON.encode(dict(system)).encode()
        assert raw.properties_json == LOG_JSON.encode(app).encode()
        assert (raw.offset, raw.sequence_number, raw.enqueued_time_ms, raw.module_id) == (
            event.offset, event.sequence_number, event.enqueued_time_ms, "m")
    finally:
        await s.close()


async def test_read_raw_matches_read_across_segments(tmp_path: Path) -> None:
    s = LocalEventStream(tmp_path, 1, 24.0, 1 << 30, segment_bytes=64 << 10)
    await s.start()
    try:
        for i in range(300):
            await s.append(f"d{i % 3}", bytes([i % 256]) * 500, properties={"i": str(i)} if i % 2 else {},
                           system_properties={"n": str(i)})
        assert len(list((tmp_path / "p0").glob("*.seg"))) > 1
        for start, count in ((0, 1000), (1, 7), (150, 100), (299, 5), (300, 5)):
            events = await s.read(0, from_sequence=start, max_count=count)
            raws = await s.read_raw(0, from_sequence=start, max_count=count)
            assert [(r.sequence_number, r.offset, r.device_id, r.body) for r in raws] == [
                (e.sequence_number, e.offset, e.device_id, e.body) for e in events]
            for r, e in zip(raws, events, strict=True):
                assert json.loads(r.system_json or b"{}") == e.system_properties
                assert json.loads(r.properties_json or b"{}") == e.properties
        assert await s.read_raw(0, from_sequence=300, timeout_s=0.05) == []
    finally:
        await s.close()


async def test_append_nowait_queues_now_and_refuses_at_once(tmp_path: Path) -> None:
    s = LocalEventStream(tmp_path, 1, 24.0, 1 << 30)
    await s.start()
    futures = [s.append_nowait("d", b"%d" % i, properties={}, system_properties={}) for i in range(5)]
    assert [(await f).sequence_number for f in futures] == [0, 1, 2, 3, 4]
    with pytest.raises(BadRequest):
        s.append_nowait("x" * 70_000, b"", properties={}, system_properties={})
    await s.close()
    with pytest.raises(StreamError):
        s.append_nowait("d", b"", properties={}, system_properties={})


async def test_appends_joined_on_one_turn_share_one_future_resolved_when_all_are_durable(
    tmp_path: Path,
) -> None:
    s = LocalEventStream(tmp_path, 1, 24.0, 1 << 30)
    await s.start()
    try:
        first = s.append_nowait("d", b"0", properties={}, system_properties={})
        group = [first] + [s.append_nowait("d", b"%d" % i, properties={}, system_properties={}, join=first)
                           for i in range(1, 4)]
        assert all(f is first for f in group)
        last = await first
        assert last.sequence_number == 3 and last.body == b"3"  # resolves with the group's last event
        events = await s.read(0, from_sequence=0, max_count=10)
        assert [e.body for e in events] == [b"0", b"1", b"2", b"3"]  # all durable, in order
        late = s.append_nowait("d", b"4", properties={}, system_properties={}, join=first)
        assert late is not first  # the group was committed: a new one starts
        other = s.append_nowait("e", b"5", properties={}, system_properties={})
        after_other = s.append_nowait("d", b"6", properties={}, system_properties={}, join=late)
        assert after_other is not late  # only the newest queued entry can be joined
        assert [(await f).body for f in (late, other, after_other)] == [b"4", b"5", b"6"]
    finally:
        await s.close()


async def test_partition_cache_agrees_with_the_mapping(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "PARTITION_CACHE", 16)  # force the cache to fill and start over
    s = LocalEventStream(tmp_path, 7, 24.0, 1 << 30)
    for _ in range(2):
        for n in range(100):
            assert s.partition_for(f"dev-{n}") == partition_for_device(f"dev-{n}", 7)
    assert len(s._partition_of) <= 16
