"""AMQP 1.0 framing (spec 2.3): protocol headers and frames, as byte strings.

A frame is a 4-byte size, a data offset (in 4-byte words, at least 2), a type (0 AMQP, 1 SASL), a
2-byte channel, an extended header we skip, then the body: one performative (or SASL frame) and, for
a transfer, the message payload after it. An AMQP frame with an empty body is a heartbeat.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from .composite import Composite, decode_composite
from .decode import decode_value
from .errors import FRAMING_ERROR, ProtocolError
from .performatives import Transfer
from .types import UInt

__all__ = [
    "AMQP_HEADER",
    "FRAME_AMQP",
    "FRAME_SASL",
    "HEADER_SIZE",
    "HEARTBEAT",
    "MIN_MAX_FRAME_SIZE",
    "SASL_HEADER",
    "TLS_HEADER",
    "FrameHeader",
    "decode_body",
    "encode_frame",
    "parse_frame_header",
]

AMQP_HEADER: Final = b"AMQP\x00\x01\x00\x00"
SASL_HEADER: Final = b"AMQP\x03\x01\x00\x00"
TLS_HEADER: Final = b"AMQP\x02\x01\x00\x00"
HEADER_SIZE: Final = 8
FRAME_AMQP: Final = 0
FRAME_SASL: Final = 1
MIN_MAX_FRAME_SIZE: Final = 512
HEARTBEAT: Final = b"\x00\x00\x00\x08\x02\x00\x00\x00"

_HEAD = struct.Struct(">IBBH")


@dataclass(frozen=True, slots=True)
class FrameHeader:
    size: int
    body_offset: int
    frame_type: int
    channel: int


def parse_frame_header(buf: bytes | bytearray, pos: int, max_frame_size: int) -> FrameHeader:
    """The header of the frame at `pos` (the caller made sure 8 bytes are there)."""
    size, doff, frame_type, channel = _HEAD.unpack_from(buf, pos)
    if size < HEADER_SIZE:
        raise ProtocolError(FRAMING_ERROR, f"frame size {size} is below 8", reason="bad-frame")
    if size > max_frame_size:
        raise ProtocolError(FRAMING_ERROR, f"frame of {size} bytes exceeds max-frame-size {max_frame_size}",
                            reason="frame-too-large")
    if doff < 2 or doff * 4 > size:
        raise ProtocolError(FRAMING_ERROR, "bad data offset", reason="bad-frame")
    if frame_type not in (FRAME_AMQP, FRAME_SASL):
        raise ProtocolError(FRAMING_ERROR, f"unknown frame type {frame_type}", reason="bad-frame")
    return FrameHeader(size, doff * 4, frame_type, channel)


def _transfer(body: bytes) -> tuple[Composite, bytes] | None:
    """The telemetry hot path: a transfer whose fields are the usual types is built without the
    per-field checks of `Composite.from_fields` (anything unusual takes that general path)."""
    fields, end = decode_value(body, 3)
    if type(fields) is not list or not 1 <= len(fields) <= 11:
        return None
    fields += [None] * (11 - len(fields))
    handle, delivery_id, tag, message_format, settled, more, rcv_mode, state, resume, aborted, batch = fields
    if (type(handle) is not UInt or (delivery_id is not None and type(delivery_id) is not UInt)
            or (tag is not None and type(tag) is not bytes)
            or (message_format is not None and type(message_format) is not UInt)
            or (settled is not None and type(settled) is not bool)
            or (more is not None and type(more) is not bool)
            or rcv_mode is not None or state is not None
            or any(flag is not None and type(flag) is not bool for flag in (resume, aborted, batch))):
        return None
    return Transfer(handle, delivery_id, tag, message_format, settled, bool(more), None, None, bool(resume),
                    bool(aborted), bool(batch)), body[end:]


def decode_body(body: bytes) -> tuple[Composite, bytes]:
    """(performative or SASL frame, payload after it) of a non-empty frame body."""
    if body[:3] == b"\x00\x53\x14":
        fast = _transfer(body)
        if fast is not None:
            return fast
    value, end = decode_composite(body, 0)
    if not isinstance(value, Composite):
        raise ProtocolError(FRAMING_ERROR, "frame body is not a known performative", reason="bad-frame")
    return value, body[end:]


def encode_frame(channel: int, body: Composite, payload: bytes = b"", frame_type: int = FRAME_AMQP) -> bytes:
    out = bytearray(8)
    body.encode_into(out)
    if payload:
        out += payload
    _HEAD.pack_into(out, 0, len(out), 2, frame_type, channel)
    return bytes(out)
