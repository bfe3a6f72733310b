"""`LinkHandler`: what serves one attached link (a CBS node, a device's telemetry, a C2D queue, …).

The endpoint creates the handler its route names when the peer attaches, awaits `open()` (which
authorizes and then accepts or refuses the link through the endpoint), and calls the `on_*` methods
for the link's events, on the event loop. A handler sends and settles through `self.endpoint`, which
writes the bytes out afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import NOT_IMPLEMENTED
from .events import DeliveryUpdated, MessageReceived
from .links import Link
from .performatives import Error, Rejected
from .routes import RouteMatch

if TYPE_CHECKING:
    from .endpoint import AmqpEndpoint

__all__ = ["LinkHandler", "LinkRefused"]


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

    def __init__(self, endpoint: AmqpEndpoint, link: Link, match: RouteMatch) -> None:
        self.endpoint = endpoint
        self.link = link
        self.match = match
        self.scope: tuple[Any, ...] | None = None  # the identity grant the link depends on

    async def open(self) -> None:
        """Authorize (raise `LinkRefused`), then the endpoint accepts with `attach_options()`."""

    def attach_options(self) -> dict[str, Any]:
        return {"credit": self.credit, "max_message_size": self.max_message_size}

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
