"""The AMQP 1.0 frame bodies and the composites they carry, as frozen dataclasses.

Performatives (spec 2.7): open, begin, attach, flow, transfer, disposition, detach, end, close.
SASL frames (5.3.3): sasl-mechanisms, sasl-init, sasl-challenge, sasl-response, sasl-outcome.
Terminus and error types: source, target (3.5), error (2.8.14); delivery states (3.4): received,
accepted, rejected, released, modified. Field names follow the spec with `_` for `-`; defaults are
the spec's defaults. Every field is always encoded (see `composite`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from .composite import Composite, composite, register

__all__ = [
    "DELIVERY_STATES",
    "PERFORMATIVES",
    "SASL_FRAMES",
    "Accepted",
    "Attach",
    "Begin",
    "Close",
    "Detach",
    "Disposition",
    "End",
    "Error",
    "Flow",
    "Modified",
    "Open",
    "Performative",
    "Received",
    "ReceiverSettleMode",
    "Rejected",
    "Released",
    "Role",
    "SaslChallenge",
    "SaslCode",
    "SaslInit",
    "SaslMechanisms",
    "SaslOutcome",
    "SaslResponse",
    "SenderSettleMode",
    "Source",
    "Target",
    "Transfer",
]

_ALL_STATES = "*received|accepted|rejected|released|modified"
_OUTCOMES = "*accepted|rejected|released|modified"


class Role(enum.IntEnum):
    """`role` is a boolean on the wire: False = sender, True = receiver."""

    SENDER = 0
    RECEIVER = 1


class SenderSettleMode(enum.IntEnum):
    UNSETTLED = 0
    SETTLED = 1
    MIXED = 2


class ReceiverSettleMode(enum.IntEnum):
    FIRST = 0
    SECOND = 1


class SaslCode(enum.IntEnum):
    OK = 0
    AUTH = 1
    SYS = 2
    SYS_PERM = 3
    SYS_TEMP = 4


# --- error and delivery states ----------------------------------------------------------------------
@composite(0x1D, "amqp:error:list", "condition:symbol! description:string info:fields")
@dataclass(frozen=True, slots=True)
class Error(Composite):
    condition: str
    description: str | None = None
    info: dict[Any, Any] | None = None


@composite(0x23, "amqp:received:list", "section_number:uint! section_offset:ulong!")
@dataclass(frozen=True, slots=True)
class Received(Composite):
    section_number: int
    section_offset: int


@composite(0x24, "amqp:accepted:list", "")
@dataclass(frozen=True, slots=True)
class Accepted(Composite):
    pass


@composite(0x25, "amqp:rejected:list", "error:*error")
@dataclass(frozen=True, slots=True)
class Rejected(Composite):
    error: Error | None = None


@composite(0x26, "amqp:released:list", "")
@dataclass(frozen=True, slots=True)
class Released(Composite):
    pass


@composite(0x27, "amqp:modified:list",
           "delivery_failed:bool undeliverable_here:bool message_annotations:fields")
@dataclass(frozen=True, slots=True)
class Modified(Composite):
    delivery_failed: bool = False
    undeliverable_here: bool = False
    message_annotations: dict[Any, Any] | None = None


DELIVERY_STATES: Final = (Received, Accepted, Rejected, Released, Modified)
ACCEPTED: Final = Accepted()
RELEASED: Final = Released()


# --- terminus ---------------------------------------------------------------------------------------
@composite(0x28, "amqp:source:list",
           "address:string durable:uint expiry_policy:symbol timeout:uint dynamic:bool "
           "dynamic_node_properties:fields distribution_mode:symbol filter:map "
           f"default_outcome:{_OUTCOMES} outcomes:symbols capabilities:symbols")
@dataclass(frozen=True, slots=True)
class Source(Composite):
    address: str | None = None
    durable: int = 0
    expiry_policy: str = "session-end"
    timeout: int = 0
    dynamic: bool = False
    dynamic_node_properties: dict[Any, Any] | None = None
    distribution_mode: str | None = None
    filter: dict[Any, Any] | None = None
    default_outcome: Any = None
    outcomes: tuple[str, ...] | None = None
    capabilities: tuple[str, ...] | None = None


@composite(0x29, "amqp:target:list",
           "address:string durable:uint expiry_policy:symbol timeout:uint dynamic:bool "
           "dynamic_node_properties:fields capabilities:symbols")
@dataclass(frozen=True, slots=True)
class Target(Composite):
    address: str | None = None
    durable: int = 0
    expiry_policy: str = "session-end"
    timeout: int = 0
    dynamic: bool = False
    dynamic_node_properties: dict[Any, Any] | None = None
    capabilities: tuple[str, ...] | None = None


# --- performatives ----------------------------------------------------------------------------------
class Performative(Composite):
    """A frame body of the AMQP frame type."""

    __slots__ = ()


@composite(0x10, "amqp:open:list",
           "container_id:string! hostname:string max_frame_size:uint channel_max:ushort "
           "idle_time_out:uint outgoing_locales:symbols incoming_locales:symbols "
           "offered_capabilities:symbols desired_capabilities:symbols properties:fields")
@dataclass(frozen=True, slots=True)
class Open(Performative):
    container_id: str
    hostname: str | None = None
    max_frame_size: int = 0xFFFF_FFFF
    channel_max: int = 0xFFFF
    idle_time_out: int | None = None  # milliseconds
    outgoing_locales: tuple[str, ...] | None = None
    incoming_locales: tuple[str, ...] | None = None
    offered_capabilities: tuple[str, ...] | None = None
    desired_capabilities: tuple[str, ...] | None = None
    properties: dict[Any, Any] | None = None


@composite(0x11, "amqp:begin:list",
           "remote_channel:ushort next_outgoing_id:uint! incoming_window:uint! outgoing_window:uint! "
           "handle_max:uint offered_capabilities:symbols desired_capabilities:symbols properties:fields")
@dataclass(frozen=True, slots=True)
class Begin(Performative):
    remote_channel: int | None
    next_outgoing_id: int
    incoming_window: int
    outgoing_window: int
    handle_max: int = 0xFFFF_FFFF
    offered_capabilities: tuple[str, ...] | None = None
    desired_capabilities: tuple[str, ...] | None = None
    properties: dict[Any, Any] | None = None


@composite(0x12, "amqp:attach:list",
           "name:string! handle:uint! role:bool! snd_settle_mode:ubyte rcv_settle_mode:ubyte "
           "source:*source target:*target unsettled:map incomplete_unsettled:bool "
           "initial_delivery_count:uint max_message_size:ulong offered_capabilities:symbols "
           "desired_capabilities:symbols properties:fields")
@dataclass(frozen=True, slots=True)
class Attach(Performative):
    name: str
    handle: int
    role: bool  # Role.RECEIVER (True) when the sender of this frame receives
    snd_settle_mode: int = SenderSettleMode.MIXED
    rcv_settle_mode: int = ReceiverSettleMode.FIRST
    source: Source | None = None
    target: Target | None = None
    unsettled: dict[Any, Any] | None = None
    incomplete_unsettled: bool = False
    initial_delivery_count: int | None = None
    max_message_size: int | None = None
    offered_capabilities: tuple[str, ...] | None = None
    desired_capabilities: tuple[str, ...] | None = None
    properties: dict[Any, Any] | None = None


@composite(0x13, "amqp:flow:list",
           "next_incoming_id:uint incoming_window:uint! next_outgoing_id:uint! outgoing_window:uint! "
           "handle:uint delivery_count:uint link_credit:uint available:uint drain:bool echo:bool "
           "properties:fields")
@dataclass(frozen=True, slots=True)
class Flow(Performative):
    next_incoming_id: int | None
    incoming_window: int
    next_outgoing_id: int
    outgoing_window: int
    handle: int | None = None
    delivery_count: int | None = None
    link_credit: int | None = None
    available: int | None = None
    drain: bool = False
    echo: bool = False
    properties: dict[Any, Any] | None = None


@composite(0x14, "amqp:transfer:list",
           "handle:uint! delivery_id:uint delivery_tag:binary message_format:uint settled:bool "
           f"more:bool rcv_settle_mode:ubyte state:{_ALL_STATES} resume:bool aborted:bool batchable:bool")
@dataclass(frozen=True, slots=True)
class Transfer(Performative):
    handle: int
    delivery_id: int | None = None
    delivery_tag: bytes | None = None
    message_format: int | None = None
    settled: bool | None = None  # None: not set (inherits within a multi-frame delivery)
    more: bool = False
    rcv_settle_mode: int | None = None
    state: Any = None
    resume: bool = False
    aborted: bool = False
    batchable: bool = False


@composite(0x15, "amqp:disposition:list",
           f"role:bool! first:uint! last:uint settled:bool state:{_ALL_STATES} batchable:bool")
@dataclass(frozen=True, slots=True)
class Disposition(Performative):
    role: bool
    first: int
    last: int | None = None
    settled: bool = False
    state: Any = None
    batchable: bool = False


@composite(0x16, "amqp:detach:list", "handle:uint! closed:bool error:*error")
@dataclass(frozen=True, slots=True)
class Detach(Performative):
    handle: int
    closed: bool = False
    error: Error | None = None


@composite(0x17, "amqp:end:list", "error:*error")
@dataclass(frozen=True, slots=True)
class End(Performative):
    error: Error | None = None


@composite(0x18, "amqp:close:list", "error:*error")
@dataclass(frozen=True, slots=True)
class Close(Performative):
    error: Error | None = None


PERFORMATIVES: Final = (Open, Begin, Attach, Flow, Transfer, Disposition, Detach, End, Close)


# --- SASL -------------------------------------------------------------------------------------------
@composite(0x40, "amqp:sasl-mechanisms:list", "sasl_server_mechanisms:symbols!")
@dataclass(frozen=True, slots=True)
class SaslMechanisms(Composite):
    sasl_server_mechanisms: tuple[str, ...]


@composite(0x41, "amqp:sasl-init:list", "mechanism:symbol! initial_response:binary hostname:string")
@dataclass(frozen=True, slots=True)
class SaslInit(Composite):
    mechanism: str
    initial_response: bytes | None = None
    hostname: str | None = None


@composite(0x42, "amqp:sasl-challenge:list", "challenge:binary!")
@dataclass(frozen=True, slots=True)
class SaslChallenge(Composite):
    challenge: bytes


@composite(0x43, "amqp:sasl-response:list", "response:binary!")
@dataclass(frozen=True, slots=True)
class SaslResponse(Composite):
    response: bytes


@composite(0x44, "amqp:sasl-outcome:list", "code:ubyte! additional_data:binary")
@dataclass(frozen=True, slots=True)
class SaslOutcome(Composite):
    code: int
    additional_data: bytes | None = None


SASL_FRAMES: Final = (SaslMechanisms, SaslInit, SaslChallenge, SaslResponse, SaslOutcome)

register(Error, *DELIVERY_STATES, Source, Target, *PERFORMATIVES, *SASL_FRAMES)
