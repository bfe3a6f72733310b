"""RegistryService on real SQLite and PostgreSQL: Azure PUT/GET/DELETE semantics, validation naming the
field, server-managed fields, status listeners, key regeneration, activity batching, auditing."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from tether.errors import BadRequest, Conflict, NotFound, PreconditionFailed
from tether.registry.models import EPOCH, AuthType, ConnectionState, Device, DeviceStatus
from tether.registry.service import RegistryService, parse_if_match
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
THUMB = "0123456789ABCDEF0123456789ABCDEF01234567"
ACTOR = "policy:iothubowner"


def sas_body(**extra: Any) -> dict[str, Any]:
    return {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B}},
            **extra}


async def bad_field(coro: Any) -> str | None:
    with pytest.raises(BadRequest) as info:
        await coro
    return info.value.field


async def test_create_sets_server_fields_and_keeps_given_keys(registry: RegistryService) -> None:
    device = await registry.create("dev1", sas_body(), actor=ACTOR)
    assert device.device_id == "dev1" and device.status is DeviceStatus.enabled
    assert device.etag and device.generation_id.isdigit() and len(device.generation_id) == 18
    assert device.authentication.symmetric_key.primary_key == KEY_A
    assert device.connection_state is ConnectionState.disconnected
    assert await registry.get("dev1") == device


async def test_create_generates_missing_sas_keys(registry: RegistryService) -> None:
    device = await registry.create("gen", {}, actor=ACTOR)
    keys = device.authentication.symmetric_key
    assert device.authentication.type is AuthType.sas
    assert keys.primary_key and keys.secondary_key and keys.primary_key != keys.secondary_key
    assert len(base64.b64decode(keys.primary_key)) == 32


async def test_create_existing_is_409(registry: RegistryService) -> None:
    await registry.create("dup", {}, actor=ACTOR)
    with pytest.raises(Conflict) as info:
        await registry.create("dup", {}, actor=ACTOR)
    assert info.value.code == "DeviceAlreadyExists" and info.value.http_status == 409


async def test_get_unknown_is_404_and_find_is_none(registry: RegistryService) -> None:
    with pytest.raises(NotFound) as info:
        await registry.get("ghost")
    assert info.value.code == "DeviceNotFound"
    assert await registry.find("ghost") is None
    assert await registry.find("not a valid id!" * 20) is None
    assert await registry.find("nul\x00byte") is None


async def test_server_managed_fields_in_input_are_ignored(registry: RegistryService) -> None:
    body = sas_body(
        etag="client-etag", generationId="123", connectionState="Connected",
        lastActivityTime="2020-01-01T00:00:00Z", cloudToDeviceMessageCount=7,
        statusUpdatedTime="2020-01-01T00:00:00Z", connectionStateUpdatedTime="2020-01-01T00:00:00Z",
        statusReason=None, deviceScope=None,
    )
    device = await registry.create("echo", body, actor=ACTOR)
    assert device.etag != "client-etag" and device.generation_id != "123"
    assert device.connection_state is ConnectionState.disconnected
    assert device.cloud_to_device_message_count == 0 and device.last_activity_time == EPOCH


async def test_sdk_echo_of_fetched_device_replaces_cleanly(registry: RegistryService) -> None:
    created = await registry.create("round", {}, actor=ACTOR)
    wire = created.to_wire()
    wire["status"] = "disabled"
    updated = await registry.replace("round", wire, if_match=f'"{created.etag}"', actor=ACTOR)
    assert updated.status is DeviceStatus.disabled
    assert updated.generation_id == created.generation_id
    assert updated.etag != created.etag
    assert updated.status_updated_time > EPOCH
    assert updated.authentication == created.authentication


@pytest.mark.parametrize(
    ("device_id", "body", "field"),
    [
        ("bad id", {}, "deviceId"),
        ("x" * 129, {}, "deviceId"),
        ("ok", {"deviceId": "other"}, "deviceId"),
        ("ok", {"colour": "red"}, "colour"),
        ("ok", {"authentication": {"symmetricKey": {"primaryKey": "not base64!"}}},
         "authentication.symmetricKey.primaryKey"),
        ("ok", {"authentication": {"symmetricKey": {"primaryKey": base64.b64encode(b"short").decode()}}},
         "authentication.symmetricKey.primaryKey"),
        ("ok", {"statusReason": "r" * 129}, "statusReason"),
        ("ok", {"status": "paused"}, "status"),
        ("ok", {"authentication": {"type": "password"}}, "authentication.type"),
        ("ok", {"authentication": {"type": "selfSigned"}}, "authentication.x509Thumbprint.primaryThumbprint"),
        ("ok", {"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "zz"}}},
         "authentication.x509Thumbprint.primaryThumbprint"),
        ("ok", {"authentication": {"type": "certificateAuthority", "symmetricKey": {"primaryKey": KEY_A}}},
         "authentication.symmetricKey"),
        ("ok", {"authentication": {"type": "sas", "x509Thumbprint": {"primaryThumbprint": THUMB}}},
         "authentication.x509Thumbprint"),
        ("ok", {"capabilities": {"iotEdge": True, "extra": 1}}, "capabilities.extra"),
    ],
)
async def test_invalid_input_is_400_naming_the_field(
    registry: RegistryService, device_id: str, body: dict[str, Any], field: str
) -> None:
    assert await bad_field(registry.create(device_id, body, actor=ACTOR)) == field
    assert await registry.find("ok") is None


async def test_x509_and_none_types(registry: RegistryService) -> None:
    ss = await registry.create(
        "ss", {"authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": THUMB}}},
        actor=ACTOR,
    )
    assert ss.authentication.symmetric_key.primary_key is None
    assert ss.authentication.x509_thumbprint.primary_thumbprint == THUMB
    ca = await registry.create("ca", {"authentication": {"type": "certificateAuthority"}}, actor=ACTOR)
    assert ca.authentication.type is AuthType.certificate_authority
    assert ca.authentication.symmetric_key.primary_key is None
    none = await registry.create("nn", {"authentication": {"type": "none"}}, actor=ACTOR)
    assert none.authentication.type is AuthType.none


async def test_put_semantics(registry: RegistryService) -> None:
    created = await registry.put("p", {}, if_match=None, actor=ACTOR)
    with pytest.raises(Conflict):
        await registry.put("p", {}, if_match=None, actor=ACTOR)
    with pytest.raises(PreconditionFailed):
        await registry.put("p", {"statusReason": "x"}, if_match='"stale"', actor=ACTOR)
    replaced = await registry.put("p", {"statusReason": "x"}, if_match=f'"{created.etag}"', actor=ACTOR)
    assert replaced.status_reason == "x" and replaced.etag != created.etag
    starred = await registry.put("p", {"statusReason": "y"}, if_match='"*"', actor=ACTOR)
    assert starred.status_reason == "y"
    with pytest.raises(NotFound):
        await registry.put("absent", {}, if_match="*", actor=ACTOR)


async def test_replace_without_keys_keeps_existing_keys(registry: RegistryService) -> None:
    created = await registry.create("k", sas_body(), actor=ACTOR)
    replaced = await registry.replace("k", {"statusReason": "r"}, if_match="*", actor=ACTOR)
    assert replaced.authentication.symmetric_key == created.authentication.symmetric_key


async def test_concurrent_replace_with_same_stale_etag_one_wins(registry: RegistryService) -> None:
    created = await registry.create("race", {}, actor=ACTOR)
    results = await asyncio.gather(
        registry.replace("race", {"statusReason": "first"}, if_match=f'"{created.etag}"', actor=ACTOR),
        registry.replace("race", {"statusReason": "second"}, if_match=f'"{created.etag}"', actor=ACTOR),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Device)]
    losers = [r for r in results if isinstance(r, PreconditionFailed)]
    assert len(winners) == 1 and len(losers) == 1
    assert (await registry.get("race")).status_reason == winners[0].status_reason


async def test_delete_semantics_and_listener(registry: RegistryService) -> None:
    gone: list[str] = []

    async def listener(device: Device) -> None:
        gone.append(device.device_id)

    registry.add_status_listener(listener)
    created = await registry.create("del", {}, actor=ACTOR)
    with pytest.raises(PreconditionFailed):
        await registry.delete("del", if_match='"stale"', actor=ACTOR)
    await registry.delete("del", if_match=f'"{created.etag}"', actor=ACTOR)
    assert gone == ["del"]
    with pytest.raises(NotFound):
        await registry.delete("del", if_match="*", actor=ACTOR)
    await registry.create("del2", {}, actor=ACTOR)
    await registry.delete("del2", if_match=None, actor=ACTOR)
    assert await registry.find("del2") is None


async def test_disable_enable_with_listener(registry: RegistryService) -> None:
    events: list[tuple[str, str]] = []

    async def listener(device: Device) -> None:
        events.append((device.device_id, device.status.value))

    async def broken(device: Device) -> None:
        raise RuntimeError("listener bug must not fail the write")

    registry.add_status_listener(broken)
    registry.add_status_listener(listener)
    created = await registry.create("s", {}, actor=ACTOR)
    disabled = await registry.set_status("s", False, reason="stolen", actor=ACTOR)
    assert disabled.status is DeviceStatus.disabled and disabled.status_reason == "stolen"
    assert disabled.etag != created.etag and disabled.status_updated_time > EPOCH
    assert events == [("s", "disabled")]
    enabled = await registry.set_status("s", True, actor=ACTOR)
    assert enabled.enabled and enabled.status_reason is None
    assert events == [("s", "disabled")]  # only disable/delete notify
    assert await bad_field(registry.set_status("s", False, reason="r" * 200, actor=ACTOR)) == "statusReason"
    # A replace that disables also notifies.
    await registry.replace("s", {"status": "disabled"}, if_match="*", actor=ACTOR)
    assert events[-1] == ("s", "disabled")


async def test_regenerate_key(registry: RegistryService) -> None:
    created = await registry.create("rk", sas_body(), actor=ACTOR)
    primary = await registry.regenerate_key("rk", "primary", actor=ACTOR)
    keys = primary.authentication.symmetric_key
    assert keys.primary_key != KEY_A and keys.secondary_key == KEY_B and primary.etag != created.etag
    both = await registry.regenerate_key("rk", "both", actor=ACTOR)
    assert both.authentication.symmetric_key.secondary_key != KEY_B
    assert await registry.get("rk") == both
    assert await bad_field(registry.regenerate_key("rk", "tertiary", actor=ACTOR)) == "which"
    await registry.create("x509", {"authentication": {"type": "certificateAuthority"}}, actor=ACTOR)
    assert await bad_field(registry.regenerate_key("x509", "primary", actor=ACTOR)) == "authentication.type"


async def test_list_and_statistics(registry: RegistryService) -> None:
    for i in range(5):
        await registry.create(f"l{i}", {"status": "disabled" if i == 4 else "enabled"}, actor=ACTOR)
    first = await registry.list(top=2)
    rest = await registry.list(top=10, after=first[-1].device_id)
    assert [d.device_id for d in first + rest] == [f"l{i}" for i in range(5)]
    stats = await registry.statistics()
    assert (stats.total_device_count, stats.enabled_device_count, stats.disabled_device_count) == (5, 4, 1)
    assert await bad_field(registry.list(top=0)) == "top"
    assert await bad_field(registry.list(after="bad\x00id")) == "after"
    assert [d.device_id async for d in registry.export_devices()] == [f"l{i}" for i in range(5)]


async def test_activity_is_batched_and_keeps_the_etag(registry: RegistryService, storage: SqlStorage) -> None:
    created = await registry.create("act", {}, actor=ACTOR)
    await registry.touch("act", connected=True)
    await registry.touch("act")  # activity only: state stays Connected
    # Not written yet, but the service shows its own fresher view.
    stored = await storage.devices.get("act")
    assert stored is not None and stored.connection_state is ConnectionState.disconnected
    assert (await registry.get("act")).connection_state is ConnectionState.connected
    await registry.flush_activity()
    stored = await storage.devices.get("act")
    assert stored is not None
    assert stored.connection_state is ConnectionState.connected and stored.etag == created.etag
    assert stored.last_activity_time > EPOCH and stored.connection_state_updated_time > EPOCH
    await registry.touch("act", connected=False)
    await registry.touch("gone-device", connected=True)  # unknown ids are skipped
    await registry.flush_activity()
    after = await registry.get("act")
    assert after.connection_state is ConnectionState.disconnected and after.etag == created.etag


async def test_every_change_is_audited_without_keys(registry: RegistryService, audit: AuditLog) -> None:
    created = await registry.create("aud", sas_body(), actor=ACTOR)
    await registry.replace("aud", {"statusReason": "r"}, if_match=f'"{created.etag}"', actor=ACTOR)
    await registry.set_status("aud", False, actor=ACTOR)
    await registry.set_status("aud", True, actor=ACTOR)
    await registry.regenerate_key("aud", "secondary", actor=ACTOR)
    await registry.import_devices([{"deviceId": "imp"}], actor=ACTOR)
    await registry.delete("aud", if_match="*", actor=ACTOR)
    records = await audit.query(action_prefix="device.")
    assert [r.action for r in reversed(records)] == [
        "device.create", "device.update", "device.disable", "device.enable",
        "device.regenerate-key", "device.import", "device.delete",
    ]
    assert all(r.outcome == "ok" and r.principal == ACTOR for r in records)
    assert records[0].target == "aud"
    assert KEY_A not in repr(records) and KEY_B not in repr(records)


def test_parse_if_match() -> None:
    assert parse_if_match(None) == (False, None)
    assert parse_if_match("  ") == (False, None)
    assert parse_if_match('"abc="') == (True, "abc=")
    assert parse_if_match('W/"abc"') == (True, "abc")
    assert parse_if_match("abc") == (True, "abc")
    assert parse_if_match('"*"') == (True, None)
    assert parse_if_match("*") == (True, None)
