"""The protocol-independent pieces under the MQTT session: event properties, the per-device rate
limit, and the presence registry (replacement, drop, epochs, socket admission)."""

from __future__ import annotations

import asyncio
import json

from tether.messaging.presence import ConnectionRegistry
from tether.messaging.telemetry import DeviceRateLimiter, auth_method, build_properties, enqueued_time
from tether.security.principal import CredentialKind, Permission, Principal, PrincipalKind


def device(credential: CredentialKind = CredentialKind.device_key, module: str | None = None) -> Principal:
    return Principal(PrincipalKind.module if module else PrincipalKind.device, credential, "dev1", module,
                     permissions=frozenset({Permission.device_connect}))


def test_system_properties_are_mapped_and_annotations_added() -> None:
    system = {"$.mid": "m1", "$.cid": "c1", "$.ct": "application/json", "$.ce": "utf-8", "$.uid": "u",
              "$.to": "/x", "$.exp": "2030-01-01T00:00:00Z", "$.ctime": "2026-01-01T00:00:00Z", "$.zz": "?"}
    app, sys_props = build_properties(device(), system, {"alert": "hot"}, now=1_700_000_000.5,
                                      model_id="dtmi:x;1")
    assert app == {"alert": "hot", "$.zz": "?"}  # an unknown $. key is kept, as an app property
    assert sys_props["message-id"] == "m1" and sys_props["correlation-id"] == "c1"
    assert sys_props["content-type"] == "application/json" and sys_props["content-encoding"] == "utf-8"
    assert sys_props["user-id"] == "u" and sys_props["to"] == "/x"
    assert sys_props["absolute-expiry-time"] == "2030-01-01T00:00:00Z"
    assert sys_props["iothub-creation-time-utc"] == "2026-01-01T00:00:00Z"
    assert sys_props["dt-dataschema"] == "dtmi:x;1"
    assert sys_props["iothub-connection-device-id"] == "dev1"
    assert "iothub-connection-module-id" not in sys_props
    assert json.loads(sys_props["iothub-connection-auth-method"]) == {
        "scope": "device", "type": "sas", "issuer": "iothub"}
    assert sys_props["iothub-enqueuedtime"] == "2023-11-14T22:13:20.500Z"
    assert sys_props["iothub-message-source"] == "Telemetry"


def test_a_device_cannot_spoof_the_connection_annotations() -> None:
    app, sys_props = build_properties(device(module="m1"), {}, {"iothub-connection-device-id": "evil"}, now=0)
    assert sys_props["iothub-connection-device-id"] == "dev1"
    assert sys_props["iothub-connection-module-id"] == "m1"
    assert app == {"iothub-connection-device-id": "evil"}  # stays an application property


def test_auth_method_per_credential() -> None:
    assert json.loads(auth_method(CredentialKind.policy_device_token))["scope"] == "hub"
    assert json.loads(auth_method(CredentialKind.x509_self_signed))["type"] == "x509Certificate"
    assert json.loads(auth_method(CredentialKind.x509_ca))["type"] == "x509CA"
    assert json.loads(auth_method(CredentialKind.device_key, module=True)) == {
        "scope": "module", "type": "sas", "issuer": "iothub"}  # a module's own key, as Azure says
    assert json.loads(auth_method(CredentialKind.policy_device_token, module=True))["scope"] == "hub"
    assert enqueued_time(0) == "1970-01-01T00:00:00.000Z"


def test_rate_limiter_allows_a_burst_of_twice_the_rate_then_the_rate() -> None:
    now = [100.0]
    limiter = DeviceRateLimiter(10, clock=lambda: now[0])
    assert sum(limiter.allow("d") for _ in range(50)) == 20  # burst = 2 x rate
    assert limiter.allow("other")  # buckets are per identity
    now[0] += 0.5
    assert sum(limiter.allow("d") for _ in range(50)) == 5
    now[0] += 100
    assert sum(limiter.allow("d") for _ in range(50)) == 20  # refills to the burst, not beyond


def test_rate_limiter_forgets_idle_devices() -> None:
    now = [0.0]
    limiter = DeviceRateLimiter(1000, clock=lambda: now[0])
    for i in range(10_000):
        limiter.allow(f"d{i}")
        now[0] += 0.001
    assert len(limiter._buckets) < 8192


class Handle:
    protocol = "test"

    def __init__(self) -> None:
        self.closed: list[str] = []

    async def close(self, reason: str) -> None:
        self.closed.append(reason)

    def deliver(self, topic: str, payload: bytes, *, qos: int = 1) -> asyncio.Future[None]:
        raise NotImplementedError


async def test_registry_replaces_drops_and_counts() -> None:
    reg = ConnectionRegistry(max_connections=2)
    first, second, module = Handle(), Handle(), Handle()
    assert await reg.register("d", None, first) is None
    assert await reg.register("d", "m", module) is None
    assert await reg.register("d", None, second) is first
    assert first.closed == ["connection-replaced"] and len(reg) == 2
    assert not reg.unregister("d", None, first)  # a replaced handle no longer owns the identity
    assert reg.get("d") is second
    epoch = reg.epoch("d")
    assert await reg.drop("d", "device-disabled") == 2
    assert second.closed == module.closed == ["device-disabled"]
    assert reg.epoch("d") == epoch + 1
    assert reg.unregister("d", None, second) and reg.unregister("d", "m", module)
    assert len(reg) == 0 and reg.get("d") is None
    assert reg.admit() and reg.admit() and not reg.admit()
    reg.release()
    assert reg.admit()
