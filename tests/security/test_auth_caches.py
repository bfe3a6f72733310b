"""The authentication caches end to end: the real `Authenticator` over a real `RegistryService` and
`PolicyService` on SQLite and PostgreSQL. Repeated authentication does not query the database; a
disable or key regeneration made through the services is honoured by the very next attempt; the same
change made by another process (a second service on its own engine) within the cache TTL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event

from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.security.authenticator import Authenticator
from tether.security.policies import PolicyService
from tether.security.principal import AuthRefused, Permission
from tether.security.sas import build_token
from tether.storage.sql import SqlStorage
from tether.storage.sql.engine import Database

HOST = "tether.test"
ACTOR = "policy:iothubowner"
TTL = 2.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """Counts SELECTs per table (devices, policies) executed by one engine."""

    def __init__(self, db: Database) -> None:
        self._engine = db.engine.sync_engine
        self.devices = 0
        self.policies = 0
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        text = statement.lower()
        if not text.lstrip().startswith("select"):
            return
        self.devices += "from devices" in text
        self.policies += "from policies" in text

    def reset(self) -> None:
        self.devices = self.policies = 0

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


@dataclass
class Node:
    registry: RegistryService
    policies: PolicyService
    auth: Authenticator


def make_node(storage: SqlStorage, audit: AuditLog, clock: FakeClock | None = None) -> Node:
    kwargs: dict[str, Any] = {} if clock is None else {"cache_ttl_s": TTL, "clock": clock}
    registry = RegistryService(storage.devices, audit, **kwargs)
    policies = PolicyService(storage.policies, audit, **kwargs)
    auth = Authenticator(hostname=HOST, devices=registry, policies=policies, audit=audit)
    return Node(registry, policies, auth)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reads(storage: SqlStorage) -> Iterator[Reads]:
    counter = Reads(storage.db)
    try:
        yield counter
    finally:
        counter.close()


@pytest.fixture
async def node(storage: SqlStorage, audit: AuditLog, clock: FakeClock) -> Node:
    hub = make_node(storage, audit, clock)
    await hub.policies.ensure_defaults()
    return hub


@pytest.fixture
async def other(db_url: str, storage: SqlStorage) -> AsyncIterator[Node]:
    """Another process on the same database (own engine, own caches with the default TTL)."""
    store = SqlStorage(db_url)
    await store.start()
    audit = AuditLog(store.audit)
    try:
        yield make_node(store, audit)
    finally:
        await audit.close()
        await store.close()


def device_token(device_id: str, key: str) -> str:
    return build_token(f"{HOST}/devices/{device_id}", key, int(time.time()) + 3600)


def service_token(policy: str, key: str) -> str:
    return build_token(HOST, key, int(time.time()) + 3600, policy)


async def device_ok(node: Node, device_id: str, key: str) -> bool:
    try:
        await node.auth.device_sas(device_token(device_id, key), device_id, surface="mqtt")
    except AuthRefused:
        return False
    return True


async def refused(node: Node, device_id: str, key: str) -> str:
    with pytest.raises(AuthRefused) as info:
        await node.auth.device_sas(device_token(device_id, key), device_id, surface="mqtt")
    return info.value.reason


async def service_ok(node: Node, policy: str, key: str) -> bool:
    try:
        await node.auth.service(service_token(policy, key), required=Permission.service_connect,
                                surface="rest")
    except AuthRefused:
        return False
    return True


async def primary_key(node: Node, device_id: str) -> str:
    key = (await node.registry.get(device_id)).authentication.symmetric_key.primary_key
    assert key is not None
    return key


async def test_repeated_device_auth_reads_the_device_once(node: Node, reads: Reads) -> None:
    await node.registry.create("dev1", {}, actor=ACTOR)
    key = await primary_key(node, "dev1")  # get() reads the database and refreshes the cache
    reads.reset()
    for _ in range(30):
        assert await device_ok(node, "dev1", key)
    assert reads.devices == 0
    node.registry.invalidate("dev1")
    for _ in range(30):
        assert await device_ok(node, "dev1", key)
    assert reads.devices == 1


async def test_disable_through_the_service_refuses_the_next_connect(node: Node) -> None:
    await node.registry.create("dev1", {}, actor=ACTOR)
    key = await primary_key(node, "dev1")
    assert await device_ok(node, "dev1", key)
    await node.registry.set_status("dev1", False, actor=ACTOR)
    assert await refused(node, "dev1", key) == "device-disabled"
    await node.registry.set_status("dev1", True, actor=ACTOR)
    assert await device_ok(node, "dev1", key)
    await node.registry.delete("dev1", if_match=None, actor=ACTOR)
    assert await refused(node, "dev1", key) == "unknown-device"


async def test_regenerated_key_refuses_the_old_key_at_once(node: Node) -> None:
    await node.registry.create("dev1", {}, actor=ACTOR)
    old = await primary_key(node, "dev1")
    assert await device_ok(node, "dev1", old)
    renewed = await node.registry.regenerate_key("dev1", "primary", actor=ACTOR)
    new = renewed.authentication.symmetric_key.primary_key
    assert new is not None and new != old
    assert await refused(node, "dev1", old) == "bad-signature"  # no get() in between: the write did it
    assert await device_ok(node, "dev1", new)


async def test_key_regenerated_by_another_process_is_honoured_within_the_ttl(
    node: Node, other: Node, clock: FakeClock
) -> None:
    await node.registry.create("dev1", {}, actor=ACTOR)
    old = await primary_key(node, "dev1")
    assert await device_ok(node, "dev1", old)
    await other.registry.regenerate_key("dev1", "primary", actor=ACTOR)
    new = await primary_key(other, "dev1")
    clock.now += TTL / 2
    assert await device_ok(node, "dev1", old)  # the documented bound: still cached
    clock.now += TTL / 2 + 0.01
    assert await refused(node, "dev1", old) == "bad-signature"
    assert await device_ok(node, "dev1", new)


async def test_device_created_elsewhere_connects_after_the_negative_ttl(
    node: Node, other: Node, clock: FakeClock, reads: Reads
) -> None:
    reads.reset()
    for _ in range(10):
        assert await refused(node, "late", "a2V5") == "unknown-device"
    assert reads.devices == 1
    await other.registry.create("late", {}, actor=ACTOR)
    key = await primary_key(other, "late")
    assert not await device_ok(node, "late", key)
    clock.now += 1.01
    assert await device_ok(node, "late", key)


async def test_repeated_service_auth_reads_the_policies_once(node: Node, reads: Reads) -> None:
    owner = await node.policies.get("iothubowner")
    reads.reset()
    for i in range(30):
        assert await service_ok(node, "iothubowner", owner.primary_key)
        assert not await service_ok(node, f"nosuch{i}", owner.primary_key)  # unknown names: no query
    assert reads.policies == 0  # all policies were loaded by get() above
    assert (await node.policies.get("service")).name == "service" and reads.policies == 0
    node.policies.invalidate()
    for _ in range(30):
        assert await service_ok(node, "iothubowner", owner.primary_key)
    assert reads.policies == 1


async def test_policy_changes_through_the_service_apply_at_once(node: Node) -> None:
    owner = await node.policies.get("iothubowner")
    assert await service_ok(node, "iothubowner", owner.primary_key)
    renewed = await node.policies.regenerate_key("iothubowner", "primary", actor=ACTOR)
    assert not await service_ok(node, "iothubowner", owner.primary_key)
    assert await service_ok(node, "iothubowner", renewed.primary_key)
    assert (await node.policies.get("iothubowner")).primary_key == renewed.primary_key
    created = await node.policies.create("ops", ["ServiceConnect"], actor=ACTOR)
    assert await service_ok(node, "ops", created.secondary_key)
    await node.policies.delete("ops", actor=ACTOR)
    assert not await service_ok(node, "ops", created.secondary_key)
    assert await node.policies.find("ops") is None


async def test_policy_changes_by_another_process_apply_after_the_ttl(
    node: Node, other: Node, clock: FakeClock
) -> None:
    service = await node.policies.get("service")
    assert await service_ok(node, "service", service.primary_key)
    renewed = await other.policies.regenerate_key("service", "both", actor=ACTOR)
    created = await other.policies.create("ops", ["ServiceConnect"], actor=ACTOR)
    clock.now += TTL - 0.01
    assert await service_ok(node, "service", service.primary_key)  # within the bound
    assert not await service_ok(node, "ops", created.primary_key)
    clock.now += 0.02
    assert not await service_ok(node, "service", service.primary_key)
    assert await service_ok(node, "service", renewed.primary_key)
    assert await service_ok(node, "ops", created.primary_key)
    await other.policies.delete("ops", actor=ACTOR)
    node.policies.invalidate()  # e.g. told by the cluster bus
    assert not await service_ok(node, "ops", created.primary_key)


async def test_regenerate_reads_fresh_and_never_reverts_another_process_key(
    node: Node, other: Node
) -> None:
    before = await node.policies.get("service")  # cached here
    theirs = await other.policies.regenerate_key("service", "primary", actor=ACTOR)
    ours = await node.policies.regenerate_key("service", "secondary", actor=ACTOR)
    assert ours.primary_key == theirs.primary_key != before.primary_key
    stored = await other.policies.find("service")
    assert stored is not None and stored.secondary_key == ours.secondary_key


async def test_policy_cache_disabled_with_ttl_zero(
    storage: SqlStorage, audit: AuditLog, reads: Reads
) -> None:
    policies = PolicyService(storage.policies, audit, cache_ttl_s=0)
    await policies.ensure_defaults()
    reads.reset()
    for _ in range(3):
        assert await policies.find("service") is not None
    assert reads.policies == 3
