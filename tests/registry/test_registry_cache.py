"""The read-through device cache of `RegistryService.find` on real SQLite and PostgreSQL: repeated
lookups do not touch the database, every write of the service is visible at once, writes of another
process (a second service on its own engine) after the TTL, unknown ids after the negative TTL, and a
read overlapping a write never puts the old version back. Database reads are counted with a
SQLAlchemy `before_cursor_execute` listener on the real engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy import event

from tether.registry.cache import DeviceCache
from tether.registry.models import ConnectionState, Device, DeviceStatus
from tether.registry.service import BulkOperation, RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.devices import SqlDeviceRepository
from tether.storage.sql.engine import Database

ACTOR = "policy:iothubowner"
TTL = 2.0


class FakeClock:
    """Monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class DeviceReads:
    """Counts SELECTs on the devices table executed by one engine."""

    def __init__(self, db: Database) -> None:
        self._engine = db.engine.sync_engine
        self.count = 0
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        text = statement.lower()
        if text.lstrip().startswith("select") and "from devices" in text:
            self.count += 1

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


@pytest.fixture
def reads(storage: SqlStorage) -> Iterator[DeviceReads]:
    counter = DeviceReads(storage.db)
    try:
        yield counter
    finally:
        counter.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cached(storage: SqlStorage, audit: AuditLog, clock: FakeClock) -> RegistryService:
    return RegistryService(storage.devices, audit, cache_ttl_s=TTL, clock=clock)


@pytest.fixture
async def other(db_url: str, storage: SqlStorage) -> AsyncIterator[RegistryService]:
    """A second registry on its own engine over the same database: another hub node or the CLI."""
    store = SqlStorage(db_url)
    await store.start()
    audit = AuditLog(store.audit)
    try:
        yield RegistryService(store.devices, audit)
    finally:
        await audit.close()
        await store.close()


async def must_find(registry: RegistryService, device_id: str) -> Device:
    found = await registry.find(device_id)
    assert found is not None, device_id
    return found


async def test_repeated_find_reads_the_database_once(cached: RegistryService, reads: DeviceReads) -> None:
    created = await cached.create("dev1", {}, actor=ACTOR)
    reads.count = 0
    for _ in range(50):
        found = await cached.find("dev1")
        assert found == created
    assert reads.count == 1


async def test_get_always_reads_the_database(
    cached: RegistryService, other: RegistryService, reads: DeviceReads
) -> None:
    await cached.create("dev1", {}, actor=ACTOR)
    assert await cached.find("dev1") is not None
    reads.count = 0
    await cached.get("dev1")
    await cached.get("dev1")
    assert reads.count == 2
    await other.set_status("dev1", False, actor=ACTOR)
    assert (await cached.get("dev1")).status is DeviceStatus.disabled  # REST reads are fresh
    assert (await must_find(cached, "dev1")).status is DeviceStatus.disabled  # ...and refreshed the cache


async def _warm(registry: RegistryService, *ids: str) -> None:
    for device_id in ids:
        await registry.find(device_id)


async def test_disable_and_enable_are_visible_at_once(cached: RegistryService, reads: DeviceReads) -> None:
    await cached.create("dev1", {}, actor=ACTOR)
    await _warm(cached, "dev1")
    await cached.set_status("dev1", False, reason="stolen", actor=ACTOR)
    found = await cached.find("dev1")
    assert found is not None and found.status is DeviceStatus.disabled and found.status_reason == "stolen"
    await cached.set_status("dev1", True, actor=ACTOR)
    found = await must_find(cached, "dev1")
    assert found.enabled


async def test_regenerated_key_is_visible_at_once(cached: RegistryService) -> None:
    before = await cached.create("dev1", {}, actor=ACTOR)
    await _warm(cached, "dev1")
    after = await cached.regenerate_key("dev1", "both", actor=ACTOR)
    found = await cached.find("dev1")
    assert found is not None and found.authentication == after.authentication
    assert found.authentication.symmetric_key.primary_key != before.authentication.symmetric_key.primary_key


