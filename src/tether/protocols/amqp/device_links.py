"""Device-bound links, exactly as the Node `azure-iot-device-amqp` transport uses them.

Every link here serves one identity the connection holds a credential for (`authorize_device`) and
talks to the hub's protocol-neutral services through `ctx.hooks` (`hub.device_sessions`) and the
identity's `IdentityHandle`:

- C2D (`/devices/{id}/messages/devicebound`, case-insensitive; we send): attaching subscribes the
  identity to C2D, so its `C2DPump` starts; each message goes out unsettled and the device's
  disposition settles it: `accepted` complete, `rejected` reject (dead-letter), `released` /
  `modified` abandon (delivery count up). Detach or disconnect first: the pump abandons it.
- Methods (`/devices/{id}/methods/devicebound`, both directions): our sender carries requests
  (application property `IoThub-methodname`, `correlation-id` = the hub's rid, JSON body; attaching
  it subscribes to methods); the device's sender carries answers (`correlation-id`, application
  property `IoThub-status`), handed to `method_response`.
- Twin (`/devices/{id}/twin`, both directions): requests carry message annotations `operation`
  (GET, PATCH, PUT, DELETE) and `resource` and a string `correlation-id`; answers go back on our twin
  sender with the same `correlation-id`, annotation `status` (int) and, for patches, `version`; PUT /
  DELETE of `/notifications/twin/properties/desired` (un)subscribe desired patches, which then arrive
  on the same sender without a correlation-id.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from typing import Any, ClassVar, Final

from tether.messaging.c2d import C2DMessage, C2DOutcome
from tether.security.principal import Principal

from . import errors as e
from .events import DeliveryUpdated, MessageReceived
from .handler import LinkHandler
from .identity import IdentityHandle
from .message import Message, Properties, decode_message
from .performatives import Accepted, Modified, Rejected, Released
from .telemetry import message_body
from .types import Int, Symbol, Timestamp

__all__ = ["C2DSender", "MethodRequestSender", "MethodResponseReceiver", "TwinRequestReceiver",
           "TwinResponseSender", "c2d_message"]

MAX_QUEUED: Final = 256  # messages waiting for the device's credit on one link
_ACCEPTED: Final = Accepted()
_DESIRED: Final = "/notifications/twin/properties/desired"


class _DeviceLink(LinkHandler):
    """Authorizes the link for its device (or module) and keeps the identity's handle."""

    kind: ClassVar[str | None] = None  # the session kind attaching this link subscribes to

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.principal: Principal | None = None
        self.device: IdentityHandle | None = None
        self._queue: deque[tuple[bytes, asyncio.Future[C2DOutcome] | None]] = deque()

    async def open(self) -> None:
        params = self.match.params
        self.principal = await self.endpoint.authorize_device(self, params["device"], params.get("module"))
        self.device = self.endpoint.identity(self.principal)

    def on_attached(self) -> None:
        if self.kind is not None and self.principal is not None and self.device is not None:
            self.endpoint.spawn(self.endpoint.ctx.hooks.subscribed(self.principal, self.device, [self.kind]))

    def on_detach(self) -> None:
        if self.kind is not None and self.principal is not None and self.device is not None:
            hooks = self.endpoint.ctx.hooks
            self.endpoint.spawn(hooks.unsubscribed(self.principal, self.device, [self.kind]))

    # --- sending with the device's credit (our sender links) ----------------------------------------
    def _send(self, payload: bytes, done: asyncio.Future[C2DOutcome] | None = None) -> None:
        if len(self._queue) >= MAX_QUEUED:
            raise ConnectionError("the device gives no credit")
        self._queue.append((payload, done))
        self.on_credit()

    def on_credit(self) -> None:
        link, endpoint = self.link, self.endpoint
        while self._queue and link.credit > 0 and link.attached:
            payload, done = self._queue.popleft()
            delivery_id = endpoint.send_transfer(link, payload, settled=done is None)
            if done is not None:
                self._sent(delivery_id, done)

    def _sent(self, delivery_id: int, done: asyncio.Future[C2DOutcome]) -> None:
        raise NotImplementedError


