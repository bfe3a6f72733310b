"""Service-side C2D REST routes (ServiceConnect): send, purge, and the feedback queue.

Azure sends C2D and reads feedback over AMQP (`/messages/devicebound`, `/messages/serviceBound/feedback`);
these REST forms are Tether extensions with the same semantics, so a back end without AMQP can use
them. Purge (`DELETE /devices/{id}/commands`) is Azure's own REST route.

Send headers (Azure's HTTP names for message properties): `iothub-messageid`, `iothub-correlationid`,
`iothub-userid`, `iothub-ack` (none|positive|negative|full), `iothub-expiry` (absolute: ISO 8601
or Unix seconds) or `iothub-ttl` (Tether: seconds from now; not both), `iothub-contenttype` (else
`Content-Type`), `iothub-contentencoding` (else `Content-Encoding`) and `iothub-app-{name}` for
each application property. The body is the message, as bytes.

`FEATURE` is this module's part of the route table (`api.app` lists it).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from tether.api.bodies import body_limit, read_body
from tether.api.context import hub_of, principal_of
from tether.api.devices import path_device_id
from tether.api.routes import Feature, Param, Route
from tether.errors import BadRequest
from tether.messaging.feedback import FEEDBACK_CONTENT_TYPE, MAX_WAIT_S
from tether.security.principal import Permission

__all__ = ["APP_PREFIX", "C2D_ROUTES", "FEATURE", "app_properties", "iso_utc"]

APP_PREFIX: Final = "iothub-app-"
SERVICE = Permission.service_connect
MAX_APP_PROPERTIES: Final = 100


class C2DSendResult(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    message_id: str = Field(alias="messageId")
    device_id: str = Field(alias="deviceId")
    sequence_number: int = Field(alias="sequenceNumber")
    enqueued_time_utc: str = Field(alias="enqueuedTimeUtc")
    expiry_time_utc: str = Field(alias="expiryTimeUtc")


class PurgeMessageQueueResult(BaseModel):
    """Azure's purge answer."""

    model_config = ConfigDict(populate_by_name=True)
    total_messages_purged: int = Field(alias="totalMessagesPurged")
    device_id: str = Field(alias="deviceId")


class FeedbackRecordBody(BaseModel):
    """One feedback record (Azure's field names)."""

    model_config = ConfigDict(populate_by_name=True)
    original_message_id: str = Field(alias="originalMessageId")
    description: str
    device_generation_id: str = Field(alias="deviceGenerationId")
    device_id: str = Field(alias="deviceId")
    enqueued_time_utc: str = Field(alias="enqueuedTimeUtc")
    status_code: str = Field(alias="statusCode",
                             description="Success | Expired | DeliveryCountExceeded | Rejected | Purged")


def iso_utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def app_properties(headers: Mapping[str, str]) -> dict[str, str]:
    """`iothub-app-{name}: value` headers → `{name: value}` (name as sent)."""
    found = {k[len(APP_PREFIX):]: v for k, v in headers.items() if k.lower().startswith(APP_PREFIX)}
    if len(found) > MAX_APP_PROPERTIES:
        raise BadRequest(f"at most {MAX_APP_PROPERTIES} application properties", field="properties")
    return found


