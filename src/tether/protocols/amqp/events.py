"""What `AmqpConnection.next_event()` reports to its caller: small immutable events.

The engine answers the mechanical parts itself (headers, begin, end, detach and close echoes, session
windows, link credit top-ups, heartbeats); these events are what needs a decision or a reaction from
the hub: authenticate (`SaslInitReceived`), route a link (`LinkAttached`), handle a message
(`MessageReceived`), send on credit (`CreditChanged`), settle C2D (`DeliveryUpdated`), clean up
(`LinkDetached`, `SessionEnded`, `ConnectionClosed`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .performatives import Error, Open

if TYPE_CHECKING:
    from .links import Link

__all__ = [
    "NEED_DATA",
    "ConnectionClosed",
    "CreditChanged",
    "DeliveryUpdated",
    "Event",
    "LinkAttached",
    "LinkDetached",
    "LinkError",
    "MessageReceived",
    "NeedData",
    "Opened",
    "ProtocolHeaderReceived",
    "SaslInitReceived",
    "SessionBegun",
    "SessionEnded",
]


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""`next_event()`: no complete frame buffered, or the engine waits for the caller's SASL outcome."""


@dataclass(frozen=True, slots=True)
class ProtocolHeaderReceived:
    """The peer's protocol header: `sasl` True for the SASL layer, False for plain AMQP (after SASL
    completed, or straight away when the peer skips SASL, as the Node IoT SDKs do)."""

    sasl: bool


@dataclass(frozen=True, slots=True)
class SaslInitReceived:
    """Decide with `AmqpConnection.sasl_outcome(code)`; nothing else is processed until then."""

    mechanism: str
    initial_response: bytes | None
    hostname: str | None


@dataclass(frozen=True, slots=True)
class Opened:
    """The peer's open arrived and ours was sent; sessions may begin."""

    open: Open


@dataclass(frozen=True, slots=True)
class SessionBegun:
    channel: int


@dataclass(frozen=True, slots=True)
class SessionEnded:
    channel: int
    error: Error | None


@dataclass(frozen=True, slots=True)
class LinkAttached:
    """The peer attached a link; answer with `accept_link` or `refuse_link` (now or later)."""

    link: Link


@dataclass(frozen=True, slots=True)
class LinkDetached:
    """The link is gone: the peer detached it, or its session ended."""

    link: Link
    error: Error | None
    closed: bool


@dataclass(frozen=True, slots=True)
class LinkError:
    """The engine detached the link itself (e.g. `amqp:link:message-size-exceeded`)."""

    link: Link
    error: Error


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete delivery on one of our receiving links. `payload` is the encoded message
    (`decode_message`); an unsettled one waits for `settle()`."""

    link: Link
    delivery_id: int
    delivery_tag: bytes
    settled: bool
    payload: bytes
    message_format: int


@dataclass(frozen=True, slots=True)
class CreditChanged:
    """The peer changed the credit of one of our sending links (`link.credit`, `link.drain`)."""

    link: Link


@dataclass(frozen=True, slots=True)
class DeliveryUpdated:
    """The peer's disposition for a delivery we sent."""

    link: Link
    delivery_id: int
    delivery_tag: bytes
    state: Any
    settled: bool


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    error: Error | None


Event = (ProtocolHeaderReceived | SaslInitReceived | Opened | SessionBegun | SessionEnded | LinkAttached
         | LinkDetached | LinkError | MessageReceived | CreditChanged | DeliveryUpdated | ConnectionClosed)
