"""AMQP 1.0 messages (spec part 3.2): the bare message and its annotations as one frozen dataclass.

A transfer's payload is a sequence of sections: header, delivery-annotations, message-annotations,
properties, application-properties, the body (one or more data sections, one or more amqp-sequence
sections, or one amqp-value section) and a footer. `decode_message` reads them (in that order, each
at most once) and `Message.encode()` writes them back; annotation keys are symbols on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from .composite import Composite, composite, invalid, register
from .decode import decode_value
from .encode import encode_binary, encode_map, encode_value
from .errors import DECODE_ERROR, ProtocolError
from .types import Described

__all__ = [
    "AmqpSequence",
    "AmqpValue",
    "Body",
    "Header",
    "Message",
    "Properties",
    "decode_message",
]


@composite(0x70, "amqp:header:list",
           "durable:bool priority:ubyte ttl:uint first_acquirer:bool delivery_count:uint")
@dataclass(frozen=True, slots=True)
class Header(Composite):
    durable: bool = False
    priority: int = 4
    ttl: int | None = None  # milliseconds
    first_acquirer: bool = False
    delivery_count: int = 0


@composite(0x73, "amqp:properties:list",
           "message_id:any user_id:binary to:string subject:string reply_to:string correlation_id:any "
           "content_type:symbol content_encoding:symbol absolute_expiry_time:timestamp "
           "creation_time:timestamp group_id:string group_sequence:uint reply_to_group_id:string")
@dataclass(frozen=True, slots=True)
class Properties(Composite):
    message_id: Any = None  # ulong | uuid | binary | string, kept with its AMQP type
    user_id: bytes | None = None
    to: str | None = None
    subject: str | None = None
    reply_to: str | None = None
    correlation_id: Any = None
    content_type: str | None = None
    content_encoding: str | None = None
    absolute_expiry_time: int | None = None  # milliseconds since the epoch
    creation_time: int | None = None
    group_id: str | None = None
    group_sequence: int | None = None
    reply_to_group_id: str | None = None


register(Header, Properties)


@dataclass(frozen=True, slots=True)
class AmqpValue:
    """An amqp-value body: one AMQP value (a CBS token is a string, a management reply a map)."""

    value: Any


@dataclass(frozen=True, slots=True)
class AmqpSequence:
    """One or more amqp-sequence body sections."""

    sections: tuple[list[Any], ...]


Body = tuple[bytes, ...] | AmqpValue | AmqpSequence
"""Data sections (a tuple of binaries, possibly empty), an amqp-value or amqp-sequence sections."""

_HEADER, _DELIVERY_ANN, _MESSAGE_ANN, _PROPERTIES, _APP_PROPS = 0x70, 0x71, 0x72, 0x73, 0x74
_DATA, _SEQUENCE, _VALUE, _FOOTER = 0x75, 0x76, 0x77, 0x78
_SYMBOLIC: Final = {
    "amqp:header:list": _HEADER, "amqp:delivery-annotations:map": _DELIVERY_ANN,
    "amqp:message-annotations:map": _MESSAGE_ANN, "amqp:properties:list": _PROPERTIES,
    "amqp:application-properties:map": _APP_PROPS, "amqp:data:binary": _DATA,
    "amqp:amqp-sequence:list": _SEQUENCE, "amqp:amqp-value:*": _VALUE, "amqp:footer:map": _FOOTER,
}
_DATA_HEAD: Final = b"\x00\x53\x75"


@dataclass(frozen=True, slots=True)
class Message:
    header: Header | None = None
    delivery_annotations: dict[Any, Any] | None = None
    message_annotations: dict[Any, Any] | None = None
    properties: Properties | None = None
    application_properties: dict[Any, Any] | None = None
    body: Body = field(default=())
    footer: dict[Any, Any] | None = None

    @property
    def data(self) -> bytes:
        """The body's data sections joined (empty for an amqp-value or amqp-sequence body)."""
        body = self.body
        if isinstance(body, tuple):
            return body[0] if len(body) == 1 else b"".join(body)
        return b""

    def encode(self) -> bytes:
        out = bytearray()
        if self.header is not None:
            self.header.encode_into(out)
        for code, section in ((_DELIVERY_ANN, self.delivery_annotations),
                              (_MESSAGE_ANN, self.message_annotations)):
            if section is not None:
                out += bytes((0x00, 0x53, code))
                encode_map(section, out, symbol_keys=True)
        if self.properties is not None:
            self.properties.encode_into(out)
        if self.application_properties is not None:
            out += bytes((0x00, 0x53, _APP_PROPS))
            encode_map(self.application_properties, out)
        body = self.body
        if isinstance(body, tuple):
            for data in body:
                out += _DATA_HEAD
                encode_binary(data, out)
        elif isinstance(body, AmqpValue):
            out += bytes((0x00, 0x53, _VALUE))
            encode_value(body.value, out)
        else:
            for items in body.sections:
                out += bytes((0x00, 0x53, _SEQUENCE))
                encode_value(items, out)
        if self.footer is not None:
            out += bytes((0x00, 0x53, _FOOTER))
            encode_map(self.footer, out, symbol_keys=True)
        return bytes(out)


