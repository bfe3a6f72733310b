"""Azure's device HTTPS surface: telemetry in, C2D messages out, authenticated as the DEVICE (module
telemetry: `POST /devices/{id}/modules/{mid}/messages/events`, authenticated as that MODULE).

A request carries `Authorization: SharedAccessSignature …` (device key, or a DeviceConnect policy
token scoped to the device) or, without that header, the mutual-TLS client chain of the connection
(`peercert_chain` from Tether's TLS layer). The authenticator is called with the device id of the
path, so a credential for another device is refused there (401, or 403 for a policy without
DeviceConnect) and audited as `auth.https`.

Telemetry goes through the same `TelemetryPipeline` as MQTT (limits, `iothub-*` annotations,
durable append) and is answered 204 only once durable. An oversize body (413) or a rate-limit overrun
(429) is audited like the MQTT surface's refusals (`https.events`, outcome `refused`, reason
`message-too-large` | `rate-limited`); since an HTTP client, unlike an MQTT one, is not disconnected, a
`RefusalDigest` writes at most one record per identity and reason per second, carrying how many were
`suppressed` since the previous one. C2D receive locks the oldest visible message
(`ETag` = lock token); the device completes it (DELETE), rejects it (DELETE `?reject`) or abandons
it (POST `…/abandon`).

`POST /devices/{id}/messages/deviceBound` on the same path is the *service* send route
(`c2d_routes`): the method decides which principal is expected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from aiohttp import web
from cryptography import x509

from tether.api.auth import refusal_error
from tether.api.bodies import read_body
from tether.api.c2d_routes import APP_PREFIX, app_properties, iso_utc
from tether.api.context import hub_of, peer_of
from tether.api.routes import Param, Route
from tether.errors import BadRequest, PayloadTooLarge, Throttled, Unauthorized
from tether.hub import Hub
from tether.security.principal import AuthRefused, Permission, Principal

__all__ = ["DEVICE_ROUTES", "RefusalDigest", "add_device_routes", "authenticate_device"]

SURFACE: Final = "https"
EVENTS_ACTION: Final = "https.events"
DEVICE = Permission.device_connect


class RefusalDigest:
    """Rate-limits audit records of repeated refusals: the first refusal of an identity for a reason
    is recorded, then at most one per `interval_s`, carrying the count suppressed in between, so a
    device hammering a limit cannot turn the audit table into an amplifier."""

    def __init__(self, interval_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # key → (last record time, suppressed)

    def admit(self, identity: str, reason: str) -> int | None:
        """None: skip this record (counted); else write it with this many `suppressed`."""
        now = self._clock()
        key = (identity, reason)
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._seen) >= self._max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
        self._seen[key] = (now, 0)
        return last[1] if last is not None else 0


DIGEST_KEY: Final = web.AppKey("https_refusal_digest", RefusalDigest)

# HTTP header → MQTT-style system property key, as `TelemetryPipeline` expects. Several headers
# may name one property (Azure SDKs differ); the first present wins.
_SYSTEM_HEADERS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("$.mid", ("iothub-messageid",)),
    ("$.cid", ("iothub-correlationid",)),
    ("$.uid", ("iothub-userid",)),
    ("$.to", ("iothub-to",)),
    ("$.ct", ("iothub-contenttype", "iothub-content-type", "Content-Type")),
    ("$.ce", ("iothub-contentencoding", "iothub-content-encoding", "Content-Encoding")),
    ("$.ctime", ("iothub-creationtimeutc", "iothub-creation-time-utc")),
    ("$.exp", ("iothub-expiry",)),
    ("$.ifid", ("iothub-interface-id",)),
)


async def authenticate_device(request: web.Request, device_id: str,
                              module_id: str | None = None) -> Principal:
    """The device (or module) principal for the path's identity: SAS from `Authorization`, else the
    TLS client chain. A device's credential is not a module's, nor one module's another's."""
    hub = hub_of(request)
    peer = peer_of(request)
    authorization = request.headers.get("Authorization")
    try:
        if authorization is None:
            transport = request.transport
            chain: Sequence[x509.Certificate] = (
                transport.get_extra_info("peercert_chain") if transport else None
            ) or ()
            if chain:
                principal = await hub.authenticator.device_certificate(
                    list(chain), device_id, module_id, surface=SURFACE, peer=peer
                )
            else:  # audited as missing-credentials
                principal = await hub.authenticator.device_sas("", device_id, module_id, surface=SURFACE,
                                                               peer=peer)
        else:
            principal = await hub.authenticator.device_sas(
                authorization, device_id, module_id, surface=SURFACE, peer=peer
            )
    except AuthRefused as exc:
        raise refusal_error(exc) from None
    if principal.device_id != device_id or principal.module_id != module_id:  # defence in depth
        raise Unauthorized("credential is not for this identity", code="IotHubUnauthorizedAccess")
    return principal


def _system_properties(headers: Mapping[str, str]) -> dict[str, str]:
    system: dict[str, str] = {}
    for key, names in _SYSTEM_HEADERS:
        for name in names:
            value = headers.get(name)
            if value:
                system[key] = value
                break
    return system


async def send_event(request: web.Request) -> web.Response:
    """Device-to-cloud (or module-to-cloud) telemetry; 204 once the event is durable in the stream."""
    hub = hub_of(request)
    device_id = request.match_info["id"]
    module_id = request.match_info.get("mid")
    principal = await authenticate_device(request, device_id, module_id)
    telemetry = hub.telemetry
    try:
        body = await read_body(request, telemetry.max_message_bytes)  # 413 MessageTooLarge above 256 KB
    except PayloadTooLarge:
        await _audit_refusal(request, principal, "message-too-large", size=request.content_length,
                             limit=telemetry.max_message_bytes)
        raise
    if not telemetry.allow(principal):
        await _audit_refusal(request, principal, "rate-limited")
        raise Throttled("device message rate exceeded", code="ThrottlingException")
    system = _system_properties(request.headers)
    await telemetry.append(principal, body, system, app_properties(request.headers), protocol=SURFACE)
    await hub.registry.touch(device_id, module_id)
    return web.Response(status=204)


async def _audit_refusal(request: web.Request, principal: Principal, reason: str, **details: Any) -> None:
    """An `https.events` refusal, as the MQTT surface writes `mqtt.publish` ones (see RefusalDigest)."""
    digest = request.app.get(DIGEST_KEY)
    suppressed = digest.admit(principal.name, reason) if digest is not None else 0
    if suppressed is None:
        return
    fields = {k: v for k, v in details.items() if v is not None}
    if suppressed:
        fields["suppressed"] = suppressed
    await hub_of(request).audit.record(
        EVENTS_ACTION,
        "refused",
        principal=principal.name,
        credential=principal.credential.value,
        reason=reason,
        peer=peer_of(request),
        target=principal.name.removeprefix("device:"),
        details=fields or None,
    )


async def receive_c2d(request: web.Request) -> web.Response:
    """Lock the oldest visible C2D message: 200 with body and `iothub-*` headers, 204 when none."""
    hub = hub_of(request)
    device_id = request.match_info["id"]
    await authenticate_device(request, device_id)
    await hub.registry.touch(device_id)
    message = await hub.c2d.receive(device_id)
    if message is None:
        return web.Response(status=204)
    headers = {
        "ETag": f'"{message.lock_token}"',
        "iothub-messageid": message.message_id,
        "iothub-sequencenumber": str(message.sequence_number),
        "iothub-to": f"/devices/{device_id}/messages/deviceBound",
        "iothub-expiry": iso_utc(message.expiry_time),
        "iothub-enqueuedtime": iso_utc(message.enqueued_time),
        "iothub-deliverycount": str(message.delivery_count),
        "iothub-ack": message.ack,
    }
    if message.correlation_id:
        headers["iothub-correlationid"] = message.correlation_id
    if message.user_id:
        headers["iothub-userid"] = message.user_id
    if message.content_type:
        headers["iothub-contenttype"] = message.content_type
    if message.content_encoding:
        headers["iothub-contentencoding"] = message.content_encoding
    for name, value in message.properties.items():
        headers[APP_PREFIX + name] = value
    response = web.Response(status=200, body=message.body, headers=headers)
    response.content_type = message.content_type or "application/octet-stream"
    return response


def _etag(request: web.Request) -> str:
    token = request.match_info["etag"].strip()
    if token.startswith("W/"):
        token = token[2:]
    token = token.strip('"')
    if not token:
        raise BadRequest("lock token is empty", field="etag")
    return token


async def settle_c2d(request: web.Request) -> web.Response:
    """Complete (204), or reject with `?reject` (204); 412 DeviceMessageLockLost for a lost lock."""
    hub = hub_of(request)
    device_id = request.match_info["id"]
    await authenticate_device(request, device_id)
    token = _etag(request)
    c2d = hub.c2d
    if "reject" in request.query:
        await c2d.reject(device_id, token)
    else:
        await c2d.complete(device_id, token)
    return web.Response(status=204)


async def abandon_c2d(request: web.Request) -> web.Response:
    hub = hub_of(request)
    device_id = request.match_info["id"]
    await authenticate_device(request, device_id)
    await hub.c2d.abandon(device_id, _etag(request))
    return web.Response(status=204)


_DEVICE_AUTH = ("Device credential: `Authorization: SharedAccessSignature sr={host}/devices/{id}&…` "
                "or a TLS client certificate.")
_EVENT_HEADERS = (Param("iothub-messageid", "header", "Message id."),
                  Param("iothub-correlationid", "header", "Correlation id."),
                  Param("iothub-contenttype", "header", "Content type (else Content-Type)."),
                  Param("iothub-contentencoding", "header", "Content encoding (else Content-Encoding)."))
_EVENT_RULES = ("Body ≤ 256 KB (else 413); `iothub-app-{name}` headers are application properties. "
                "429 over the per-identity rate.")

DEVICE_ROUTES: tuple[Route, ...] = (
    Route("POST", "/devices/{id}/messages/events", send_event, "Device: send telemetry", DEVICE,
          "device-https", request_required=False, status=204, params=_EVENT_HEADERS,
          description=f"{_DEVICE_AUTH} {_EVENT_RULES}", self_auth=True),
    Route("POST", "/devices/{id}/modules/{mid}/messages/events", send_event, "Module: send telemetry",
          DEVICE, "device-https", request_required=False, status=204, params=_EVENT_HEADERS,
          description="Module credential: `Authorization: SharedAccessSignature "
                      "sr={host}/devices/{id}/modules/{mid}&…` (a device's token is refused) or the "
                      "module's TLS client certificate. Events carry `iothub-connection-module-id`. "
                      + _EVENT_RULES, self_auth=True),
    Route("GET", "/devices/{id}/messages/deviceBound", receive_c2d, "Device: receive a C2D message",
          DEVICE, "device-https",
          response_headers=("ETag", "iothub-messageid", "iothub-sequencenumber", "iothub-to", "iothub-expiry",
                            "iothub-enqueuedtime", "iothub-deliverycount", "iothub-correlationid",
                            "iothub-ack"),
          description=f"{_DEVICE_AUTH} 200 with the message body (locked for 60 s; ETag = lock token) "
                      "or 204 when the queue is empty.", self_auth=True),
    Route("DELETE", "/devices/{id}/messages/deviceBound/{etag}", settle_c2d,
          "Device: complete (or `?reject`) a C2D message", DEVICE, "device-https", status=204,
          params=(Param("reject", "query", "Present: reject (dead-letter) instead of complete."),),
          description=f"{_DEVICE_AUTH} 412 DeviceMessageLockLost when the lock is unknown or expired.",
          self_auth=True),
    Route("POST", "/devices/{id}/messages/deviceBound/{etag}/abandon", abandon_c2d,
          "Device: abandon a C2D message (redelivered later)", DEVICE, "device-https", status=204,
          description=f"{_DEVICE_AUTH} 412 DeviceMessageLockLost when the lock is unknown or expired.",
          self_auth=True),
)


def add_device_routes(app: web.Application, hub: Hub) -> None:
    """Mount the device HTTPS routes (their handlers authenticate the device themselves, so they
    are not wrapped in the service guard) and list them in the OpenAPI document."""
    from tether.api.app import mount  # not at import time: app.py imports this module

    if DIGEST_KEY not in app:
        app[DIGEST_KEY] = RefusalDigest()
    mount(app, DEVICE_ROUTES)
