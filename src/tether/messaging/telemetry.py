"""Device-to-cloud telemetry: turn what a device sent into a stream event, the same for every protocol.

A protocol adapter hands over the authenticated `Principal`, the body and the device's properties
(system keys as in the MQTT property bag: `$.mid`, `$.cid`, …, and application properties).
This module maps the `$.` keys to Event Hubs system property names, adds the hub's `iothub-*`
annotations (which a device can never set: they are written last, into the system properties),
owns the per-device rate limit and the size limit, and appends to the stream. `append` returns once
the event is durable.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether.config import LimitSettings
from tether.messaging.events import EventData, EventStream
from tether.observability.metrics import MESSAGES_IN, MESSAGES_IN_BYTES
from tether.security.principal import CredentialKind, Principal

__all__ = [
    "SYSTEM_PROPERTY_NAMES",
    "DeviceRateLimiter",
    "TelemetryPipeline",
    "auth_method",
    "build_properties",
    "enqueued_time",
]

SYSTEM_PROPERTY_NAMES: Mapping[str, str] = {
    "$.mid": "message-id",
    "$.cid": "correlation-id",
    "$.ct": "content-type",
    "$.ce": "content-encoding",
    "$.uid": "user-id",
    "$.to": "to",
    "$.exp": "absolute-expiry-time",
    "$.ctime": "iothub-creation-time-utc",
    "$.on": "iothub-outputname",
    "$.ifid": "iothub-interface-id",
    "$.sub": "dt-subject",
}
"""Device-settable system properties: MQTT property-bag key → Event Hubs annotation name."""

CONNECTION_DEVICE_ID = "iothub-connection-device-id"
CONNECTION_MODULE_ID = "iothub-connection-module-id"
CONNECTION_AUTH_METHOD = "iothub-connection-auth-method"
ENQUEUED_TIME = "iothub-enqueuedtime"
MESSAGE_SOURCE = "iothub-message-source"
DATA_SCHEMA = "dt-dataschema"


def _auth_json(scope: str, kind: str, issuer: str) -> str:
    return json.dumps({"scope": scope, "type": kind, "issuer": issuer}, separators=(",", ":"))


_AUTH_METHODS: Mapping[CredentialKind, str] = {
    CredentialKind.device_key: _auth_json("device", "sas", "iothub"),
    CredentialKind.policy_device_token: _auth_json("hub", "sas", "iothub"),
    CredentialKind.x509_self_signed: _auth_json("device", "x509Certificate", "external"),
    CredentialKind.x509_ca: _auth_json("device", "x509CA", "external"),
    CredentialKind.token_service: _auth_json("device", "sas", "external"),
    CredentialKind.policy: _auth_json("hub", "sas", "iothub"),
}


def auth_method(credential: CredentialKind) -> str:
    """Azure's `iothub-connection-auth-method` JSON for a credential kind."""
    return _AUTH_METHODS[credential]


def enqueued_time(now: float) -> str:
    """ISO 8601 UTC with milliseconds, as Azure writes `iothub-enqueuedtime`."""
    seconds = int(now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((now - seconds) * 1000):03d}Z"


def build_properties(
    principal: Principal,
    system_bag: Mapping[str, str],
    app_bag: Mapping[str, str],
    *,
    now: float,
    model_id: str | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """(application properties, system properties) for one message.

    `system_bag` holds the device's `$.` keys: known ones become Event Hubs system properties, an
    unknown `$.x` stays an application property so nothing a device sent is lost. The
    `iothub-connection-*` annotations come from the principal and are written last: a device can
    never set them."""
    app = dict(app_bag)
    system: dict[str, str] = {}
    for key, value in system_bag.items():
        name = SYSTEM_PROPERTY_NAMES.get(key)
        if name is None:
            app[key] = value
        else:
            system[name] = value
    if model_id:
        system[DATA_SCHEMA] = model_id
    system[CONNECTION_DEVICE_ID] = principal.device_id or ""
    if principal.module_id:
        system[CONNECTION_MODULE_ID] = principal.module_id
    system[CONNECTION_AUTH_METHOD] = _AUTH_METHODS[principal.credential]
    system[ENQUEUED_TIME] = enqueued_time(now)
    system[MESSAGE_SOURCE] = "Telemetry"
    return app, system


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class DeviceRateLimiter:
    """Token bucket per identity: `rate` messages/s sustained, bursts up to `burst` (2 × rate).

    Idle buckets (refilled to full) are forgotten when the table grows, so memory follows the number
    of recently active devices, not the registry size."""

    _PRUNE_AT = 4096

    def __init__(self, rate: float, *, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2.0 * rate)
        self._clock = clock
        self._buckets: dict[tuple[str, str | None], _Bucket] = {}
        self._prune_at = self._PRUNE_AT

    def allow(self, device_id: str, module_id: str | None = None, cost: float = 1.0) -> bool:
        now = self._clock()
        key = (device_id, module_id)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens < cost:
            return False
        bucket.tokens -= cost
        return True

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.stamp < full_after}
        self._prune_at = max(self._PRUNE_AT, 2 * len(self._buckets))


class TelemetryPipeline:
    """The hub's telemetry ingress: limits plus `EventStream.append`; shared by every protocol."""

    def __init__(
        self,
        stream: EventStream,
        limits: LimitSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stream = stream
        self.max_message_bytes = limits.max_d2c_message_bytes
        self.rate_limiter = DeviceRateLimiter(limits.device_messages_per_second)
        self._clock = clock
        self._counters: dict[str, tuple[Any, Any]] = {}  # protocol → (messages, bytes) children

    def too_large(self, body: bytes) -> bool:
        return len(body) > self.max_message_bytes

    def allow(self, principal: Principal) -> bool:
        """Charge one message to the identity's rate bucket; False means over the limit."""
        return self.rate_limiter.allow(principal.device_id or "", principal.module_id)

    async def append(
        self,
        principal: Principal,
        body: bytes,
        system_bag: Mapping[str, str],
        app_bag: Mapping[str, str],
        *,
        protocol: str,
        model_id: str | None = None,
    ) -> EventData:
        """Build the event and append it; returns once durable. Limits are the caller's to check
        first (it must answer the device in its protocol's way)."""
        app, system = build_properties(
            principal, system_bag, app_bag, now=self._clock(), model_id=model_id
        )
        event = await self.stream.append(
            principal.device_id or "",
            body,
            module_id=principal.module_id,
            properties=app,
            system_properties=system,
        )
        counters = self._counters.get(protocol)
        if counters is None:
            counters = (MESSAGES_IN.labels(protocol), MESSAGES_IN_BYTES.labels(protocol))
            self._counters[protocol] = counters
        counters[0].inc()
        counters[1].inc(len(body))
        return event
