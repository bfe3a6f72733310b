"""SqlModuleRepository and module twins on real SQLite and PostgreSQL: etag compare-and-set, the
per-device limit under concurrent creates, (device, module) keyset scans, activity batches, and the
cascade from a deleted device to its modules and their twins."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from tether.errors import Conflict, NotFound, PreconditionFailed, QuotaExceeded
from tether.registry.models import EPOCH, ConnectionState, Device, Module
from tether.storage.base import ActivityUpdate
from tether.storage.sql import SqlStorage
from tether.storage.sql.modules import module_metadata
from tether.storage.sql.twins import TwinRecord

MANY = 50


def mod(device_id: str, module_id: str, etag: str = "e1", **extra: Any) -> Module:
    return Module.model_validate({"deviceId": device_id, "moduleId": module_id, "etag": etag, **extra})


def twin(device_id: str, module_id: str | None, version: int = 2, **sections: Any) -> TwinRecord:
    return TwinRecord(device_id=device_id, module_id=module_id, etag=f"t{version}", version=version,
                      tags=sections.get("tags", {}), desired=sections.get("desired", {}),
                      reported=sections.get("reported", {}), desired_version=1, reported_version=1,
                      metadata={})


async def with_device(storage: SqlStorage, device_id: str = "dev") -> None:
    await storage.devices.insert(Device.model_validate({"deviceId": device_id, "etag": "d1"}))


def _table_of(diff: Any) -> str | None:
    """The table a compare_metadata entry is about."""
    if isinstance(diff, list):  # column modifications: (op, schema, table, column, …)
        return str(diff[0][2])
    if diff[0] in ("add_column", "remove_column"):
        return str(diff[2])
    obj = diff[1]
    for owner in (getattr(obj, "parent", None), getattr(obj, "table", None), obj):
        name = getattr(owner, "name", None)
        if isinstance(name, str):
            return name
    return None


def _diff(connection: Connection) -> list[Any]:
    ctx = MigrationContext.configure(connection, opts={"compare_type": False})
    return [d for d in compare_metadata(ctx, module_metadata) if _table_of(d) in module_metadata.tables]


async def test_migration_matches_the_table_definitions(storage: SqlStorage) -> None:
    async with storage.db.read() as conn:
        assert await conn.run_sync(_diff) == []


async def test_insert_get_round_trips_the_module(storage: SqlStorage) -> None:
    await with_device(storage)
    module = mod("dev", "edge-1", managedBy="IotEdge", generationId="123",
                 authentication={"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "AB" * 20}})
    await storage.modules.insert(module, max_per_device=MANY)
    assert await storage.modules.get("dev", "edge-1") == module
    assert await storage.modules.get("dev", "EDGE-1") is None  # ids are case-sensitive
    assert await storage.modules.get("other", "edge-1") is None


async def test_insert_needs_the_device_and_a_free_id(storage: SqlStorage) -> None:
    with pytest.raises(NotFound) as missing:
        await storage.modules.insert(mod("ghost", "m"), max_per_device=MANY)
    assert missing.value.code == "DeviceNotFound"
    await with_device(storage)
    await storage.modules.insert(mod("dev", "m"), max_per_device=MANY)
    with pytest.raises(Conflict) as dup:
        await storage.modules.insert(mod("dev", "m", etag="e2"), max_per_device=MANY)
    assert dup.value.code == "ModuleAlreadyExistsOnDevice"
    stored = await storage.modules.get("dev", "m")
    assert stored is not None and stored.etag == "e1"


async def test_the_per_device_limit_holds_under_concurrent_creates(storage: SqlStorage) -> None:
    await with_device(storage)
    await with_device(storage, "other")
    results = await asyncio.gather(
        *(storage.modules.insert(mod("dev", f"m{i}"), max_per_device=3) for i in range(8)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, QuotaExceeded)]
    assert len(refused) == 5 and all(r is None or isinstance(r, QuotaExceeded) for r in results)
    assert len(await storage.modules.for_device("dev")) == 3
    await storage.modules.insert(mod("other", "m0"), max_per_device=3)  # the limit is per device


async def test_replace_and_delete_compare_the_etag(storage: SqlStorage) -> None:
    await with_device(storage)
    await storage.modules.insert(mod("dev", "m"), max_per_device=MANY)
    with pytest.raises(PreconditionFailed):
        await storage.modules.replace(mod("dev", "m", etag="e3", managedBy="x"), "stale")
    await storage.modules.replace(mod("dev", "m", etag="e2", managedBy="x"), "e1")
    stored = await storage.modules.get("dev", "m")
    assert stored is not None and (stored.etag, stored.managed_by) == ("e2", "x")
    with pytest.raises(NotFound) as gone:
        await storage.modules.replace(mod("dev", "nope"), None)
    assert gone.value.code == "ModuleNotFound"
    with pytest.raises(PreconditionFailed):
        await storage.modules.delete("dev", "m", "e1")
    await storage.modules.delete("dev", "m", "e2")
    assert await storage.modules.get("dev", "m") is None
    with pytest.raises(NotFound):
        await storage.modules.delete("dev", "m", None)


async def test_listing_and_scanning_follow_byte_order(storage: SqlStorage) -> None:
    for device_id in ("b", "a", "a-"):
        await with_device(storage, device_id)
    for device_id, module_id in (("b", "z"), ("a", "m2"), ("a", "M1"), ("a-", "x"), ("b", "a")):
        await storage.modules.insert(mod(device_id, module_id), max_per_device=MANY)
    assert [m.module_id for m in await storage.modules.for_device("a")] == ["M1", "m2"]
    assert await storage.modules.for_device("nobody") == []
    first = await storage.modules.scan(after=None, limit=3)
    assert [m.key for m in first] == [("a", "M1"), ("a", "m2"), ("a-", "x")]
    rest = await storage.modules.scan(after=first[-1].key, limit=3)
    assert [m.key for m in rest] == [("b", "a"), ("b", "z")]
    found = await storage.modules.get_many([("b", "z"), ("a", "m2"), ("a", "nope"), ("b", "z")])
    assert sorted(found) == [("a", "m2"), ("b", "z")]


async def test_activity_of_modules_is_batched_with_devices_and_keeps_the_etag(storage: SqlStorage) -> None:
    await with_device(storage)
    await storage.modules.insert(mod("dev", "m"), max_per_device=MANY)
    t1 = datetime(2030, 1, 1, tzinfo=UTC)
    await storage.devices.apply_activity([
        ActivityUpdate("dev", ConnectionState.connected, t1, "m"),
        ActivityUpdate("dev", None, t1 + timedelta(seconds=1)),
        ActivityUpdate("dev", ConnectionState.connected, t1, "unknown-module"),
    ])
    module = await storage.modules.get("dev", "m")
    device = await storage.devices.get("dev")
    assert module is not None and device is not None
    assert (module.connection_state, module.connection_state_updated_time) == (ConnectionState.connected, t1)
    assert module.last_activity_time == t1 and module.etag == "e1"
    assert device.connection_state is ConnectionState.disconnected  # the module's state is its own
    assert device.last_activity_time == t1 + timedelta(seconds=1)
    # An older state arriving late does not go back in time.
    await storage.devices.apply_activity([ActivityUpdate("dev", ConnectionState.disconnected,
                                                         t1 - timedelta(seconds=5), "m")])
    module = await storage.modules.get("dev", "m")
    assert module is not None and module.connection_state is ConnectionState.connected
    assert await storage.devices.reset_connection_states(t1 + timedelta(seconds=9)) == 1
    module = await storage.modules.get("dev", "m")
    assert module is not None and module.connection_state is ConnectionState.disconnected


async def test_module_twins_are_their_own_rows(storage: SqlStorage) -> None:
    await with_device(storage)
    await storage.modules.insert(mod("dev", "m"), max_per_device=MANY)
    assert await storage.twins.insert(twin("dev", None, tags={"who": "device"}))
    assert await storage.twins.insert(twin("dev", "m", tags={"who": "module"}))
    assert not await storage.twins.insert(twin("dev", "m"))  # exists already
    assert not await storage.twins.insert(twin("dev", "ghost"))  # no such module
    device_twin, module_twin = await storage.twins.get("dev"), await storage.twins.get("dev", "m")
    assert device_twin is not None and device_twin.tags == {"who": "device"} and device_twin.module_id is None
    assert module_twin is not None and module_twin.tags == {"who": "module"} and module_twin.module_id == "m"
    assert not await storage.twins.update(twin("dev", "m", 3), expected_version=1)
    assert await storage.twins.update(twin("dev", "m", 3, tags={"v": 3}), expected_version=2)
    found = await storage.twins.get_module_twins([("dev", "m"), ("dev", "ghost")])
    assert list(found) == [("dev", "m")] and found[("dev", "m")].tags == {"v": 3}
    device_twin = await storage.twins.get("dev")
    assert device_twin is not None and device_twin.tags == {"who": "device"}  # untouched


async def test_deleting_a_device_deletes_its_modules_and_their_twins(storage: SqlStorage) -> None:
    await with_device(storage)
    await with_device(storage, "kept")
    for device_id in ("dev", "kept"):
        await storage.modules.insert(mod(device_id, "m"), max_per_device=MANY)
        assert await storage.twins.insert(twin(device_id, "m"))
    await storage.devices.delete("dev", None)
    assert await storage.modules.get("dev", "m") is None
    assert await storage.twins.get("dev", "m") is None
    assert await storage.modules.get("kept", "m") is not None
    assert await storage.twins.get("kept", "m") is not None
    await storage.modules.delete("kept", "m", None)  # and a module's twin goes with the module
    assert await storage.twins.get("kept", "m") is None


async def test_a_module_is_durable_across_reopen(db_url: str) -> None:
    first = SqlStorage(db_url)
    await first.start()
    try:
        await with_device(first)
        await first.modules.insert(mod("dev", "m", authentication={"type": "sas", "symmetricKey": {
            "primaryKey": "a2V5a2V5a2V5a2V5a2V5a2V5", "secondaryKey": "c2Vjb25kc2Vjb25kc2Vjb25k"}}),
            max_per_device=MANY)
    finally:
        await first.close()
    second = SqlStorage(db_url)
    await second.start()
    try:
        module = await second.modules.get("dev", "m")
        assert module is not None
        assert module.authentication.symmetric_key.primary_key == "a2V5a2V5a2V5a2V5a2V5a2V5"
        assert module.connection_state_updated_time == EPOCH
    finally:
        await second.close()
