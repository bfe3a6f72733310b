"""`LinkHandler`: what serves one attached link (a CBS node, a device's telemetry, a C2D queue, …).

The endpoint creates the handler its route names when the peer attaches, awaits `open()` (which
authorizes and then accepts or refuses the link through the endpoint), and calls the `on_*` methods
for the link's events, on the event loop. A handler sends and settles through `self.endpoint`, which
writes the bytes out afterwards.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from tether.security.principal import Permission, Principal

from .context import AmqpContext
from .errors import NOT_IMPLEMENTED
from .events import DeliveryUpdated, MessageReceived
from .links import Link
from .message import Message
from .performatives import Error, Rejected
from .routes import RouteMatch

__all__ = ["Endpoint", "LinkHandler", "LinkRefused"]


class Endpoint(Protocol):
    """What link handlers use of their connection (`endpoint.AmqpEndpoint` implements it)."""

    ctx: AmqpContext
    protocol: str
    cbs_repliers: list[Any]

    @property
    def closed(self) -> bool: ...

    def settle(self, link: Link, delivery_ids: Iterable[int], state: Any) -> None: ...

    def send_transfer(self, link: Link, payload: bytes, *, settled: bool) -> int: ...

    def send_message(self, link: Link, message: Message, *, settled: bool) -> int: ...

    def detach(self, handler: LinkHandler, condition: str, description: str) -> None: ...

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None: ...

    def audit(self, action: str, reason: str, **details: Any) -> None: ...

    async def authorize_device(self, handler: LinkHandler, device_id: str,
                               module_id: str | None) -> Principal: ...

    def authorize_service(self, handler: LinkHandler, permission: Permission) -> Principal: ...

    def identity(self, principal: Principal) -> Any: ...

    async def put_token(self, token: str, audience: str) -> Any: ...


class LinkRefused(Exception):
    """Raised by `open()`: refuse the attach with `condition`; `reason` is the audit slug."""

    def __init__(self, condition: str, reason: str, description: str = "", **details: Any) -> None:
        super().__init__(f"{condition}: {reason}")
        self.condition = condition
        self.reason = reason
        self.description = description or reason
        self.details = details


class LinkHandler:
    """Base class: accepts the link as the peer proposed it and refuses every message."""

    credit = 0  # receiving links: the credit window to keep open
    max_message_size: int | None = None

    def __init__(self, endpoint: Endpoint, link: Link, match: RouteMatch) -> None:
        self.endpoint = endpoint
        self.link = link
        self.match = match
        self.scope: tuple[Any, ...] | None = None  # the identity grant the link depends on

    async def open(self) -> None:
        """Authorize (raise `LinkRefused`), then the endpoint accepts with `attach_options()`."""

    def attach_options(self) -> dict[str, Any]:
        return {"credit": self.credit, "max_message_size": self.max_message_size}

    def on_attached(self) -> None:
        """Our attach went out: the link is usable."""

    def on_message(self, event: MessageReceived) -> None:
        if not event.settled:
            self.endpoint.settle(self.link, [event.delivery_id],
                                 Rejected(Error(NOT_IMPLEMENTED, "this node accepts no messages")))

    def on_credit(self) -> None:
        """The peer gave us credit on a link we send on."""

    def on_delivery(self, event: DeliveryUpdated) -> None:
        """The peer settled (or changed the state of) a delivery we sent."""

    def on_detach(self) -> None:
        """The link is gone (detached by either side, its session or the connection ended)."""
