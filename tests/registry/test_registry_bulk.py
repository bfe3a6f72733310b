"""`RegistryService.bulk` on real SQLite and PostgreSQL: validated first, then written in ONE repository
transaction. When another writer gets in between the check and the write, nothing of the batch is
written (no compensating writes), so a device the batch would have deleted keeps its twin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tether.registry.models import Device
from tether.registry.service import BulkOperation, RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.devices import SqlDeviceRepository
from tether.storage.sql.twins import TwinRecord


class InterleavingRepository(SqlDeviceRepository):
    """Real SQL storage where another writer commits `race` just before the batch transaction."""

    race: Device | None = None  # replaced unconditionally if stored, else inserted
    batches = 0

    async def apply_batch(
        self,
        inserts: Sequence[Device],
        replaces: Sequence[tuple[Device, str | None]],
        deletes: Sequence[tuple[str, str | None]],
    ) -> None:
        self.batches += 1
        race, self.race = self.race, None
        if race is not None:
            if await self.get(race.device_id) is None:
                await self.insert(race)
            else:
                await self.replace(race, None)
        await super().apply_batch(inserts, replaces, deletes)


def twin(device_id: str) -> TwinRecord:
    meta: dict[str, Any] = {"desired": {}, "reported": {}}
    return TwinRecord(device_id, "t1", 3, {"floor": 2}, {"rate": 5}, {}, 2, 1, meta)


async def setup(storage: SqlStorage, audit: AuditLog) -> tuple[RegistryService, InterleavingRepository,
                                                                 dict[str, Device]]:
    repo = InterleavingRepository(storage.db)
    registry = RegistryService(repo, audit)
    devices = {i: await registry.create(i, {}, actor="test") for i in ("upd", "del", "zz-last")}
    assert await storage.twins.insert(twin("del"))
    return registry, repo, devices


def batch(devices: dict[str, Device]) -> list[BulkOperation]:
    return [
        BulkOperation("new", "create"),
        BulkOperation("upd", "update", {"status": "disabled"}),
        BulkOperation("del", "deleteIfMatchETag", etag=devices["del"].etag),
        BulkOperation("zz-last", "updateIfMatchETag", {"statusReason": "x"}, etag=devices["zz-last"].etag),
    ]


async def assert_nothing_written(registry: RegistryService, storage: SqlStorage, audit: AuditLog,
                                 devices: dict[str, Device], gone: list[str]) -> None:
    for device_id in ("upd", "del"):
        now = await registry.get(device_id)
        before = devices[device_id]
        assert (now.etag, now.status, now.status_reason) == (before.etag, before.status, before.status_reason)
    assert await storage.twins.get("del") == twin("del")  # not deleted and re-created: still there
    assert gone == []
    await audit.flush()
    assert not [r for r in await audit.query(action_prefix="device.") if (r.details or {}).get("bulk")]


async def test_stale_etag_in_the_last_entry_writes_nothing(storage: SqlStorage, audit: AuditLog) -> None:
    registry, repo, devices = await setup(storage, audit)
    gone: list[str] = []

    async def listener(device: Device) -> None:
        gone.append(device.device_id)

    registry.add_status_listener(listener)
    repo.race = devices["zz-last"].model_copy(update={"etag": "someone-else"})
    errors = await registry.bulk(batch(devices), actor="test")
    assert [(e.device_id, e.code, e.operation) for e in errors] == [("zz-last", "PreconditionFailed", "bulk")]
    assert repo.batches == 1
    assert await registry.find("new") is None
    assert (await registry.get("zz-last")).etag == "someone-else"  # the other writer's change stands
    await assert_nothing_written(registry, storage, audit, devices, gone)


async def test_a_create_that_lost_the_race_rolls_back_the_batch(storage: SqlStorage, audit: AuditLog) -> None:
    registry, repo, devices = await setup(storage, audit)
    theirs = await registry.create("other", {}, actor="test")
    repo.race = theirs.model_copy(update={"device_id": "new", "etag": "theirs"})
    errors = await registry.bulk(batch(devices), actor="test")
    assert [(e.device_id, e.code) for e in errors] == [("new", "DeviceAlreadyExists")]
    assert (await registry.get("new")).etag == "theirs"
    assert (await registry.get("zz-last")).etag == devices["zz-last"].etag
    await assert_nothing_written(registry, storage, audit, devices, [])


async def test_validation_errors_never_reach_storage(storage: SqlStorage, audit: AuditLog) -> None:
    registry, repo, devices = await setup(storage, audit)
    ops = batch(devices)
    ops[-1] = BulkOperation("zz-last", "updateIfMatchETag", {"statusReason": "x"}, etag="stale")
    errors = await registry.bulk(ops, actor="test")
    assert [(e.device_id, e.code, e.operation) for e in errors] == [
        ("zz-last", "PreconditionFailed", "updateIfMatchETag")
    ]
    assert repo.batches == 0 and await registry.find("new") is None
    assert (await registry.get("zz-last")).etag == devices["zz-last"].etag
    await assert_nothing_written(registry, storage, audit, devices, [])


async def test_mixed_batch_is_applied_in_one_transaction(storage: SqlStorage, audit: AuditLog) -> None:
    registry, repo, devices = await setup(storage, audit)
    gone: list[str] = []

    async def listener(device: Device) -> None:
        gone.append(f"{device.device_id}:{device.status.value}")

    registry.add_status_listener(listener)
    assert await registry.bulk(batch(devices), actor="test") == []
    assert repo.batches == 1
    new = await registry.get("new")
    assert new.generation_id and new.authentication.symmetric_key.primary_key
    upd = await registry.get("upd")
    assert upd.status.value == "disabled" and upd.etag != devices["upd"].etag
    assert upd.generation_id == devices["upd"].generation_id
    last = await registry.get("zz-last")
    assert last.status_reason == "x" and last.etag != devices["zz-last"].etag
    assert await registry.find("del") is None and await storage.twins.get("del") is None  # cascaded
    assert sorted(gone) == ["del:enabled", "upd:disabled"]
    await audit.flush()
    records = {(r.action, r.target) for r in await audit.query(action_prefix="device.")
               if (r.details or {}).get("bulk")}
    assert records == {("device.create", "new"), ("device.update", "upd"), ("device.delete", "del"),
                       ("device.update", "zz-last")}
    assert (await registry.statistics()).total_device_count == 3
