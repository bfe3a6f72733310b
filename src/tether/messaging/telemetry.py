"""Device-to-cloud telemetry: turn what a device sent into a stream event, the same for every protocol.

A protocol adapter hands over the authenticated `Principal`, the body and the device's properties
(system keys as in the MQTT property bag: `$.mid`, `$.cid`, …, and application properties).
This module maps the `$.` keys to Event Hubs system property names, adds the hub's `iothub-*`
annotations (which a device can never set: they are written last, into the system properties),
owns the per-device rate limit and the size limit, and appends to the stream. `append` returns once
the event is durable.
"""

from __future__ import annotations

import asyncio
import functools
import json
import json.encoder
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from tether.config import LimitSettings
from tether.errors import BadRequest
from tether.messaging.events import EventData, EventStream
from tether.observability.metrics import MESSAGES_IN, MESSAGES_IN_BYTES
from tether.security.principal import CredentialKind, Principal
from tether.storage.stream.base import EncodedProperties

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
    # People never connect as devices; mapped only so every credential kind has an answer.
    CredentialKind.oidc: _auth_json("hub", "token", "external"),
    CredentialKind.session: _auth_json("hub", "token", "iothub"),
    CredentialKind.password: _auth_json("hub", "token", "iothub"),
}


_MODULE_AUTH_METHODS: Mapping[CredentialKind, str] = {
    kind: text.replace('"scope":"device"', '"scope":"module"') for kind, text in _AUTH_METHODS.items()
}


def auth_method(credential: CredentialKind, *, module: bool = False) -> str:
    """Azure's `iothub-connection-auth-method` JSON for a credential kind; a module's own key or
    certificate has scope "module" (a policy token stays "hub")."""
    return (_MODULE_AUTH_METHODS if module else _AUTH_METHODS)[credential]


_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


class _SecondCache:
    """The formatted second of the last message: `strftime` per message was 0.33 s of an 8 s profile."""

    second = -1
    text = ""


def enqueued_time(now: float) -> str:
    """ISO 8601 UTC with milliseconds, as Azure writes `iothub-enqueuedtime`."""
    seconds = int(now)
    millis = int((now - seconds) * 1000)
    if seconds != _SecondCache.second:
        _SecondCache.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _SecondCache.second = seconds
    if 0 <= millis < 1000:
        return _SecondCache.text + _MILLIS[millis]
    return f"{_SecondCache.text}.{millis:03d}Z"  # before 1970: keeps the historical output


# --- the system properties' JSON, built with the dict (the stream stores it as is) ----------------
_json_str = json.encoder.encode_basestring  # what the log's encoder writes (UTF-8, not ASCII-escaped)
_KEY_JSON: Mapping[str, str] = {name: _json_str(name) + ":"
                                for name in (*SYSTEM_PROPERTY_NAMES.values(), DATA_SCHEMA)}
_TIME_TAIL = '",' + _json_str(MESSAGE_SOURCE) + ':"Telemetry"}'
CONNECTION_CACHE = 1 << 14  # identities whose annotations are kept encoded (cleared when full)


class _Connection(NamedTuple):
    """The `iothub-connection-*` annotations of one identity, and their JSON up to the enqueued time."""

    device_id: str
    module_id: str | None
    auth_method: str
    json: str  # '"iothub-connection-device-id":"d",…,"iothub-enqueuedtime":"'


_connections: dict[tuple[str | None, str | None, CredentialKind], _Connection] = {}


def _connection(principal: Principal) -> _Connection:
    key = (principal.device_id, principal.module_id, principal.credential)
    found = _connections.get(key)
    if found is None:
        if len(_connections) >= CONNECTION_CACHE:
            _connections.clear()
        device, module = principal.device_id or "", principal.module_id or None
        auth = auth_method(key[2], module=module is not None)
        items = [(CONNECTION_DEVICE_ID, device), *([(CONNECTION_MODULE_ID, module)] if module else []),
                 (CONNECTION_AUTH_METHOD, auth), (ENQUEUED_TIME, "")]
        encoded = ",".join(f"{_json_str(k)}:{_json_str(v)}" for k, v in items)
        found = _connections[key] = _Connection(device, module, auth, encoded[:-1])  # open quote kept
    return found


