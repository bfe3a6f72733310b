"""Bulk import: validated up front with numbered errors, then one all-or-nothing transaction."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tether.errors import BadRequest, Conflict
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog

ACTOR = "cli:local"


async def count(registry: RegistryService) -> int:
    return (await registry.statistics()).total_device_count


async def test_import_5000_devices_in_one_call(registry: RegistryService, audit: AuditLog) -> None:
    records: list[dict[str, Any]] = [{"deviceId": f"bulk-{i:05d}"} for i in range(5000)]
    records[7]["authentication"] = {"type": "selfSigned",
                                    "x509Thumbprint": {"primaryThumbprint": "AB" * 32}}
    records[8]["status"] = "disabled"
    assert await registry.import_devices(records, actor=ACTOR) == 5000
    stats = await registry.statistics()
    assert (stats.total_device_count, stats.disabled_device_count) == (5000, 1)
    sample = await registry.get("bulk-04999")
    assert sample.authentication.symmetric_key.primary_key and sample.etag and sample.generation_id
    assert (await registry.get("bulk-00007")).authentication.symmetric_key.primary_key is None
    (entry,) = await audit.query(action_prefix="device.import")
    assert entry.details == {"count": 5000} and entry.principal == ACTOR


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"deviceId": "has space"}, "line 3: deviceId"),
        ({"status": "enabled"}, "line 3: deviceId"),
        ({"deviceId": "x3", "unknownField": 1}, "line 3: unknownField"),
        ({"deviceId": "x3", "authentication": {"symmetricKey": {"primaryKey": "@@@"}}},
         "line 3: authentication.symmetricKey.primaryKey"),
        ({"deviceId": "x3", "importMode": "delete"}, "line 3: importMode"),
        ("not an object", "line 3: body"),
    ],
)
async def test_one_bad_record_writes_nothing(registry: RegistryService, bad: Any, field: str) -> None:
    records = [{"deviceId": "x1"}, {"deviceId": "x2"}, bad, {"deviceId": "x4"}]
    with pytest.raises(BadRequest) as info:
        await registry.import_devices(records, actor=ACTOR)
    assert info.value.field == field
    assert info.value.message.startswith("line 3: ")
    assert await count(registry) == 0


async def test_duplicate_id_within_the_batch_writes_nothing(registry: RegistryService) -> None:
    records = [{"deviceId": f"d{i}"} for i in range(10)] + [{"deviceId": "d4"}]
    with pytest.raises(Conflict) as info:
        await registry.import_devices(records, actor=ACTOR)
    assert info.value.field == "line 11: deviceId" and "d4" in info.value.message
    assert await count(registry) == 0


async def test_existing_id_writes_nothing(registry: RegistryService) -> None:
    await registry.create("exists", {}, actor=ACTOR)
    records = [{"deviceId": f"n{i:04d}"} for i in range(1500)] + [{"deviceId": "exists"}]
    with pytest.raises(Conflict) as info:
        await registry.import_devices(records, actor=ACTOR)
    assert "exists" in info.value.message
    assert await count(registry) == 1


async def test_import_accepts_create_mode_and_exported_records(registry: RegistryService) -> None:
    key = base64.b64encode(b"k" * 32).decode()
    original = await registry.create(
        "src", {"authentication": {"symmetricKey": {"primaryKey": key, "secondaryKey": key}}}, actor=ACTOR
    )
    exported = original.to_wire()
    exported["deviceId"] = "copy"
    assert await registry.import_devices([exported, {"deviceId": "m", "importMode": "create"}],
                                         actor=ACTOR) == 2
    copy = await registry.get("copy")
    assert copy.authentication.symmetric_key.primary_key == key
    assert copy.generation_id != original.generation_id


async def test_empty_import_is_zero(registry: RegistryService) -> None:
    assert await registry.import_devices([], actor=ACTOR) == 0
