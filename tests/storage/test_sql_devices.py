"""SqlDeviceRepository on real SQLite and PostgreSQL: etag compare-and-set, all-or-nothing bulk insert,
keyset paging, activity batches that keep the etag, durability across reopen."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from tether.errors import Conflict, NotFound, PreconditionFailed
from tether.registry.models import EPOCH, ConnectionState, Device, DeviceStatus
from tether.storage.base import ActivityUpdate
from tether.storage.sql import SqlStorage


def dev(device_id: str, etag: str = "e1", **extra: object) -> Device:
    return Device.model_validate({"deviceId": device_id, "etag": etag, **extra})


async def test_insert_and_get_round_trips_the_document(storage: SqlStorage) -> None:
    device = dev(
        "dev-1",
        status="disabled",
        statusReason="maintenance",
        authentication={"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "AB" * 20}},
        capabilities={"iotEdge": True},
    )
    await storage.devices.insert(device)
    loaded = await storage.devices.get("dev-1")
    assert loaded == device


async def test_get_unknown_is_none(storage: SqlStorage) -> None:
    assert await storage.devices.get("nope") is None


async def test_insert_existing_is_conflict_naming_the_id(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("dup"))
    with pytest.raises(Conflict) as info:
        await storage.devices.insert(dev("dup"))
    assert "dup" in info.value.message
    assert info.value.code == "DeviceAlreadyExists"


async def test_device_ids_are_case_sensitive(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("Sensor", etag="upper"))
    await storage.devices.insert(dev("sensor", etag="lower"))
    upper, lower = await storage.devices.get("Sensor"), await storage.devices.get("sensor")
    assert upper is not None and lower is not None
    assert (upper.etag, lower.etag) == ("upper", "lower")
    assert await storage.devices.get("SENSOR") is None


async def test_replace_with_matching_etag_writes(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("d"))
    await storage.devices.replace(dev("d", etag="e2", statusReason="x"), "e1")
    loaded = await storage.devices.get("d")
    assert loaded is not None and (loaded.etag, loaded.status_reason) == ("e2", "x")


async def test_replace_with_stale_etag_is_412_and_writes_nothing(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("d"))
    with pytest.raises(PreconditionFailed):
        await storage.devices.replace(dev("d", etag="e3", statusReason="x"), "stale")
    loaded = await storage.devices.get("d")
    assert loaded is not None and loaded.etag == "e1" and loaded.status_reason is None


async def test_replace_unknown_is_404_with_or_without_etag(storage: SqlStorage) -> None:
    with pytest.raises(NotFound):
        await storage.devices.replace(dev("ghost"), "e1")
    with pytest.raises(NotFound):
        await storage.devices.replace(dev("ghost"), None)


async def test_replace_without_etag_is_unconditional(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("d"))
    await storage.devices.replace(dev("d", etag="e9"), None)
    loaded = await storage.devices.get("d")
    assert loaded is not None and loaded.etag == "e9"


async def test_delete_compares_etag(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("d"))
    with pytest.raises(PreconditionFailed):
        await storage.devices.delete("d", "stale")
    assert await storage.devices.get("d") is not None
    await storage.devices.delete("d", "e1")
    assert await storage.devices.get("d") is None
    with pytest.raises(NotFound):
        await storage.devices.delete("d", None)


async def test_concurrent_replace_with_same_etag_has_exactly_one_winner(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("race"))
    results = await asyncio.gather(
        *(storage.devices.replace(dev("race", etag=f"w{i}"), "e1") for i in range(6)),
        return_exceptions=True,
    )
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert all(isinstance(r, PreconditionFailed) for r in results if r is not None)
    loaded = await storage.devices.get("race")
    assert loaded is not None and loaded.etag == f"w{winners[0]}"


async def test_insert_many_writes_all(storage: SqlStorage) -> None:
    await storage.devices.insert_many([dev(f"bulk-{i:04d}") for i in range(1200)])
    stats = await storage.devices.statistics()
    assert stats.total_device_count == 1200


async def test_insert_many_with_existing_id_writes_nothing(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("bulk-0700"))
    batch = [dev(f"bulk-{i:04d}") for i in range(1200)]
    with pytest.raises(Conflict) as info:
        await storage.devices.insert_many(batch)
    assert "bulk-0700" in info.value.message
    assert (await storage.devices.statistics()).total_device_count == 1


async def test_insert_many_with_duplicate_in_batch_writes_nothing(storage: SqlStorage) -> None:
    with pytest.raises(Conflict) as info:
        await storage.devices.insert_many([dev("a"), dev("b"), dev("a")])
    assert "a" in info.value.message
    assert await storage.devices.list(top=10) == []


async def test_list_pages_by_id_in_byte_order(storage: SqlStorage) -> None:
    ids = ["b", "A", "a", "B", "a-1", "Z9", "_x"]
    await storage.devices.insert_many([dev(i) for i in ids])
    pages: list[list[str]] = []
    after: str | None = None
    while True:
        page = await storage.devices.list(top=3, after=after)
        if not page:
            break
        pages.append([d.device_id for d in page])
        after = page[-1].device_id
    assert [i for p in pages for i in p] == sorted(ids)
    assert all(len(p) <= 3 for p in pages)


async def test_iter_all_yields_every_device_once(storage: SqlStorage) -> None:
    await storage.devices.insert_many([dev(f"it-{i:04d}") for i in range(1101)])
    seen = [d.device_id async for d in storage.devices.iter_all()]
    assert seen == sorted(f"it-{i:04d}" for i in range(1101))


async def test_statistics_counts_by_status(storage: SqlStorage) -> None:
    await storage.devices.insert_many(
        [dev("e1x"), dev("e2x"), dev("d1x", status="disabled"), dev("e3x", status=DeviceStatus.enabled)]
    )
    stats = await storage.devices.statistics()
    assert (stats.total_device_count, stats.enabled_device_count, stats.disabled_device_count) == (4, 3, 1)


async def test_apply_activity_updates_state_without_touching_etag(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("act"))
    t1 = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    await storage.devices.apply_activity([ActivityUpdate("act", ConnectionState.connected, t1)])
    loaded = await storage.devices.get("act")
    assert loaded is not None
    assert loaded.etag == "e1"
    assert loaded.connection_state is ConnectionState.connected
    assert loaded.connection_state_updated_time == t1
    assert loaded.last_activity_time == t1

    # Activity only, then the same state again: the state's timestamp does not move.
    t2, t3 = t1 + timedelta(seconds=5), t1 + timedelta(seconds=9)
    await storage.devices.apply_activity([ActivityUpdate("act", None, t2)])
    await storage.devices.apply_activity([ActivityUpdate("act", ConnectionState.connected, t3)])
    loaded = await storage.devices.get("act")
    assert loaded is not None
    assert loaded.connection_state_updated_time == t1 and loaded.last_activity_time == t3

    t4 = t3 + timedelta(seconds=1)
    await storage.devices.apply_activity(
        [ActivityUpdate("act", ConnectionState.disconnected, t4), ActivityUpdate("unknown-id", None, t4)]
    )
    loaded = await storage.devices.get("act")
    assert loaded is not None and loaded.etag == "e1"
    assert loaded.connection_state is ConnectionState.disconnected
    assert loaded.connection_state_updated_time == t4


async def test_replace_keeps_activity_columns(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("keep"))
    t1 = datetime(2030, 1, 1, tzinfo=UTC)
    await storage.devices.apply_activity([ActivityUpdate("keep", ConnectionState.connected, t1)])
    # A registry update racing with the activity batch must not reset connection state.
    await storage.devices.replace(dev("keep", etag="e2"), "e1")
    loaded = await storage.devices.get("keep")
    assert loaded is not None
    assert loaded.connection_state is ConnectionState.connected and loaded.last_activity_time == t1


async def test_new_device_has_never_timestamps(storage: SqlStorage) -> None:
    await storage.devices.insert(dev("fresh"))
    loaded = await storage.devices.get("fresh")
    assert loaded is not None
    assert loaded.last_activity_time == EPOCH and loaded.connection_state_updated_time == EPOCH


async def test_devices_survive_reopen(storage: SqlStorage, db_url: str) -> None:
    await storage.devices.insert(dev("durable", statusReason="kept"))
    await storage.close()
    reopened = SqlStorage(db_url)
    await reopened.start()
    try:
        loaded = await reopened.devices.get("durable")
        assert loaded is not None and loaded.status_reason == "kept"
    finally:
        await reopened.close()


async def test_an_older_connection_state_does_not_overwrite_a_newer_one(storage: SqlStorage) -> None:
    """Two gateways flush activity independently: a late flush of an older state is ignored."""
    from datetime import timedelta

    from tether.registry.models import ConnectionState, Device, utcnow
    from tether.storage.base import ActivityUpdate

    await storage.devices.insert(Device.model_validate({"deviceId": "mover", "etag": "e1"}))
    now = utcnow()
    await storage.devices.apply_activity([ActivityUpdate("mover", ConnectionState.connected, now)])
    stale = now - timedelta(seconds=3)
    await storage.devices.apply_activity([ActivityUpdate("mover", ConnectionState.disconnected, stale)])
    device = await storage.devices.get("mover")
    assert device is not None and device.connection_state is ConnectionState.connected
    later = now + timedelta(seconds=1)
    await storage.devices.apply_activity([ActivityUpdate("mover", ConnectionState.disconnected, later)])
    device = await storage.devices.get("mover")
    assert device is not None and device.connection_state is ConnectionState.disconnected