# --- C2D ------------------------------------------------------------------------------------------
def c2d_message(message: C2DMessage) -> Message:
    """A queued C2D message as the Node device reads it (message-id, correlation-id, to, expiry, content
    type and encoding, application properties with `iothub-ack`, one data section)."""
    app: dict[str, Any] = dict(message.properties)
    if message.ack != "none":
        app["iothub-ack"] = message.ack
    expiry = int(message.expiry_time.timestamp() * 1000)
    return Message(
        properties=Properties(
            message_id=message.message_id, to=f"/devices/{message.device_id}/messages/devicebound",
            correlation_id=message.correlation_id,
            user_id=message.user_id.encode() if message.user_id else None,
            content_type=Symbol(message.content_type) if message.content_type else None,
            content_encoding=Symbol(message.content_encoding) if message.content_encoding else None,
            absolute_expiry_time=Timestamp(expiry),
        ),
        application_properties=app,
        body=(message.body,),
    )


def _outcome(state: Any) -> C2DOutcome:
    if isinstance(state, Accepted):
        return C2DOutcome.COMPLETE
    if isinstance(state, Rejected):
        return C2DOutcome.REJECT
    if isinstance(state, Released | Modified):
        return C2DOutcome.ABANDON
    return C2DOutcome.ABANDON  # settled without a known outcome: offer it again


class C2DSender(_DeviceLink):
    """We send the device its C2D messages; its dispositions settle them."""

    kind = "c2d"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._waiting: dict[int, asyncio.Future[C2DOutcome]] = {}

    def on_attached(self) -> None:
        if self.device is not None:
            self.device.c2d = self
        super().on_attached()

    async def deliver(self, message: C2DMessage) -> C2DOutcome:
        done: asyncio.Future[C2DOutcome] = asyncio.get_running_loop().create_future()
        if not self.link.attached:
            raise ConnectionError("the C2D link is detached")
        self._send(c2d_message(message).encode(), done)
        return await done

    def _sent(self, delivery_id: int, done: asyncio.Future[C2DOutcome]) -> None:
        self._waiting[delivery_id] = done

    def on_delivery(self, event: DeliveryUpdated) -> None:
        if not event.settled and not isinstance(event.state, Accepted | Rejected | Released | Modified):
            return
        done = self._waiting.pop(event.delivery_id, None)
        if done is not None and not done.done():
            done.set_result(_outcome(event.state))

    def on_detach(self) -> None:
        if self.device is not None and self.device.c2d is self:
            self.device.c2d = None
        pending = [done for _, done in self._queue if done is not None] + list(self._waiting.values())
        self._queue.clear()
        self._waiting.clear()
        for done in pending:
            if not done.done():
                done.set_exception(ConnectionError("the C2D link detached"))
        super().on_detach()


# --- direct methods -------------------------------------------------------------------------------
class MethodRequestSender(_DeviceLink):
    """We send method requests to the device."""

    kind = "methods"

    def on_attached(self) -> None:
        if self.device is not None:
            self.device.methods = self
        super().on_attached()

    def request(self, method_name: str, rid: str, payload: bytes) -> None:
        if not self.link.attached:
            raise ConnectionError("the method link is detached")
        message = Message(properties=Properties(message_id=str(uuid.uuid4()), correlation_id=rid),
                          application_properties={"IoThub-methodname": method_name}, body=(payload,))
        self._send(message.encode())

    def on_detach(self) -> None:
        if self.device is not None and self.device.methods is self:
            self.device.methods = None
        self._queue.clear()
        super().on_detach()


