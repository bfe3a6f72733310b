"""Session and link bookkeeping of the engine (spec 2.5 and 2.6), read by the engine's caller.

A `Session` holds the transfer-number windows of one begin/end pair; a `Link` the credit and
delivery count of one attached link, plus `handler`, a slot for the caller's object that serves it.
Both are mutated only by `AmqpConnection`; callers read them.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .performatives import Attach, Role

__all__ = ["Link", "LinkState", "OutgoingDelivery", "Session"]


class LinkState(enum.Enum):
    ATTACH_RECEIVED = 1  # the peer's attach is in; ours is not sent yet
    ATTACHED = 2
    DETACH_SENT = 3  # we detached; waiting for the peer's detach
    DETACHED = 4


@dataclass(slots=True, eq=False)
class Link:
    """One link, from the hub's side: `role` is OUR role (the peer's attach has the other)."""

    session: Session
    handle: int  # the peer's handle; ours is the same number
    name: str
    role: Role
    attach: Attach  # the peer's attach
    state: LinkState = LinkState.ATTACH_RECEIVED
    delivery_count: int = 0
    credit: int = 0  # receiver: credit we granted; sender: credit the peer gave us
    available: int = 0
    drain: bool = False
    credit_window: int = 0  # receiver: top credit up to this as deliveries complete
    unsettled_in: int = 0  # receiver: deliveries received unsettled and not settled by us yet
    max_message_size: int = 0  # receiver: our limit (0: none beyond the engine's)
    partial: list[bytes] | None = None  # receiver: frames of a delivery still arriving
    partial_size: int = 0
    partial_id: int = 0
    partial_tag: bytes = b""
    partial_settled: bool = False
    partial_format: int = 0
    next_tag: int = 0  # sender: automatic delivery tags
    handler: Any = None  # the caller's object serving this link

    @property
    def channel(self) -> int:
        return self.session.channel

    @property
    def source_address(self) -> str | None:
        source = self.attach.source
        return source.address if source is not None else None

    @property
    def target_address(self) -> str | None:
        target = self.attach.target
        return target.address if target is not None else None

    @property
    def address(self) -> str | None:
        """The node this link talks to: the peer's target when it sends to us, its source when it
        receives from us."""
        return self.target_address if self.role is Role.RECEIVER else self.source_address

    @property
    def attached(self) -> bool:
        return self.state is LinkState.ATTACHED


@dataclass(slots=True)
class OutgoingDelivery:
    link: Link
    tag: bytes


@dataclass(slots=True, eq=False)
class Session:
    channel: int  # the peer's channel; ours is the same number
    handle_max: int
    next_incoming_id: int = 0
    incoming_window: int = 0  # what we still accept before our next session flow
    next_outgoing_id: int = 0
    remote_incoming_window: int = 0
    remote_outgoing_window: int = 0
    links: dict[int, Link] = field(default_factory=dict)  # by handle
    unsettled_out: dict[int, OutgoingDelivery] = field(default_factory=dict)  # by delivery id
    queued: deque[bytes] = field(default_factory=deque)  # transfer frames waiting for window
    ending: bool = False  # we sent end
