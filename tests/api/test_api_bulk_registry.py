"""Azure's bulk registry operation, `POST /devices` with ExportImportDevice entries: all or nothing.

(The real azure-iot-hub SDK drives the same route in test_api_sdk.py.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from api_helpers import API, create, device_body, new_key, policy_token

from tether.hub import Hub
from tether.registry.models import Device
from tether.registry.service import BulkOperation, RegistryService
from tether.storage.sql.devices import SqlDeviceRepository


def sas(primary: str | None = None) -> dict[str, Any]:
    return {"type": "sas", "symmetricKey": {"primaryKey": primary or new_key(), "secondaryKey": new_key()}}


async def bulk(client: httpx.AsyncClient, entries: Any) -> httpx.Response:
    return await client.post(f"/devices{API}", json=entries)


async def test_mixed_batch_is_applied_with_azure_semantics(client: httpx.AsyncClient, hub: Hub) -> None:
    u1 = await create(client, "u1")
    await create(client, "d1")
    d2 = await create(client, "d2")
    u3 = await create(client, "u3")
    gone: list[str] = []

    async def listener(device: Device) -> None:
        gone.append(f"{device.device_id}:{device.status.value}")

    hub.registry.add_status_listener(listener)
    key = new_key()
    r = await bulk(client, [
        {"id": "c1", "importMode": "create", "status": "enabled", "authentication": sas(key)},
        {"id": "u1", "importMode": "update", "status": "disabled", "statusReason": "bulk"},  # keys kept
        {"id": "u2", "importMode": "updateIfMatchETag", "eTag": "whatever"},  # missing: created
        {"id": "u3", "importMode": "UPDATEIFMATCHETAG", "eTag": u3["etag"], "status": "disabled"},
        {"id": "d1", "importMode": "delete"},
        {"id": "d2", "importMode": "deleteIfMatchETag", "eTag": f'"{d2["etag"]}"'},
    ])
    assert r.status_code == 200, r.text
    assert r.json() == {"isSuccessful": True, "errors": [], "warnings": []}

    c1 = await hub.registry.get("c1")
    assert c1.authentication.symmetric_key.primary_key == key and c1.generation_id
    u1_now = await hub.registry.get("u1")
    assert (u1_now.status.value, u1_now.status_reason) == ("disabled", "bulk")
    assert u1_now.etag != u1["etag"] and u1_now.generation_id == u1["generationId"]
    old_keys = u1["authentication"]["symmetricKey"]
    assert u1_now.authentication.symmetric_key.primary_key == old_keys["primaryKey"]
    assert (await hub.registry.get("u2")).authentication.symmetric_key.primary_key
    assert (await hub.registry.get("u3")).status.value == "disabled"
    assert await hub.registry.find("d1") is None and await hub.registry.find("d2") is None
    assert sorted(gone) == ["d1:enabled", "d2:enabled", "u1:disabled", "u3:disabled"]

    await hub.audit.flush()
    records = await hub.audit.query(action_prefix="device.", limit=100)
    bulk_records = {(r.action, r.target) for r in records if (r.details or {}).get("bulk")}
    assert bulk_records == {("device.create", "c1"), ("device.update", "u1"), ("device.create", "u2"),
                            ("device.update", "u3"), ("device.delete", "d1"), ("device.delete", "d2")}
    assert all(r.principal == "policy:registryReadWrite" for r in records if (r.details or {}).get("bulk"))


async def test_any_error_writes_nothing_and_lists_every_failed_entry(client: httpx.AsyncClient,
                                                                     hub: Hub) -> None:
    await create(client, "e1")
    e2 = await create(client, "e2")
    bad_key = sas()
    bad_key["symmetricKey"]["primaryKey"] = "***"
    r = await bulk(client, [
        {"id": "n1", "importMode": "create"},                                   # fine on its own
        {"id": "e1", "importMode": "create"},                                   # exists
        {"id": "e2", "importMode": "updateIfMatchETag", "eTag": "stale"},       # etag
        {"id": "e2x", "importMode": "deleteIfMatchETag", "eTag": "x"},          # missing
        {"id": "has space", "importMode": "create"},                            # bad id
        {"id": "n2", "importMode": "create", "authentication": bad_key},        # bad body
        {"id": "n1", "importMode": "update"},                                   # twice
        {"id": "n3", "importMode": "updateTwin"},                               # unsupported mode
        {"id": "n4", "importMode": "create", "tags": {"a": 1}},                 # twin data
        {"id": "n5", "importMode": "create", "colour": "red"},                  # unknown field
        {"importMode": "create"},                                               # no id
    ])
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["isSuccessful"] is False and body["warnings"] == []
    got = {(e["deviceId"], e["errorCode"], e["operation"]) for e in body["errors"]}
    assert got == {
        ("e1", "DeviceAlreadyExists", "create"),
        ("e2", "PreconditionFailed", "updateIfMatchETag"),
        ("e2x", "DeviceNotFound", "deleteIfMatchETag"),
        ("has space", "ArgumentInvalid", "create"),
        ("n2", "ArgumentInvalid", "create"),
        ("n1", "DeviceDefinedMultipleTimes", "update"),
        ("n3", "InvalidOperation", "updateTwin"),
        ("n4", "ArgumentInvalid", "create"),
        ("n5", "ArgumentInvalid", "create"),
        ("", "ArgumentInvalid", "create"),
    }
    assert all(e["errorStatus"] for e in body["errors"])
    assert (await hub.registry.statistics()).total_device_count == 2
    assert (await hub.registry.get("e2")).etag == e2["etag"]


async def test_request_level_refusals(client: httpx.AsyncClient, hub: Hub, base_url: str) -> None:
    assert (await bulk(client, {"id": "x", "importMode": "create"})).status_code == 400
    assert (await bulk(client, [])).status_code == 400
    r = await client.post(f"/devices{API}", content=b"[{not json")
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = await bulk(client, [{"id": f"m{i}", "importMode": "create"} for i in range(101)])
    assert r.status_code == 400 and "100" in r.json()["Message"]
    headers = {"Authorization": await policy_token(hub, "registryRead")}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as reader:
        r = await reader.post(f"/devices{API}", json=[{"id": "x", "importMode": "create"}])
    assert r.status_code == 403
    assert (await hub.registry.statistics()).total_device_count == 0
    ok = await bulk(client, [{"id": f"m{i}", "importMode": "create"} for i in range(100)])
    assert ok.status_code == 200 and (await hub.registry.statistics()).total_device_count == 100


class RacingRepository(SqlDeviceRepository):
    """Real SQL storage where another writer changes `victim` after the batch was checked, just
    before the batch transaction starts."""

    victim = ""

    async def apply_batch(
        self,
        inserts: Sequence[Device],
        replaces: Sequence[tuple[Device, str | None]],
        deletes: Sequence[tuple[str, str | None]],
    ) -> None:
        if self.victim:
            current = await self.get(self.victim)
            assert current is not None
            await self.replace(current.model_copy(update={"etag": "someone-else"}), current.etag)
            self.victim = ""
        await super().apply_batch(inserts, replaces, deletes)


async def test_a_concurrent_writer_rolls_the_batch_back(hub: Hub) -> None:
    repo = RacingRepository(hub.storage.db)
    registry = RegistryService(repo, hub.audit)
    for device_id in ("a", "d", "z"):
        await registry.create(device_id, device_body(device_id), actor="test")
    before = await registry.get("a")
    deleted = await registry.get("d")
    repo.victim = "z"  # guarded writes run in id order: "a" and "d" are written, then "z" loses
    errors = await registry.bulk([
        BulkOperation("new", "create"),
        BulkOperation("a", "update", {"status": "disabled"}),
        BulkOperation("d", "delete"),
        BulkOperation("z", "update", {"status": "disabled"}),
    ], actor="test")
    assert [(e.device_id, e.code) for e in errors] == [("z", "PreconditionFailed")]
    assert await registry.find("new") is None  # one transaction: nothing of the batch was written
    a = await registry.get("a")
    assert (a.status, a.etag) == (before.status, before.etag)
    d = await registry.get("d")
    assert (d.etag, d.generation_id) == (deleted.etag, deleted.generation_id)  # never deleted
    assert (await registry.get("z")).etag == "someone-else"  # the other writer's change stands