def _correlation(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class MethodResponseReceiver(_DeviceLink):
    """The device's method answers."""

    credit = 64

    def on_message(self, event: MessageReceived) -> None:
        if not event.settled:
            self.endpoint.settle(self.link, [event.delivery_id], _ACCEPTED)
        try:
            message = decode_message(event.payload)
        except e.ProtocolError:
            self.endpoint.audit("amqp.transfer", "invalid-message", device=self._device_id())
            return
        rid = _correlation(message.properties.correlation_id if message.properties else None)
        status = (message.application_properties or {}).get("IoThub-status")
        if rid is None or isinstance(status, bool) or not isinstance(status, int):
            self.endpoint.audit("amqp.transfer", "invalid-method-response", device=self._device_id())
            return
        assert self.principal is not None
        body = message_body(message) or b""
        self.endpoint.spawn(self.endpoint.ctx.hooks.method_response(self.principal, rid, int(status), body))

    def _device_id(self) -> str | None:
        return self.principal.device_id if self.principal else None


# --- twin -----------------------------------------------------------------------------------------
class TwinResponseSender(_DeviceLink):
    """We send twin answers and desired-property patches to the device."""

    def on_attached(self) -> None:
        if self.device is not None:
            self.device.twin = self
        super().on_attached()

    def respond(self, correlation_id: Any, status: int, body: bytes, version: int | None) -> None:
        annotations: dict[Any, Any] = {"status": Int(status)}
        if version is not None:
            annotations["version"] = version
        message = Message(message_annotations=annotations,
                          properties=Properties(correlation_id=correlation_id), body=(body,) if body else ())
        self._try_send(message)

    def push_desired(self, patch: bytes) -> None:
        self._try_send(Message(body=(patch,)))

    def _try_send(self, message: Message) -> None:
        try:
            self._send(message.encode())
        except ConnectionError:
            device = self.principal.device_id if self.principal else None
            self.endpoint.audit("amqp.transfer", "twin-backlog", device=device)

    def on_detach(self) -> None:
        if self.device is not None and self.device.twin is self:
            self.device.twin = None
        self._queue.clear()
        super().on_detach()


def _error_body(code: str, text: str) -> bytes:
    return json.dumps({"errorCode": code, "message": text}).encode()


class TwinRequestReceiver(_DeviceLink):
    """The device's twin requests: GET, PATCH reported, PUT / DELETE the desired-patch subscription."""

    credit = 64

    def on_message(self, event: MessageReceived) -> None:
        if not event.settled:
            self.endpoint.settle(self.link, [event.delivery_id], _ACCEPTED)
        self.endpoint.spawn(self._answer(event.payload))

    async def _answer(self, payload: bytes) -> None:
        endpoint, principal, device = self.endpoint, self.principal, self.device
        assert principal is not None and device is not None
        try:
            message = decode_message(payload)
        except e.ProtocolError:
            endpoint.audit("amqp.transfer", "invalid-message", device=principal.device_id)
            return
        annotations = message.message_annotations or {}
        operation = str(annotations.get("operation", "")).upper()
        resource = str(annotations.get("resource", "") or "")
        correlation = message.properties.correlation_id if message.properties else None
        hooks = endpoint.ctx.hooks
        version: int | None = None
        try:
            if operation == "GET":
                status, body = await hooks.twin_get(principal)
            elif operation == "PATCH" and resource.rstrip("/") == "/properties/reported":
                patch = message_body(message) or b""
                status, body, version = await hooks.twin_patch_reported(principal, patch)
            elif operation in ("PUT", "DELETE") and resource.rstrip("/") == _DESIRED:
                change = hooks.subscribed if operation == "PUT" else hooks.unsubscribed
                await change(principal, device, ["desired-patches"])
                status, body = 200, b""
            else:
                status, body = 400, _error_body("ArgumentInvalid", f"unsupported twin request {operation} "
                                                                   f"{resource[:64]}")
        except Exception:
            status, body = 500, _error_body("ServerError", "the twin request failed")
        twin = device.twin
        if twin is not None:
            assert isinstance(twin, TwinResponseSender)
            twin.respond(correlation, status, body, version)