def _ttl_from_headers(headers: Mapping[str, str], now: float) -> float | None:
    expiry, ttl = headers.get("iothub-expiry"), headers.get("iothub-ttl")
    if expiry and ttl:
        raise BadRequest("give iothub-expiry or iothub-ttl, not both", field="iothub-expiry")
    if ttl:
        try:
            return float(ttl)
        except ValueError:
            raise BadRequest("iothub-ttl must be a number of seconds", field="iothub-ttl") from None
    if not expiry:
        return None
    try:
        at = float(expiry)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(expiry.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest("iothub-expiry must be ISO 8601 or Unix seconds",
                             field="iothub-expiry") from None
        at = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if at <= now:
        raise BadRequest("iothub-expiry is in the past", field="iothub-expiry")
    return at - now


async def send_c2d(request: web.Request) -> web.Response:
    device_id = path_device_id(request)
    headers = request.headers
    body = await read_body(request, body_limit(request))  # the service answers 400 above 64 KB
    c2d = hub_of(request).c2d
    message = await c2d.send(
        device_id,
        body,
        message_id=headers.get("iothub-messageid") or None,
        correlation_id=headers.get("iothub-correlationid") or None,
        user_id=headers.get("iothub-userid") or None,
        ack=(headers.get("iothub-ack") or "none").lower(),
        ttl_s=_ttl_from_headers(headers, time.time()),
        properties=app_properties(headers),
        content_type=headers.get("iothub-contenttype") or headers.get("Content-Type") or None,
        content_encoding=headers.get("iothub-contentencoding") or headers.get("Content-Encoding") or None,
        actor=principal_of(request).name,
    )
    result = C2DSendResult(
        message_id=message.message_id,
        device_id=device_id,
        sequence_number=message.sequence_number,
        enqueued_time_utc=iso_utc(message.enqueued_time),
        expiry_time_utc=iso_utc(message.expiry_time),
    )
    return web.json_response(result.model_dump(by_alias=True), status=201,
                             headers={"iothub-messageid": message.message_id})


async def purge_c2d(request: web.Request) -> web.Response:
    device_id = path_device_id(request)
    count = await hub_of(request).c2d.purge(device_id, actor=principal_of(request).name)
    result = PurgeMessageQueueResult(total_messages_purged=count, device_id=device_id)
    return web.json_response(result.model_dump(by_alias=True))


def _timeout(request: web.Request) -> float:
    raw = request.query.get("timeout") or "0"
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("timeout must be a number of seconds", field="timeout") from None
    if not 0 <= value <= MAX_WAIT_S:
        raise BadRequest(f"timeout must be between 0 and {int(MAX_WAIT_S)}", field="timeout")
    return value


def _lock_token(request: web.Request) -> str:
    token = request.match_info["lockToken"].strip().strip('"')
    if not token:
        raise BadRequest("lock token is empty", field="lockToken")
    return token


async def receive_feedback(request: web.Request) -> web.Response:
    batch = await hub_of(request).c2d.feedback.receive(timeout_s=_timeout(request))
    if batch is None:
        return web.Response(status=204)
    body = [record.to_wire() for record in batch.records]
    return web.json_response(body, content_type=FEEDBACK_CONTENT_TYPE,
                             headers={"ETag": f'"{batch.lock_token}"'})


async def complete_feedback(request: web.Request) -> web.Response:
    await hub_of(request).c2d.feedback.complete(_lock_token(request))
    return web.Response(status=204)


async def abandon_feedback(request: web.Request) -> web.Response:
    await hub_of(request).c2d.feedback.abandon(_lock_token(request))
    return web.Response(status=204)


_SEND_HEADERS = (
    Param("iothub-messageid", "header", "Message id (1-128 of letters, digits, -:.+%_#*?!(),=@;$'); "
                                        "a UUID when absent."),
    Param("iothub-correlationid", "header", "Correlation id."),
    Param("iothub-userid", "header", "User id."),
    Param("iothub-ack", "header", "Feedback wanted.",
          {"type": "string", "enum": ["none", "positive", "negative", "full"], "default": "none"}),
    Param("iothub-expiry", "header", "Absolute expiry: ISO 8601 or Unix seconds (max 48 h ahead)."),
    Param("iothub-ttl", "header", "Tether: time to live in seconds (default 3600, max 172800).",
          {"type": "number"}),
    Param("iothub-contenttype", "header", "Message content type (else Content-Type)."),
    Param("iothub-contentencoding", "header", "Message content encoding (else Content-Encoding)."),
)

C2D_ROUTES: tuple[Route, ...] = (
    Route("POST", "/devices/{id}/messages/deviceBound", send_c2d, "Send a cloud-to-device message",
          SERVICE, "c2d", request_required=False, response=C2DSendResult, status=201,
          params=_SEND_HEADERS, response_headers=("iothub-messageid",),
          description="Tether extension (Azure sends over AMQP). The body is the message (max 64 KB, "
                      "else 400 MessageTooLarge); `iothub-app-{name}` headers carry application "
                      "properties. 403 DeviceMaximumQueueDepthExceeded when 50 messages are queued."),
    Route("DELETE", "/devices/{id}/commands", purge_c2d, "Purge a device's cloud-to-device queue", SERVICE,
          "c2d", response=PurgeMessageQueueResult,
          description="Purged feedback is sent for messages sent with ack negative or full."),
    Route("GET", "/messages/serviceBound/feedback", receive_feedback, "Receive a batch of C2D feedback",
          SERVICE, "c2d", response=FeedbackRecordBody, array=True, response_headers=("ETag",),
          params=(Param("timeout", "query", f"Long-poll up to this many seconds (0-{int(MAX_WAIT_S)}).",
                        {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S}),),
          description="Tether extension (Azure: AMQP). Up to 64 records, content type "
                      f"`{FEEDBACK_CONTENT_TYPE}`; ETag is the batch lock token (lock 60 s). 204 when "
                      "there is none."),
    Route("DELETE", "/messages/serviceBound/feedback/{lockToken}", complete_feedback,
          "Complete (delete) a feedback batch", SERVICE, "c2d", status=204,
          description="412 when the lock is unknown or expired."),
    Route("POST", "/messages/serviceBound/feedback/{lockToken}/abandon", abandon_feedback,
          "Abandon a feedback batch (offered again)", SERVICE, "c2d", status=204,
          description="412 when the lock is unknown or expired."),
)


FEATURE = Feature("c2d", C2D_ROUTES)