def build_properties(
    principal: Principal,
    system_bag: Mapping[str, str],
    app_bag: Mapping[str, str],
    *,
    now: float,
    model_id: str | None = None,
) -> tuple[dict[str, str], EncodedProperties]:
    """(application properties, system properties) for one message.

    `system_bag` holds the device's `$.` keys: known ones become Event Hubs system properties, an
    unknown `$.x` stays an application property so nothing a device sent is lost. The
    `iothub-connection-*` annotations come from the principal and are written last: a device can
    never set them.

    The system properties come back as `EncodedProperties`: their JSON is built alongside, from the
    identity's cached annotation JSON, so the stream does not encode them again."""
    app = dict(app_bag)
    system = EncodedProperties()
    parts: list[str] = []
    for key, value in system_bag.items():
        name = SYSTEM_PROPERTY_NAMES.get(key)
        if name is None:
            app[key] = value
        else:
            system[name] = value
            parts.append(_KEY_JSON[name] + _json_str(value))
    if model_id:
        system[DATA_SCHEMA] = model_id
        parts.append(_KEY_JSON[DATA_SCHEMA] + _json_str(model_id))
    conn = _connection(principal)
    system[CONNECTION_DEVICE_ID] = conn.device_id
    if conn.module_id:
        system[CONNECTION_MODULE_ID] = conn.module_id
    system[CONNECTION_AUTH_METHOD] = conn.auth_method
    system[ENQUEUED_TIME] = stamp = enqueued_time(now)
    system[MESSAGE_SOURCE] = "Telemetry"
    parts.append(conn.json + stamp + _TIME_TAIL)
    try:
        system.encoded = ("{" + ",".join(parts)).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("message properties must be Unicode text (no lone surrogates)",
                         field="properties") from None
    for key, value in app.items():  # encoded later by the stream: refuse now what it could not encode
        if not (key.isascii() and value.isascii()):
            _check_encodable(key, value)
    return app, system


def _check_encodable(*texts: str) -> None:
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("message properties must be Unicode text (no lone surrogates)",
                         field="properties") from None


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
        # the embedded log's future-returning append: no coroutine per message
        self._append_nowait: Callable[..., asyncio.Future[EventData]] | None = getattr(
            stream, "append_nowait", None)
        self._counted: dict[str, list[int]] = {}  # protocol → [messages, bytes] not yet in the counters
        # the latest append group and its [messages, bytes], counted once the group is durable
        self._tally: tuple[asyncio.Future[EventData], list[int]] | None = None
        self._flush_scheduled = False

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
        if self._append_nowait is not None:
            event = await self._append_nowait(principal.device_id or "", body, module_id=principal.module_id,
                                              properties=app, system_properties=system)
        else:
            event = await self.stream.append(principal.device_id or "", body, module_id=principal.module_id,
                                             properties=app, system_properties=system)
        self._count(protocol, len(body))
        return event

    def append_nowait(
        self,
        principal: Principal,
        body: bytes,
        system_bag: Mapping[str, str],
        app_bag: Mapping[str, str],
        *,
        protocol: str,
        model_id: str | None = None,
        join: asyncio.Future[EventData] | None = None,
    ) -> asyncio.Future[EventData]:
        """`append` without a Task per message where the stream allows it (the embedded log): the
        event is queued now and the future resolves once it is durable. Must run on the event loop.
        `join`: the future of this identity's previous append on the same loop turn; the stream may
        return it again, the event then belongs to that group (`LocalEventStream.append_nowait`)."""
        if self._append_nowait is None:
            return asyncio.ensure_future(self.append(principal, body, system_bag, app_bag, protocol=protocol,
                                                     model_id=model_id))
        app, system = build_properties(
            principal, system_bag, app_bag, now=self._clock(), model_id=model_id
        )
        future = self._append_nowait(principal.device_id or "", body, module_id=principal.module_id,
                                     properties=app, system_properties=system, join=join)
        tally = self._tally
        if tally is None or tally[0] is not future:  # a new group: count it once it is durable
            tally = self._tally = (future, [0, 0])
            future.add_done_callback(functools.partial(self._count_done, protocol, tally[1]))
        tally[1][0] += 1
        tally[1][1] += len(body)
        return future

    def _count_done(self, protocol: str, counts: list[int], future: asyncio.Future[EventData]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._count(protocol, counts[1], counts[0])

    def _count(self, protocol: str, size: int, messages: int = 1) -> None:
        """Count one durable message. The Prometheus counters (a lock each) are updated once per loop
        turn for all messages of that turn: per message they were 0.28 s of an 8 s ingest profile."""
        counted = self._counted.get(protocol)
        if counted is None:
            counted = self._counted[protocol] = [0, 0]
            MESSAGES_IN.labels(protocol)  # the series exists from the first message on
            MESSAGES_IN_BYTES.labels(protocol)
        counted[0] += messages
        counted[1] += size
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_counts)

    def flush_counts(self) -> None:
        """Move the messages counted since the last flush into the Prometheus counters."""
        self._flush_scheduled = False
        for protocol, counted in self._counted.items():
            if counted[0]:
                MESSAGES_IN.labels(protocol).inc(counted[0])
                MESSAGES_IN_BYTES.labels(protocol).inc(counted[1])
                counted[0] = counted[1] = 0
