"""TwinService over real SQLite and PostgreSQL: shape, versions, metadata, concurrency, limits,
listeners, durability and the twin's lifecycle with its device."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hub_app_helpers import device_body

from tether.errors import BadRequest, NotFound, PreconditionFailed
from tether.messaging.twins import INITIAL_ETAG, TwinService
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.twins import SqlTwinRepository

ACTOR = "policy:test"


async def make_device(registry: RegistryService, device_id: str = "dev1") -> None:
    await registry.create(device_id, device_body(device_id), actor=ACTOR)


async def test_new_device_has_an_empty_twin_with_version_1(
    twins: TwinService, registry: RegistryService
) -> None:
    await make_device(registry)
    twin = await twins.get("dev1")
    assert twin["deviceId"] == "dev1" and twin["version"] == 1 and twin["etag"] == INITIAL_ETAG
    assert twin["tags"] == {}
    assert twin["properties"]["desired"]["$version"] == 1
    assert twin["properties"]["reported"]["$version"] == 1
    assert twin["status"] == "enabled" and twin["connectionState"] == "Disconnected"
    assert twin["authenticationType"] == "sas" and twin["capabilities"] == {"iotEdge": False}
    assert twin["deviceEtag"] == (await registry.get("dev1")).etag
    assert await twins.get_for_device("dev1") == {"desired": {"$version": 1}, "reported": {"$version": 1}}


async def test_unknown_device_is_device_not_found(twins: TwinService) -> None:
    with pytest.raises(NotFound) as err:
        await twins.get("ghost")
    assert err.value.code == "DeviceNotFound"
    with pytest.raises(NotFound):
        await twins.patch("ghost", {"tags": {"a": 1}}, if_match=None, actor=ACTOR)
    with pytest.raises(NotFound):
        await twins.update_reported("ghost", {"a": 1})
    with pytest.raises(NotFound):
        await twins.get_for_device("ghost")


async def test_patch_merges_and_versions_each_section(twins: TwinService, registry: RegistryService) -> None:
    await make_device(registry)
    t1 = await twins.patch(
        "dev1", {"tags": {"site": {"building": "b1", "floor": 3}}}, if_match=None, actor=ACTOR
    )
    assert t1["version"] == 2 and t1["etag"] != INITIAL_ETAG
    assert t1["tags"] == {"site": {"building": "b1", "floor": 3}}
    assert t1["properties"]["desired"]["$version"] == 1  # tags do not touch desired

    t2 = await twins.patch(
        "dev1",
        {"properties": {"desired": {"cfg": {"rate": 5, "mode": "eco"}}}},
        if_match=f'"{t1["etag"]}"',
        actor=ACTOR,
    )
    assert t2["version"] == 3 and t2["etag"] not in (t1["etag"], INITIAL_ETAG)
    desired = t2["properties"]["desired"]
    assert desired["cfg"] == {"rate": 5, "mode": "eco"} and desired["$version"] == 2
    assert t2["properties"]["reported"]["$version"] == 1

    t3 = await twins.patch(
        "dev1",
        {"tags": {"site": {"floor": 4}}, "properties": {"desired": {"cfg": {"rate": 6}}}},
        if_match="*",
        actor=ACTOR,
    )
    assert t3["tags"] == {"site": {"building": "b1", "floor": 4}}
    assert t3["properties"]["desired"]["cfg"] == {"rate": 6, "mode": "eco"}
    assert t3["properties"]["desired"]["$version"] == 3 and t3["version"] == 4

    version = await twins.update_reported("dev1", {"fw": "1.0", "battery": {"level": 80}})
    assert version == 2
    t4 = await twins.get("dev1")
    assert t4["version"] == 5 and t4["properties"]["desired"]["$version"] == 3
    assert t4["properties"]["reported"]["fw"] == "1.0" and t4["properties"]["reported"]["$version"] == 2
    assert await twins.get_for_device("dev1") == {
        "desired": {"cfg": {"rate": 6, "mode": "eco"}, "$version": 3},
        "reported": {"fw": "1.0", "battery": {"level": 80}, "$version": 2},
    }


async def test_null_removes_keys_and_their_metadata(twins: TwinService, registry: RegistryService) -> None:
    await make_device(registry)
    await twins.patch(
        "dev1",
        {"tags": {"a": 1, "b": {"c": 2, "d": 3}}, "properties": {"desired": {"x": 1, "y": {"z": 1, "w": 2}}}},
        if_match=None,
        actor=ACTOR,
    )
    twin = await twins.patch(
        "dev1",
        {
            "tags": {"a": None, "b": {"c": None}, "missing": None},
            "properties": {"desired": {"x": None, "y": {"w": None}}},
        },
        if_match=None,
        actor=ACTOR,
    )
    assert twin["tags"] == {"b": {"d": 3}}
    desired = twin["properties"]["desired"]
    assert "x" not in desired and desired["y"] == {"z": 1}
    assert "x" not in desired["$metadata"] and "w" not in desired["$metadata"]["y"]
    await twins.update_reported("dev1", {"r": 1, "s": 2})
    await twins.update_reported("dev1", {"r": None})
    assert (await twins.get_for_device("dev1"))["reported"] == {"s": 2, "$version": 3}


async def test_metadata_records_last_updated_per_key(
    storage: SqlStorage, registry: RegistryService, audit: AuditLog
) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    twins = TwinService(SqlTwinRepository(storage.db), registry, audit, clock=lambda: now[0])
    await make_device(registry)
    await twins.patch(
        "dev1", {"properties": {"desired": {"a": {"b": 1, "c": 2}, "d": 3}}}, if_match=None, actor=ACTOR
    )
    now[0] += timedelta(minutes=5)
    twin = await twins.patch(
        "dev1", {"properties": {"desired": {"a": {"b": 10}}}}, if_match=None, actor=ACTOR
    )
    meta = twin["properties"]["desired"]["$metadata"]
    first, second = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
    assert meta["$lastUpdated"] == second and meta["$lastUpdatedVersion"] == 3
    assert meta["a"]["$lastUpdated"] == second and meta["a"]["$lastUpdatedVersion"] == 3
    assert meta["a"]["b"] == {"$lastUpdated": second, "$lastUpdatedVersion": 3}
    assert meta["a"]["c"] == {"$lastUpdated": first, "$lastUpdatedVersion": 2}
    assert meta["d"] == {"$lastUpdated": first, "$lastUpdatedVersion": 2}

    now[0] += timedelta(minutes=5)
    await twins.update_reported("dev1", {"t": {"v": 1}})
    reported_meta = (await twins.get("dev1"))["properties"]["reported"]["$metadata"]
    third = "2026-01-01T00:10:00Z"
    assert reported_meta == {
        "$lastUpdated": third,
        "t": {"$lastUpdated": third, "v": {"$lastUpdated": third}},
    }


async def test_stale_if_match_is_412(twins: TwinService, registry: RegistryService) -> None:
    await make_device(registry)
    t1 = await twins.patch("dev1", {"tags": {"a": 1}}, if_match=None, actor=ACTOR)
    t2 = await twins.patch("dev1", {"tags": {"a": 2}}, if_match=f'"{t1["etag"]}"', actor=ACTOR)
    with pytest.raises(PreconditionFailed):
        await twins.patch("dev1", {"tags": {"a": 3}}, if_match=f'"{t1["etag"]}"', actor=ACTOR)
    with pytest.raises(PreconditionFailed):
        await twins.replace("dev1", {"tags": {}}, if_match=t1["etag"], actor=ACTOR)
    assert (await twins.get("dev1"))["tags"] == {"a": 2}
    await twins.replace("dev1", {"tags": {"b": 1}}, if_match=t2["etag"], actor=ACTOR)


async def test_replace_sets_tags_and_desired_and_keeps_reported(
    twins: TwinService, registry: RegistryService
) -> None:
    await make_device(registry)
    notices: list[tuple[str, dict[str, Any]]] = []

    async def listener(device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        notices.append((device_id, patch))

    twins.add_desired_listener(listener)
    await twins.patch(
        "dev1",
        {"tags": {"old": 1}, "properties": {"desired": {"keep": 1, "drop": 2, "n": {"a": 1, "b": 2}}}},
        if_match=None,
        actor=ACTOR,
    )
    await twins.update_reported("dev1", {"fw": "2"})
    fetched = await twins.get("dev1")
    fetched["tags"] = {"new": True}
    fetched["properties"]["desired"] = {
        **fetched["properties"]["desired"],
        "drop": None,
        "add": "x",
        "n": {"a": 1},
    }
    twin = await twins.replace(
        "dev1", fetched, if_match=fetched["etag"], actor=ACTOR
    )  # a fetched twin, echoed
    assert twin["tags"] == {"new": True}
    desired = {k: v for k, v in twin["properties"]["desired"].items() if not k.startswith("$")}
    assert desired == {"keep": 1, "n": {"a": 1}, "add": "x"}
    assert twin["properties"]["desired"]["$version"] == 3
    assert twin["properties"]["reported"]["fw"] == "2"
    assert notices[-1] == ("dev1", {"drop": None, "n": {"b": None}, "add": "x", "$version": 3})
    assert "drop" not in twin["properties"]["desired"]["$metadata"]

    same = await twins.replace(
        "dev1", {"tags": {"new": True}, "properties": {"desired": desired}}, if_match=None, actor=ACTOR
    )
    assert same["properties"]["desired"]["$version"] == 3 and len(notices) == 2  # nothing changed for devices


async def test_desired_listener_gets_patch_with_version(
    twins: TwinService, registry: RegistryService
) -> None:
    await make_device(registry)
    seen: list[tuple[str, dict[str, Any]]] = []

    async def listener(device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        seen.append((device_id, patch))
        patch["mutated"] = True  # each listener gets its own copy

    async def broken(device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    twins.add_desired_listener(broken)
    twins.add_desired_listener(listener)
    await twins.patch("dev1", {"tags": {"t": 1}}, if_match=None, actor=ACTOR)
    assert seen == []  # tags are invisible to devices
    await twins.patch(
        "dev1",
        {"properties": {"desired": {"a": 1, "gone": None, "$version": 99}}},
        if_match=None,
        actor=ACTOR,
    )
    await twins.patch("dev1", {"properties": {"desired": {"b": {"c": 2}}}}, if_match=None, actor=ACTOR)
    assert seen[0] == ("dev1", {"a": 1, "gone": None, "$version": 2, "mutated": True})
    assert seen[1][1]["$version"] == 3 and seen[1][1]["b"] == {"c": 2}
    assert (await twins.get_for_device("dev1"))["desired"] == {"a": 1, "b": {"c": 2}, "$version": 3}


async def test_listener_order_follows_version_under_concurrency(
    twins: TwinService, registry: RegistryService
) -> None:
    await make_device(registry)
    versions: list[int] = []

    async def listener(device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        versions.append(patch["$version"])

    twins.add_desired_listener(listener)
    await asyncio.gather(
        *(
            twins.patch("dev1", {"properties": {"desired": {f"k{i}": i}}}, if_match=None, actor=ACTOR)
            for i in range(10)
        )
    )
    assert versions == list(range(2, 12))


async def test_interleaved_writers_lose_nothing(
    storage: SqlStorage, registry: RegistryService, audit: AuditLog
) -> None:
    """Two services over one database (as two hub nodes) plus device reports, all at once: every
    write lands, versions count every write, no spurious 412."""
    node_a = TwinService(SqlTwinRepository(storage.db), registry, audit)
    node_b = TwinService(SqlTwinRepository(storage.db), registry, audit)
    await make_device(registry)
    writes = []
    for i in range(8):
        writes.append(node_a.patch("dev1", {"tags": {f"a{i}": i}}, if_match="*", actor=ACTOR))
        writes.append(
            node_b.patch("dev1", {"properties": {"desired": {f"b{i}": i}}}, if_match=None, actor=ACTOR)
        )
        writes.append(node_a.update_reported("dev1", {f"r{i}": i}))
    await asyncio.gather(*writes)
    twin = await node_b.get("dev1")
    assert twin["tags"] == {f"a{i}": i for i in range(8)}
    assert twin["version"] == 1 + 24
    assert twin["properties"]["desired"]["$version"] == 9 and twin["properties"]["reported"]["$version"] == 9
    assert all(twin["properties"]["desired"][f"b{i}"] == i for i in range(8))
    assert all(twin["properties"]["reported"][f"r{i}"] == i for i in range(8))


async def test_twin_survives_restart(db_url: str) -> None:
    for round_ in range(2):
        storage = SqlStorage(db_url)
        await storage.start()
        audit = AuditLog(storage.audit)
        registry = RegistryService(storage.devices, audit)
        twins = TwinService(SqlTwinRepository(storage.db), registry, audit)
        try:
            if round_ == 0:
                await make_device(registry)
                await twins.patch(
                    "dev1",
                    {"tags": {"a": 1}, "properties": {"desired": {"d": [1, 2]}}},
                    if_match=None,
                    actor=ACTOR,
                )
                await twins.update_reported("dev1", {"r": "x"})
                before = await twins.get("dev1")
            else:
                after = await twins.get("dev1")
                assert after == before
                assert after["tags"] == {"a": 1} and after["properties"]["desired"]["d"] == [1, 2]
        finally:
            await audit.close()
            await storage.close()


async def test_deleting_a_device_deletes_its_twin(
    twins: TwinService, registry: RegistryService, storage: SqlStorage
) -> None:
    repo = SqlTwinRepository(storage.db)
    await make_device(registry)
    await make_device(registry, "other")
    await twins.patch("dev1", {"tags": {"a": 1}}, if_match=None, actor=ACTOR)
    await twins.patch("other", {"tags": {"b": 1}}, if_match=None, actor=ACTOR)
    await registry.delete("dev1", if_match="*", actor=ACTOR)
    assert await repo.get("dev1") is None
    assert await repo.get("other") is not None
    with pytest.raises(NotFound):
        await twins.get("dev1")
    await make_device(registry)
    fresh = await twins.get("dev1")
    assert fresh["tags"] == {} and fresh["version"] == 1


async def test_twin_cannot_be_stored_for_a_missing_device(storage: SqlStorage, twins: TwinService) -> None:
    """The foreign key refuses an orphan twin row even if the registry check were bypassed."""
    from tether.messaging.twins import blank_record

    repo = SqlTwinRepository(storage.db)
    assert await repo.insert(blank_record("nobody")) is False


async def test_disabling_a_device_keeps_its_twin(twins: TwinService, registry: RegistryService) -> None:
    await make_device(registry)
    await twins.patch("dev1", {"tags": {"a": 1}}, if_match=None, actor=ACTOR)
    await registry.set_status("dev1", False, actor=ACTOR)
    twin = await twins.get("dev1")
    assert twin["tags"] == {"a": 1} and twin["status"] == "disabled"


async def test_audit_records_service_writes(
    twins: TwinService, registry: RegistryService, audit: AuditLog
) -> None:
    await make_device(registry)
    await twins.patch("dev1", {"tags": {"a": 1}}, if_match=None, actor=ACTOR)
    await twins.patch("dev1", {}, if_match=None, actor=ACTOR)  # nothing to write, nothing recorded
    records = await audit.query(action_prefix="twin.")
    assert [(r.action, r.target, r.principal) for r in records] == [("twin.update", "dev1", ACTOR)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"properties": {"reported": {"a": 1}}}, "properties.reported"),
        ({"deviceEtag": "x", "bogus": 1}, "bogus"),
        ({"properties": {"weird": {}}}, "properties.weird"),
        ({"properties": {"desired": [1]}}, "properties.desired"),
        ({"tags": "x"}, "tags"),
        ({"deviceId": "someone-else", "tags": {}}, "deviceId"),
        ({"tags": {"a.b": 1}}, "tags.a.b"),
        ({"tags": {"a$": 1}}, "tags.a$"),
        ({"tags": {"a b": 1}}, "tags.a b"),
        ({"tags": {"a\x01": 1}}, "tags.a\\x01"),
        ({"tags": {"": 1}}, "tags."),
        ({"tags": {"k" * 1025: 1}}, "tags." + "k" * 63 + "…"),
        ({"tags": {"x": {"$version": 1}}}, "tags.x.$version"),
        ({"properties": {"desired": {"a": {"$metadata": {}}}}}, "properties.desired.a.$metadata"),
        ({"properties": {"desired": {"s": "x" * 4097}}}, "properties.desired.s"),
        ({"properties": {"desired": {"n": 2**53}}}, "properties.desired.n"),
        ({"properties": {"desired": {"f": float("inf")}}}, "properties.desired.f"),
        ({"properties": {"desired": {"arr": [1, {"bad key": 1}]}}}, "properties.desired.arr[1].bad key"),
    ],
)
async def test_invalid_patches_are_400_naming_the_field(
    twins: TwinService, registry: RegistryService, body: dict[str, Any], field: str
) -> None:
    await make_device(registry)
    with pytest.raises(BadRequest) as err:
        await twins.patch("dev1", body, if_match=None, actor=ACTOR)
    assert err.value.field == field, err.value.message
    assert (await twins.get("dev1"))["version"] == 1  # nothing written


def nested(levels: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"property": "value"}
    for i in range(levels, 0, -1):
        doc = {f"l{i}": doc}
    return doc


async def test_depth_limit_matches_azure(twins: TwinService, registry: RegistryService) -> None:
    await make_device(registry)
    ok = await twins.patch("dev1", {"tags": nested(10)}, if_match=None, actor=ACTOR)  # Azure's own example
    assert ok["version"] == 2
    with pytest.raises(BadRequest) as err:
        await twins.patch("dev1", {"properties": {"desired": nested(11)}}, if_match=None, actor=ACTOR)
    assert err.value.field == "properties.desired." + ".".join(f"l{i}" for i in range(1, 12))
    with pytest.raises(BadRequest) as err:
        await twins.update_reported("dev1", {"a": [[[[[[[[[[[1]]]]]]]]]]]})  # arrays count as levels
    assert err.value.field is not None and err.value.field.startswith("properties.reported.a")


async def test_size_limits_per_section(twins: TwinService, registry: RegistryService) -> None:
    await make_device(registry)
    chunk = "x" * 4000
    await twins.patch("dev1", {"tags": {"a": chunk, "b": chunk}}, if_match=None, actor=ACTOR)  # ~8 KB fits
    with pytest.raises(BadRequest) as err:
        await twins.patch("dev1", {"tags": {"c": "y" * 200}}, if_match=None, actor=ACTOR)
    assert err.value.field == "tags"
    await twins.patch("dev1", {"tags": {"a": None}}, if_match=None, actor=ACTOR)  # shrinking is fine

    desired = {f"k{i}": chunk for i in range(8)}  # 8 * 4002 = 32016 bytes
    await twins.patch("dev1", {"properties": {"desired": desired}}, if_match=None, actor=ACTOR)
    with pytest.raises(BadRequest) as err:
        await twins.patch("dev1", {"properties": {"desired": {"k8": "z" * 800}}}, if_match=None, actor=ACTOR)
    assert err.value.field == "properties.desired"
    with pytest.raises(BadRequest) as err:
        await twins.replace(
            "dev1", {"properties": {"desired": {**desired, "k8": "z" * 800}}}, if_match=None, actor=ACTOR
        )
    assert err.value.field == "properties.desired"

    await twins.update_reported("dev1", desired)
    with pytest.raises(BadRequest) as err:
        await twins.update_reported("dev1", {"more": "z" * 800})
    assert err.value.field == "properties.reported"
    with pytest.raises(BadRequest) as err:
        await twins.update_reported("dev1", {"$version": 3})
    assert err.value.field == "properties.reported.$version"


async def test_device_wire_helpers_for_mqtt(twins: TwinService, registry: RegistryService) -> None:
    await make_device(registry)
    await twins.patch("dev1", {"properties": {"desired": {"rate": 5}}}, if_match=None, actor=ACTOR)
    status, body = await twins.device_get("dev1")
    assert status == 200
    assert json.loads(body) == {"desired": {"rate": 5, "$version": 2}, "reported": {"$version": 1}}
    assert await twins.device_patch_reported("dev1", b'{"fw": "1.0"}') == (204, b"", 2)
    for payload in (b"not json", b"[1]", b'{"a": NaN}', b"\xff", b'{"a.b": 1}', b"[" * 100_000):
        status, body, version = await twins.device_patch_reported("dev1", payload)
        assert status == 400 and version is None and json.loads(body)["errorCode"] == "ArgumentInvalid"
    status, body = await twins.device_get("ghost")
    assert status == 404 and json.loads(body)["errorCode"] == "DeviceNotFound"
    assert (await twins.device_patch_reported("ghost", b"{}"))[0] == 404
    assert (await twins.get_for_device("dev1"))["reported"] == {"fw": "1.0", "$version": 2}
