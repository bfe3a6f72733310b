"""The `$cbs` node: claims-based security, where clients put SAS tokens for the audiences they act as.

The client attaches a sender to `$cbs` (our `CbsRequests`) and a receiver from `$cbs` (our
`CbsReplies`). A request carries application properties `operation=put-token`, `type` (a SAS token
type), `name` (the audience) and the token as an amqp-value string body. The reply goes to the
connection's `$cbs` receiver named by `reply-to` (JS Event Hubs), else its first one (Node's
`reply-to` is `cbs`, uamqp sends none), with `correlation-id` = the request's `message-id` in the same
AMQP type and `status-code` as an AMQP int (uamqp reads it with `amqpvalue_get_int`).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Final

from tether.security.principal import AuthRefused
from tether.security.throttle import RATE_LIMITED

from .auth import TOKEN_TYPES
from .events import MessageReceived
from .handler import LinkHandler
from .message import AmqpValue, Message, Properties, decode_message
from .performatives import Accepted
from .types import Int

__all__ = ["CbsReplies", "CbsRequests", "cbs_reply"]

log = logging.getLogger("tether.amqp.cbs")

MAX_PENDING_REPLIES: Final = 32
MAX_CONCURRENT_REQUESTS: Final = 8
ACCEPTED: Final = Accepted()


def cbs_reply(request_id: Any, to: str | None, status: int, description: str) -> Message:
    return Message(
        properties=Properties(correlation_id=request_id, to=to),
        application_properties={"status-code": Int(status), "status-description": description},
        body=AmqpValue(None),
    )


class CbsRequests(LinkHandler):
    """Put-token requests from the client (we receive)."""

    credit = MAX_CONCURRENT_REQUESTS
    max_message_size = 16_384

    def on_message(self, event: MessageReceived) -> None:
        endpoint = self.endpoint
        if not event.settled:
            endpoint.settle(self.link, [event.delivery_id], ACCEPTED)
        endpoint.spawn(self._put_token(event.payload))

    async def _put_token(self, payload: bytes) -> None:
        endpoint = self.endpoint
        try:
            message = decode_message(payload)
        except Exception:
            endpoint.audit("amqp.cbs", "bad-request")
            return
        props = message.properties or Properties()
        app = message.application_properties or {}
        request_id, reply_to = props.message_id, props.reply_to
        operation = app.get("operation")
        token = message.body.value if isinstance(message.body, AmqpValue) else None
        kind = app.get("type")
        audience = app.get("name")
        def reply(status: int, description: str) -> None:
            repliers: list[CbsReplies] = endpoint.cbs_repliers
            if repliers:
                chosen = next((r for r in repliers if reply_to is not None and reply_to in r.names()),
                              repliers[0])
                chosen.send(cbs_reply(request_id, reply_to, status, description))

        if operation != "put-token":
            reply(400, "unsupported operation")
            return
        if not isinstance(token, str) or not isinstance(audience, str) or not isinstance(kind, str):
            endpoint.audit("amqp.cbs", "bad-request")
            reply(400, "put-token needs name, type and a string token")
            return
        if kind.lower() not in TOKEN_TYPES:
            endpoint.audit("amqp.cbs", "unsupported-token-type", token_type=kind[:64])
            reply(400, "unsupported token type")
            return
        try:
            await endpoint.put_token(token, audience)
        except AuthRefused as exc:
            status = 429 if exc.reason == RATE_LIMITED else 403 if exc.not_authorized else 401
            reply(status, exc.reason)
            return
        except Exception:
            log.exception("put-token failed")
            reply(500, "internal error")
            return
        reply(200, "OK")


class CbsReplies(LinkHandler):
    """Put-token replies to the client (we send); replies wait here for credit."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.pending: deque[bytes] = deque(maxlen=MAX_PENDING_REPLIES)

    async def open(self) -> None:
        self.endpoint.cbs_repliers.append(self)

    def names(self) -> tuple[str | None, str | None]:
        return self.link.name, self.link.target_address

    def send(self, message: Message) -> None:
        self.pending.append(message.encode())
        self.on_credit()

    def on_credit(self) -> None:
        link, endpoint = self.link, self.endpoint
        while self.pending and link.credit > 0 and link.attached:
            endpoint.send_transfer(link, self.pending.popleft(), settled=True)

    def on_detach(self) -> None:
        repliers = self.endpoint.cbs_repliers
        if self in repliers:
            repliers.remove(self)
