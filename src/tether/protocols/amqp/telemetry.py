"""Device-to-cloud telemetry over AMQP: `/devices/{id}/messages/events` (and the module form).

The same path as MQTT: the message's properties become the `$.` keys of `messaging.telemetry`
(message-id `$.mid`, correlation-id `$.cid`, content-type `$.ct`, content-encoding `$.ce`, user-id
`$.uid`, absolute-expiry-time `$.exp`, creation-time `$.ctime`; annotations `iothub-interface-id`
`$.ifid` and `dt-subject` `$.sub`; application property `iothub-outputname` `$.on`), the rest of the
application properties stay application properties, and `TelemetryPipeline.append_nowait` queues the
event for the partition's next group commit. A transfer is settled `accepted` only once its event is
durable; the transfers of one socket read share one append future and go out in one disposition
range. Refusals (rate limit, size, not a message) reject that transfer with an error condition the
Node SDK maps, and are audited; the link stays.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
import uuid
from typing import Any, Final

from tether.errors import TetherError
from tether.security.principal import Principal

from . import errors as e
from .decode import decode_value
from .events import MessageReceived
from .handler import LinkHandler
from .message import AmqpValue, Message, decode_message
from .performatives import Accepted, Error, Rejected

__all__ = ["TelemetryReceiver", "message_body", "read_telemetry", "system_bag"]

CREDIT: Final = 300  # unsettled telemetry per link: the window closes until appends are durable
_ACCEPTED: Final = Accepted()
_ANNOTATIONS: Final = {"iothub-interface-id": "$.ifid", "dt-subject": "$.sub"}
_APP_SYSTEM: Final = {"iothub-outputname": "$.on", "iothub-creation-time-utc": "$.ctime"}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, uuid.UUID | str):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _iso(millis: int) -> str:
    moment = dt.datetime.fromtimestamp(millis / 1000, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def system_bag(message: Message) -> tuple[dict[str, str], dict[str, str]]:
    """(the `$.` system keys, the application properties) of a device message, as MQTT has them."""
    system: dict[str, str] = {}
    app: dict[str, str] = {}
    props = message.properties
    if props is not None:
        for key, value in (("$.mid", props.message_id), ("$.cid", props.correlation_id),
                           ("$.ct", props.content_type), ("$.ce", props.content_encoding),
                           ("$.uid", props.user_id)):
            if value is not None:
                system[key] = _text(value)
        if props.absolute_expiry_time:
            system["$.exp"] = _iso(props.absolute_expiry_time)
        if props.creation_time:
            system["$.ctime"] = _iso(props.creation_time)
    for key, value in (message.message_annotations or {}).items():
        name = _ANNOTATIONS.get(str(key))
        if name is not None and value is not None:
            system[name] = _text(value)
    for key, value in (message.application_properties or {}).items():
        if value is None:
            continue
        name = _APP_SYSTEM.get(str(key))
        if name is not None:
            system[name] = _text(value)
        else:
            app[_text(key)] = _text(value)
    return system, app


_PROPERTY_KEYS: Final = ((0, "$.mid"), (5, "$.cid"), (6, "$.ct"), (7, "$.ce"), (1, "$.uid"))
_SECTION_ORDER: Final = {0x70: 0, 0x71: 1, 0x72: 2, 0x73: 3, 0x74: 4, 0x75: 5, 0x77: 5, 0x78: 6}


def read_telemetry(payload: bytes) -> tuple[dict[str, str], dict[str, str], bytes | None]:
    """(system keys, application properties, body) of a device message in one pass over its sections,
    without building a `Message` (the telemetry hot path: ~2x faster than `decode_message` followed by
    `system_bag`, which it equals). Messages with symbolic descriptors or amqp-sequence bodies take the
    general path. Raises `ProtocolError` for what is not a valid message."""
    if not payload.startswith(b"\x00\x53"):
        message = decode_message(payload)
        return (*system_bag(message), message_body(message))
    system: dict[str, str] = {}
    app: dict[str, str] = {}
    data: list[bytes] = []
    value_body: bytes | None = None
    last, pos, end = -1, 0, len(payload)
    while pos < end:
        if payload[pos: pos + 2] != b"\x00\x53" or end < pos + 4:
            message = decode_message(payload)
            return (*system_bag(message), message_body(message))
        code = payload[pos + 2]
        content, pos = decode_value(payload, pos + 3)
        order = _SECTION_ORDER.get(code)
        if order is None or order < last or (order == last and code != 0x75):
            message = decode_message(payload)  # unusual sections: the general path decides
            return (*system_bag(message), message_body(message))
        last = order
        if code == 0x75:
            if not isinstance(content, bytes):
                raise e.ProtocolError(e.INVALID_FIELD, "data section must be binary")
            data.append(content)
        elif code == 0x73:
            if not isinstance(content, list):
                raise e.ProtocolError(e.INVALID_FIELD, "properties must be a list")
            count = len(content)
            for index, key in _PROPERTY_KEYS:
                if index < count and content[index] is not None:
                    system[key] = _text(content[index])
            for index, key in ((8, "$.exp"), (9, "$.ctime")):
                if index < count and content[index]:
                    stamp = content[index]
                    if type(stamp) is bool or not isinstance(stamp, int):
                        raise e.ProtocolError(e.INVALID_FIELD, "times must be timestamps")
                    system[key] = _iso(stamp)
        elif code == 0x74 or code == 0x72:
            if not isinstance(content, dict):
                raise e.ProtocolError(e.INVALID_FIELD, "annotations and properties must be maps")
            names = _APP_SYSTEM if code == 0x74 else _ANNOTATIONS
            for key, item in content.items():
                if item is None:
                    continue
                name = names.get(str(key))
                if name is not None:
                    system[name] = _text(item)
                elif code == 0x74:
                    app[_text(key)] = _text(item)
        elif code == 0x77:
            if isinstance(content, bytes | str):
                value_body = content.encode("utf-8") if isinstance(content, str) else content
            else:
                return system, app, None
        elif code in (0x70, 0x71, 0x78) and not isinstance(content, list | dict):
            raise e.ProtocolError(e.INVALID_FIELD, "a message section has the wrong type")
    if value_body is not None:
        return system, app, value_body
    return system, app, data[0] if len(data) == 1 else b"".join(data)


def message_body(message: Message) -> bytes | None:
    """The body as bytes: the data sections, or an amqp-value binary or string (proton's default)."""
    body = message.body
    if isinstance(body, tuple):
        return message.data
    if isinstance(body, AmqpValue) and isinstance(body.value, bytes | str):
        value = body.value
        return value.encode("utf-8") if isinstance(value, str) else value
    return None


class TelemetryReceiver(LinkHandler):
    """We receive a device's telemetry (the device's sender link)."""

    credit = CREDIT

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.principal: Principal | None = None
        telemetry = self.endpoint.ctx.telemetry
        self.max_message_size = telemetry.max_message_bytes + 65_536  # properties and annotations
        self._join: asyncio.Future[Any] | None = None
        self._join_ids: list[int] = []
        self._next_touch = 0.0
        self._last_audit: dict[str, float] = {}

    async def open(self) -> None:
        params = self.match.params
        self.principal = await self.endpoint.authorize_device(self, params["device"], params.get("module"))

    def on_message(self, event: MessageReceived) -> None:
        principal = self.principal
        assert principal is not None
        ctx = self.endpoint.ctx
        telemetry = ctx.telemetry
        if not telemetry.allow(principal):
            self._refuse(event, e.THROTTLED, "rate-limited", "the device's message rate limit is exceeded")
            return
        try:
            system, app, body = read_telemetry(event.payload)
        except e.ProtocolError as exc:
            self._refuse(event, exc.condition, "invalid-message", exc.description)
            return
        if body is None:
            self._refuse(event, e.DECODE_ERROR, "invalid-message", "the body must be data sections")
            return
        if telemetry.too_large(body):
            self._refuse(event, e.MESSAGE_SIZE_EXCEEDED, "message-too-large",
                         f"the body exceeds {telemetry.max_message_bytes} bytes", size=len(body))
            return
        now = time.monotonic()
        if now >= self._next_touch and principal.device_id:
            self._next_touch = now + ctx.activity_interval_s
            self.endpoint.spawn(ctx.activity.touch(principal.device_id, principal.module_id))
        try:
            future = telemetry.append_nowait(principal, body, system, app, protocol=self.endpoint.protocol,
                                             join=self._join)
        except Exception as exc:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        if event.settled:
            future.add_done_callback(_retrieve)
            return
        if future is not self._join:
            if self._join is None:
                asyncio.get_running_loop().call_soon(self._end_turn)
            self._join = future
            self._join_ids = ids = [event.delivery_id]
            future.add_done_callback(functools.partial(self._durable, ids))
        else:
            self._join_ids.append(event.delivery_id)

    def _end_turn(self) -> None:
        self._join = None  # appends of the next read start a new group

    def _durable(self, ids: list[int], future: asyncio.Future[Any]) -> None:
        if self.endpoint.closed or not self.link.attached:
            if not future.cancelled():
                future.exception()
            return
        error = None if future.cancelled() else future.exception()
        if future.cancelled() or error is not None:
            if isinstance(error, TetherError) and error.http_status == 400:
                state: Any = Rejected(Error(e.INVALID_FIELD, error.message[:200]))
            else:
                state = Rejected(Error(e.INTERNAL_ERROR, "the message could not be stored"))
            self.endpoint.settle(self.link, ids, state)
            return
        self.endpoint.settle(self.link, ids, _ACCEPTED)

    def _refuse(self, event: MessageReceived, condition: str, reason: str, description: str,
                **details: Any) -> None:
        if not event.settled:
            self.endpoint.settle(self.link, [event.delivery_id], Rejected(Error(condition, description)))
        now = time.monotonic()
        if now - self._last_audit.get(reason, -1.0) >= 1.0:  # a flood writes one record per second
            self._last_audit[reason] = now
            principal = self.principal
            self.endpoint.audit("amqp.transfer", reason, principal=principal and principal.name,
                                device=principal and principal.device_id, **details)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
