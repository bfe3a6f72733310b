"""ModuleService over real storage (SQLite and PostgreSQL): the cached identity lookup the
authenticator uses, listeners and relays, activity, and the module twins it owns with TwinService."""

from __future__ import annotations

from typing import Any

import pytest

from tether.errors import NotFound
from tether.messaging.twins import TwinService
from tether.registry.models import ConnectionState
from tether.registry.modules import ModuleService
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.twins import SqlTwinRepository

ACTOR = "policy:test"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def modules(storage: SqlStorage, registry: RegistryService, audit: AuditLog, clock: Clock) -> ModuleService:
    return ModuleService(storage.modules, registry, audit, clock=clock)


async def with_device(registry: RegistryService, device_id: str = "dev") -> None:
    await registry.create(device_id, {}, actor=ACTOR)


async def test_find_module_is_cached_and_writes_drop_the_entry(
    modules: ModuleService, registry: RegistryService, storage: SqlStorage, clock: Clock
) -> None:
    await with_device(registry)
    created = await modules.create("dev", "m", {}, actor=ACTOR)
    identity = await modules.find_module("dev", "m")
    assert identity is not None and (identity.device_id, identity.module_id) == ("dev", "m")
    assert identity.authentication == created.authentication and identity.enabled
    # A write behind the service's back (another process) is seen once the TTL has passed.
    await storage.modules.delete("dev", "m", None)
    assert await modules.find_module("dev", "m") is not None
    clock.now += 10
    assert await modules.find_module("dev", "m") is None
    # This service's own writes are seen at once.
    await modules.create("dev", "m", {}, actor=ACTOR)
    first = await modules.find_module("dev", "m")
    rotated = await modules.regenerate_key("dev", "m", "both", actor=ACTOR)
    second = await modules.find_module("dev", "m")
    assert first is not None and second is not None
    assert second.authentication == rotated.authentication != first.authentication
    await modules.delete("dev", "m", if_match="*", actor=ACTOR)
    assert await modules.find_module("dev", "m") is None
    for bad in (("dev/x", "m"), ("dev", ""), ("dev", "a" * 200)):
        assert await modules.find_module(*bad) is None


async def test_deleting_the_device_forgets_its_cached_modules(modules: ModuleService,
                                                              registry: RegistryService) -> None:
    await with_device(registry)
    await modules.create("dev", "m", {}, actor=ACTOR)
    assert await modules.find_module("dev", "m") is not None
    await registry.delete("dev", if_match="*", actor=ACTOR)
    assert await modules.find_module("dev", "m") is None
    with pytest.raises(NotFound) as info:
        await modules.get("dev", "m")
    assert info.value.code == "DeviceNotFound"


async def test_listeners_relays_and_deletes_elsewhere(modules: ModuleService, registry: RegistryService,
                                                      storage: SqlStorage) -> None:
    await with_device(registry)
    heard: list[tuple[str, str, str]] = []
    written: list[list[tuple[str, str]]] = []

    async def listener(device_id: str, module_id: str) -> None:
        heard.append(("listener", device_id, module_id))

    async def relay(device_id: str, module_id: str) -> None:
        heard.append(("relay", device_id, module_id))

    async def broken(device_id: str, module_id: str) -> None:
        raise RuntimeError("a listener's bug")

    modules.add_listener(broken)
    modules.add_listener(listener)
    modules.add_relay(relay)
    modules.add_write_relay(written.append)
    await modules.create("dev", "m", {}, actor=ACTOR)
    await modules.replace("dev", "m", {"managedBy": "x"}, if_match="*", actor=ACTOR)
    await modules.delete("dev", "m", if_match=None, actor=ACTOR)
    assert heard == [("relay", "dev", "m"), ("listener", "dev", "m")]
    assert written == [[("dev", "m")]] * 3
    heard.clear()
    await modules.create("dev", "n", {}, actor=ACTOR)
    assert await modules.find_module("dev", "n") is not None  # cached now
    await storage.modules.delete("dev", "n", None)  # another node deleted it ...
    await modules.deleted_elsewhere("dev", "n")  # ... and the cluster bus says so
    assert heard == [("listener", "dev", "n")]  # listeners only, never relays
    assert await modules.find_module("dev", "n") is None  # at once, not after the cache TTL


async def test_module_activity_is_buffered_by_the_registry(modules: ModuleService, registry: RegistryService,
                                                           storage: SqlStorage) -> None:
    await with_device(registry)
    await modules.create("dev", "m", {}, actor=ACTOR)
    await registry.touch("dev", "m", connected=True)
    assert (await modules.get("dev", "m")).connection_state is ConnectionState.connected  # overlay
    stored = await storage.modules.get("dev", "m")
    assert stored is not None and stored.connection_state is ConnectionState.disconnected
    await registry.flush_activity()
    stored = await storage.modules.get("dev", "m")
    assert stored is not None and stored.connection_state is ConnectionState.connected
    assert (await registry.get("dev")).connection_state is ConnectionState.disconnected
    listed = await modules.list("dev")
    assert [m.connection_state for m in listed] == [ConnectionState.connected]
    await registry.touch("dev", "m", connected=False)
    await modules.delete("dev", "m", if_match="*", actor=ACTOR)
    assert len(registry.activity) == 0  # a deleted module's pending activity goes with it


async def test_module_twins_and_their_desired_listeners(storage: SqlStorage, registry: RegistryService,
                                                        audit: AuditLog, modules: ModuleService) -> None:
    twins = TwinService(SqlTwinRepository(storage.db), registry, audit, modules=modules)
    notices: list[tuple[str, str | None, dict[str, Any]]] = []

    async def listener(device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        notices.append((device_id, module_id, patch))

    twins.add_desired_listener(listener)
    await with_device(registry)
    await modules.create("dev", "m", {}, actor=ACTOR)
    await twins.patch("dev", {"properties": {"desired": {"a": 1}}}, module_id="m", if_match=None, actor=ACTOR)
    await twins.patch("dev", {"properties": {"desired": {"b": 1}}}, if_match=None, actor=ACTOR)
    assert notices == [("dev", "m", {"a": 1, "$version": 2}), ("dev", None, {"b": 1, "$version": 2})]
    assert await twins.update_reported("dev", {"fw": 1}, "m") == 2
    assert await twins.device_get("dev", "m") == (200, b'{"desired":{"a":1,"$version":2},'
                                                        b'"reported":{"fw":1,"$version":2}}')
    status, body, version = await twins.device_patch_reported("dev", b"[1]", "m")
    assert (status, version) == (400, None) and b"errorCode" in body
    status, body = await twins.device_get("dev", "ghost")
    assert status == 404 and b"ModuleNotFound" in body
    assert [t["moduleId"] for t in await twins.scan_modules()] == ["m"]
    await modules.delete("dev", "m", if_match="*", actor=ACTOR)
    assert await storage.twins.get("dev", "m") is None
    assert await twins.scan_modules() == []