async def test_replace_and_put_are_visible_at_once(cached: RegistryService) -> None:
    await cached.create("dev1", {}, actor=ACTOR)
    await _warm(cached, "dev1")
    await cached.replace("dev1", {"status": "disabled"}, if_match="*", actor=ACTOR)
    found = await must_find(cached, "dev1")
    assert not found.enabled
    await cached.put("dev1", {"status": "enabled", "statusReason": "back"}, if_match=found.etag, actor=ACTOR)
    found = await must_find(cached, "dev1")
    assert found.enabled
    assert found.status_reason == "back"


async def test_delete_is_visible_at_once_and_listeners_see_it_gone(cached: RegistryService) -> None:
    await cached.create("dev1", {}, actor=ACTOR)
    await _warm(cached, "dev1")
    seen: list[Device | None] = []

    async def listener(device: Device) -> None:
        seen.append(await cached.find(device.device_id))

    cached.add_status_listener(listener)
    await cached.delete("dev1", if_match=None, actor=ACTOR)
    assert await cached.find("dev1") is None
    assert seen == [None]  # the cache was dropped before the listeners ran


async def test_create_and_import_replace_a_cached_absence(cached: RegistryService) -> None:
    await _warm(cached, "new1", "new2")
    await cached.create("new1", {}, actor=ACTOR)
    assert await cached.find("new1") is not None
    assert await cached.import_devices([{"deviceId": "new2"}], actor=ACTOR) == 1
    assert await cached.find("new2") is not None


async def test_bulk_writes_are_visible_at_once(cached: RegistryService) -> None:
    await cached.create("upd", {}, actor=ACTOR)
    await cached.create("del", {}, actor=ACTOR)
    await _warm(cached, "upd", "del", "new")
    errors = await cached.bulk([
        BulkOperation("new", "create"),
        BulkOperation("upd", "update", {"status": "disabled"}),
        BulkOperation("del", "delete"),
    ], actor=ACTOR)
    assert errors == []
    assert await cached.find("new") is not None
    found = await must_find(cached, "upd")
    assert not found.enabled
    assert await cached.find("del") is None


async def test_write_by_another_process_is_seen_after_the_ttl(
    cached: RegistryService, other: RegistryService, clock: FakeClock
) -> None:
    device = await cached.create("dev1", {}, actor=ACTOR)
    await _warm(cached, "dev1")
    await other.set_status("dev1", False, actor=ACTOR)
    await other.regenerate_key("dev1", "primary", actor=ACTOR)
    clock.now += TTL - 0.01
    stale = await cached.find("dev1")  # the documented bound: up to cache_ttl_s late
    assert stale is not None and stale.enabled and stale.authentication == device.authentication
    clock.now += 0.02
    fresh = await cached.find("dev1")
    assert fresh is not None and not fresh.enabled
    assert fresh.authentication != device.authentication


async def test_disabled_devices_are_never_cached(
    cached: RegistryService, other: RegistryService, reads: DeviceReads
) -> None:
    """Other nodes relay disables but not enables: a device re-enabled elsewhere connects here at once."""
    await cached.create("dev1", {}, actor=ACTOR)
    await cached.set_status("dev1", False, actor=ACTOR)
    reads.count = 0
    for _ in range(3):
        assert not (await must_find(cached, "dev1")).enabled
    assert reads.count == 3
    await other.set_status("dev1", True, actor=ACTOR)
    assert (await must_find(cached, "dev1")).enabled
    reads.count = 0
    await _warm(cached, "dev1", "dev1")
    assert reads.count == 0  # enabled again: cached again


async def test_unknown_ids_are_cached_briefly(
    cached: RegistryService, other: RegistryService, clock: FakeClock, reads: DeviceReads
) -> None:
    reads.count = 0
    for _ in range(20):
        assert await cached.find("ghost") is None
    assert reads.count == 1  # a flood of connects for an unknown id costs one query per second
    await other.create("ghost", {}, actor=ACTOR)
    clock.now += 0.99
    assert await cached.find("ghost") is None
    clock.now += 0.02  # default negative TTL: 1 s
    assert await cached.find("ghost") is not None


async def test_malformed_ids_never_reach_the_database_or_the_cache(
    cached: RegistryService, reads: DeviceReads
) -> None:
    reads.count = 0
    for bad in ("", "a b", "x" * 200, "dev/1"):
        assert await cached.find(bad) is None
    assert reads.count == 0


