"""Service links (ServiceConnect): send C2D, read feedback and file notifications, as the service SDKs do.

- `/messages/devicebound` (the service sends; Node `azure-iothub`, Python `azure-iot-hub` over uamqp):
  `to` names the device (`/devices/{id}/messages/devicebound`, URL-encoded by Node), `message-id`,
  `correlation-id`, `user-id`, content type and encoding, `absolute-expiry-time` become the queued
  message's fields, application property `iothub-ack` its ack mode, the others its properties.
  Refusals are `rejected` **with an error condition** (Node treats a bare `released`/`rejected` as
  success): `amqp:not-found` for an unknown or disabled device (DeviceNotFoundError, not retried),
  `amqp:resource-limit-exceeded` for a full queue (DeviceMaximumQueueDepthExceededError),
  `amqp:link:message-size-exceeded` over 64 KB, `amqp:invalid-field` for anything else invalid.
- `/messages/serviceBound/feedback` and `/messages/serviceBound/filenotifications` (the service
  receives): one locked batch (feedback: Azure's JSON array, content type
  `application/vnd.microsoft.iothub.feedback.json`, `user-id` = hub name) or notification per
  delivery; `accepted` (or `rejected`) completes it, `released`/`modified` abandons it, a detach
  before settlement abandons it too. File notifications come from the hub's durable queue
  (`hub.file_uploads.notifications`, which `GET /messages/serviceBound/filenotifications` reads too),
  one JSON object per message, locked one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any, Final
from urllib.parse import unquote

from tether.errors import BadRequest, NotFound, PreconditionFailed, QuotaExceeded, TetherError
from tether.messaging.feedback import FEEDBACK_CONTENT_TYPE
from tether.messaging.file_upload import notification_json
from tether.security.principal import Permission, Principal

from . import errors as e
from .addresses import node_path
from .events import DeliveryUpdated, MessageReceived
from .handler import LinkHandler
from .message import Message, Properties, decode_message
from .performatives import Accepted, Error, Rejected
from .telemetry import message_body, system_bag
from .types import Symbol

__all__ = ["C2DSendReceiver", "FeedbackSender", "FileNotificationSender"]

log = logging.getLogger("tether.amqp.service")
FILE_NOTIFICATION_CONTENT_TYPE: Final = "application/json"

_ACCEPTED: Final = Accepted()
_MAX_C2D_IN_FLIGHT: Final = 64


def _device_of(to: str | None) -> str | None:
    path = node_path(to)
    parts = path.split("/")
    if len(parts) == 5 and parts[1].lower() == "devices" and parts[3].lower() == "messages" \
            and parts[4].lower() == "devicebound":
        return unquote(parts[2])
    return None


class C2DSendReceiver(LinkHandler):
    """We receive cloud-to-device messages from the service and queue them."""

    credit = _MAX_C2D_IN_FLIGHT
    max_message_size = 65_536 + 16_384

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.principal: Principal | None = None

    async def open(self) -> None:
        self.principal = self.endpoint.authorize_service(self, Permission.service_connect)

    def on_message(self, event: MessageReceived) -> None:
        self.endpoint.spawn(self._send(event))

    async def _send(self, event: MessageReceived) -> None:
        state = await self._queue(event.payload)
        if not event.settled and self.link.attached:
            self.endpoint.settle(self.link, [event.delivery_id], state)

    async def _queue(self, payload: bytes) -> Any:
        hub = self.endpoint.ctx.hub
        principal = self.principal
        assert principal is not None
        try:
            message = decode_message(payload)
        except e.ProtocolError as exc:
            return Rejected(Error(exc.condition, exc.description[:200]))
        props = message.properties or Properties()
        device_id = _device_of(props.to)
        if device_id is None:
            return Rejected(Error(e.INVALID_FIELD, "`to` must be /devices/{deviceId}/messages/devicebound"))
        body = message_body(message)
        if body is None:
            return Rejected(Error(e.DECODE_ERROR, "the body must be data sections"))
        system, app = system_bag(message)
        ack = (app.pop("iothub-ack", None) or "none").lower()
        ttl_s = None
        if props.absolute_expiry_time:
            ttl_s = max(0.001, props.absolute_expiry_time / 1000 - time.time())
        device = await hub.registry.find(device_id)
        if device is None or not device.enabled:
            why = "does not exist" if device is None else "is disabled"
            return Rejected(Error(e.NOT_FOUND, f"device {device_id} {why}"))
        try:
            await hub.c2d.send(
                device_id, body, message_id=system.get("$.mid"), correlation_id=system.get("$.cid"),
                ack=ack, ttl_s=ttl_s, properties=app, user_id=system.get("$.uid"),
                content_type=system.get("$.ct"), content_encoding=system.get("$.ce"), actor=principal.name,
            )
        except NotFound as exc:
            return Rejected(Error(e.NOT_FOUND, exc.message[:200]))
        except QuotaExceeded as exc:
            return Rejected(Error(e.RESOURCE_LIMIT_EXCEEDED, exc.message[:200]))
        except BadRequest as exc:
            condition = e.MESSAGE_SIZE_EXCEEDED if exc.code == "MessageTooLarge" else e.INVALID_FIELD
            return Rejected(Error(condition, exc.message[:200]))
        except TetherError as exc:
            return Rejected(Error(e.INTERNAL_ERROR, exc.message[:200]))
        return _ACCEPTED


class _LockedQueueSender(LinkHandler):
    """Sends one locked item per delivery while the peer gives credit; settles the locks."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._credit = asyncio.Event()
        self._locks: dict[int, str] = {}
        self._runner: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.endpoint.authorize_service(self, Permission.service_connect)

    def on_credit(self) -> None:
        if self.link.credit > 0:
            self._credit.set()
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _take(self) -> tuple[str, Message] | None:
        raise NotImplementedError

    async def _complete(self, lock: str) -> None:
        raise NotImplementedError

    async def _abandon(self, lock: str) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        link, endpoint = self.link, self.endpoint
        while link.attached and not endpoint.closed:
            if link.credit <= 0:
                self._credit.clear()
                await self._credit.wait()
                continue
            try:
                taken = await self._take()
            except Exception:
                log.exception("reading the %s queue failed", self.match.name)
                await asyncio.sleep(1.0)
                continue
            if taken is None:
                continue
            lock, message = taken
            if not link.attached or endpoint.closed or link.credit <= 0:
                await self._settle(lock, complete=False)
                return
            delivery_id = endpoint.send_message(link, message, settled=False)
            self._locks[delivery_id] = lock

    def on_delivery(self, event: DeliveryUpdated) -> None:
        if not event.settled and not isinstance(event.state, Accepted | Rejected):
            return
        lock = self._locks.pop(event.delivery_id, None)
        if lock is not None:
            complete = isinstance(event.state, Accepted | Rejected) or event.state is None
            self.endpoint.spawn(self._settle(lock, complete=complete))

    async def _settle(self, lock: str, *, complete: bool) -> None:
        with contextlib.suppress(PreconditionFailed):
            await (self._complete(lock) if complete else self._abandon(lock))

    def on_detach(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
        locks, self._locks = list(self._locks.values()), {}
        for lock in locks:
            self.endpoint.spawn(self._settle(lock, complete=False))


class FeedbackSender(_LockedQueueSender):
    """Delivery feedback batches to the service."""

    async def _take(self) -> tuple[str, Message] | None:
        hub = self.endpoint.ctx.hub
        batch = await hub.c2d.feedback.receive(timeout_s=30.0)
        if batch is None:
            return None
        body = json.dumps([record.to_wire() for record in batch.records], separators=(",", ":")).encode()
        hub_name = self.endpoint.ctx.hostname.split(".", 1)[0]
        message = Message(
            properties=Properties(message_id=str(uuid.uuid4()), user_id=hub_name.encode(),
                                  content_type=Symbol(FEEDBACK_CONTENT_TYPE),
                                  content_encoding=Symbol("utf-8")),
            body=(body,),
        )
        return batch.lock_token, message

    async def _complete(self, lock: str) -> None:
        await self.endpoint.ctx.hub.c2d.feedback.complete(lock)

    async def _abandon(self, lock: str) -> None:
        await self.endpoint.ctx.hub.c2d.feedback.abandon(lock)


class FileNotificationSender(_LockedQueueSender):
    """File-upload notifications to the service."""

    async def _take(self) -> tuple[str, Message] | None:
        batch = await self.endpoint.ctx.hub.file_uploads.notifications.receive(timeout_s=30.0, max_records=1)
        if batch is None:
            return None
        (record,) = batch.records
        body = json.dumps(notification_json(record), separators=(",", ":")).encode()
        hub_name = self.endpoint.ctx.hostname.split(".", 1)[0]
        message = Message(
            properties=Properties(message_id=str(uuid.uuid4()), user_id=hub_name.encode(),
                                  content_type=Symbol(FILE_NOTIFICATION_CONTENT_TYPE),
                                  content_encoding=Symbol("utf-8")),
            application_properties={"iothub-connection-device-id": record.device_id},
            body=(body,),
        )
        return batch.lock_token, message

    async def _complete(self, lock: str) -> None:
        await self.endpoint.ctx.hub.file_uploads.notifications.complete(lock)

    async def _abandon(self, lock: str) -> None:
        await self.endpoint.ctx.hub.file_uploads.notifications.abandon(lock)