_ORDER: Final = {_HEADER: 0, _DELIVERY_ANN: 1, _MESSAGE_ANN: 2, _PROPERTIES: 3, _APP_PROPS: 4,
                 _DATA: 5, _SEQUENCE: 5, _VALUE: 5, _FOOTER: 6}


def _map_section(value: Any, name: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{name} must be a map")
    return value


def decode_message(payload: bytes) -> Message:
    """The message carried by a (reassembled) transfer payload. Raises `ProtocolError`
    (amqp:decode-error / amqp:invalid-field) when it is not a valid message."""
    parts: dict[str, Any] = {}
    data: list[bytes] = []
    sequence: list[list[Any]] = []
    value: AmqpValue | None = None
    last = -1
    pos, end = 0, len(payload)
    while pos < end:
        if payload[pos] == 0 and payload[pos + 1: pos + 2] == b"\x53" and end > pos + 3:
            code = payload[pos + 2]  # the usual small-ulong descriptor: no Described object
            content, pos = decode_value(payload, pos + 3)
        else:
            section, pos = decode_value(payload, pos)
            if not isinstance(section, Described):
                raise ProtocolError(DECODE_ERROR, "message section is not a described value")
            descriptor = section.descriptor
            code = _SYMBOLIC.get(descriptor, -1) if isinstance(descriptor, str) else int(descriptor)
            content = section.value
        order = _ORDER.get(code)
        if order is None:
            raise ProtocolError(DECODE_ERROR, "unknown message section")
        if order < last or (order == last and code not in (_DATA, _SEQUENCE)):
            raise ProtocolError(DECODE_ERROR, "message sections out of order or repeated")
        if order == 5 and last == 5 and (value is not None or (data and code != _DATA)
                                         or (sequence and code != _SEQUENCE)):
            raise ProtocolError(DECODE_ERROR, "a message body mixes section kinds")
        last = order
        if code == _DATA:
            if not isinstance(content, bytes):
                raise invalid("data section must be binary")
            data.append(content)
        elif code == _SEQUENCE:
            if not isinstance(content, list):
                raise invalid("amqp-sequence section must be a list")
            sequence.append(content)
        elif code == _VALUE:
            value = AmqpValue(content)
        elif code == _HEADER:
            parts["header"] = Header.from_fields(_list(content, "header"))
        elif code == _PROPERTIES:
            parts["properties"] = Properties.from_fields(_list(content, "properties"))
        elif code == _DELIVERY_ANN:
            parts["delivery_annotations"] = _map_section(content, "delivery-annotations")
        elif code == _MESSAGE_ANN:
            parts["message_annotations"] = _map_section(content, "message-annotations")
        elif code == _APP_PROPS:
            parts["application_properties"] = _map_section(content, "application-properties")
        else:
            parts["footer"] = _map_section(content, "footer")
    body: Body = value if value is not None else AmqpSequence(tuple(sequence)) if sequence else tuple(data)
    return Message(body=body, **parts)


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(f"{name} must be a list")
    return value