async def test_status_changed_elsewhere_and_invalidate_drop_the_entry(
    cached: RegistryService, other: RegistryService
) -> None:
    await cached.create("dev1", {}, actor=ACTOR)
    await cached.create("dev2", {}, actor=ACTOR)
    await _warm(cached, "dev1", "dev2")
    disabled = await other.set_status("dev1", False, actor=ACTOR)
    await cached.status_changed_elsewhere(disabled)  # what the cluster bus calls
    found = await must_find(cached, "dev1")
    assert not found.enabled
    renewed = await other.regenerate_key("dev2", "both", actor=ACTOR)
    cached.invalidate("dev2")
    found = await must_find(cached, "dev2")
    assert found.authentication == renewed.authentication
    await other.set_status("dev2", False, actor=ACTOR)
    cached.invalidate()  # everything
    found = await must_find(cached, "dev2")
    assert not found.enabled


async def test_ttl_zero_disables_the_cache(storage: SqlStorage, audit: AuditLog, reads: DeviceReads) -> None:
    registry = RegistryService(storage.devices, audit, cache_ttl_s=0)
    await registry.create("dev1", {}, actor=ACTOR)
    reads.count = 0
    for _ in range(5):
        assert await registry.find("dev1") is not None
        assert await registry.find("ghost") is None
    assert reads.count == 10


async def test_the_cache_is_bounded_lru(storage: SqlStorage, audit: AuditLog, reads: DeviceReads) -> None:
    registry = RegistryService(storage.devices, audit, cache_size=2)
    for device_id in ("a", "b", "c"):
        await registry.create(device_id, {}, actor=ACTOR)
    await _warm(registry, "a", "b", "a", "c")  # "b" is the least recently used when "c" arrives
    reads.count = 0
    await _warm(registry, "a", "c")
    assert reads.count == 0
    await _warm(registry, "b")
    assert reads.count == 1


def test_unknown_ids_cannot_evict_devices() -> None:
    clock = FakeClock()
    cache = DeviceCache(ttl_s=TTL, clock=clock, max_entries=10, max_negative=3)
    device = Device.model_validate({"deviceId": "real"})
    cache.store("real", device, cache.token())
    for i in range(100):
        cache.store(f"ghost{i}", None, cache.token())
    assert cache.lookup("real") == (True, device)
    assert len(cache) == 4
    assert cache.lookup("ghost99") == (True, None) and cache.lookup("ghost0") == (False, None)


async def test_activity_stays_fresh_through_the_cache(cached: RegistryService, reads: DeviceReads) -> None:
    await cached.create("dev1", {}, actor=ACTOR)
    await _warm(cached, "dev1")
    await cached.touch("dev1", connected=True)
    found = await must_find(cached, "dev1")
    assert found.connection_state is ConnectionState.connected  # pending, overlaid
    await cached.flush_activity()
    reads.count = 0
    found = await must_find(cached, "dev1")
    assert found.connection_state is ConnectionState.connected  # patched in
    assert reads.count == 0
    assert (await cached.get("dev1")).connection_state is ConnectionState.connected  # really written
    await cached.touch("dev1", connected=False)
    await cached.flush_activity()
    found = await must_find(cached, "dev1")
    assert found.connection_state is ConnectionState.disconnected


class GatedRepository(SqlDeviceRepository):
    """The real repository; `gate(id)` makes the next read of that id pause after reading the row,
    so a write can commit while the (now old) row is on its way to the cache."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.gated: str | None = None
        self.paused = asyncio.Event()
        self.release = asyncio.Event()

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, Device]:
        found = await super().get_many(device_ids)
        if self.gated in device_ids:
            self.gated = None
            self.paused.set()
            await self.release.wait()
        return found


async def test_a_read_overlapping_a_write_is_not_cached(storage: SqlStorage, audit: AuditLog) -> None:
    repo = GatedRepository(storage.db)
    registry = RegistryService(repo, audit)
    await registry.create("dev1", {}, actor=ACTOR)
    repo.gated = "dev1"
    reader = asyncio.create_task(registry.find("dev1"))
    await repo.paused.wait()
    await registry.set_status("dev1", False, actor=ACTOR)
    repo.release.set()
    old = await reader
    assert old is not None and old.enabled  # it read before the write: fine for that caller...
    found = await registry.find("dev1")
    assert found is not None and found.status is DeviceStatus.disabled  # ...but it was not kept
