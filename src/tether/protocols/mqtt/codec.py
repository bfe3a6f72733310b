"""Sans-I/O MQTT 3.1.1 codec in the shape of h11: bytes in, packets out; packets in, bytes out.

`MqttConnection` owns no socket, clock or thread, so the whole protocol (including every malformed
input an attacker can send) is testable and fuzzable with byte strings. It enforces the 3.1.1 wire
rules and the connection-level ordering (CONNECT first, exactly once); everything Azure-specific
(topics, usernames, QoS 2 refusal, keep-alive limits) belongs to the session above it.

Any violation raises the single `ProtocolError`; `connack_code` tells the server which CONNACK to send
before closing (None: close without one). After an error the connection stays broken: `next_event`
raises the same error again and further data is dropped.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any, Final, Literal, NoReturn

from .packets import (
    CLIENT_TO_SERVER,
    SERVER_TO_CLIENT,
    ConnAck,
    ConnAckCode,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    is_valid_topic_filter,
    is_valid_topic_name,
)

MAX_REMAINING_LENGTH: Final = 268_435_455
"""Largest value a 4-byte remaining-length varint can carry."""

DEFAULT_MAX_PACKET_SIZE: Final = 270_000
"""Matches `LimitSettings.max_mqtt_packet_bytes`: a 256 KB D2C message plus topic and headers."""

_ABSOLUTE_MAX_PACKET: Final = 1 + 4 + MAX_REMAINING_LENGTH


class NeedData(enum.Enum):
    """Type of the `NEED_DATA` sentinel (an enum so that `is NEED_DATA` narrows for mypy)."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by `next_event()` when the buffer does not yet hold a complete packet."""


class ProtocolError(Exception):
    """The peer (or our caller) broke MQTT 3.1.1. `reason` is a short slug for logs and audit."""

    def __init__(self, reason: str, connack_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connack_code = connack_code


def _check_packet_id(packet_id: int) -> None:
    if not 0 < packet_id <= 0xFFFF:
        raise ProtocolError("invalid-packet-id")


def _check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ProtocolError("invalid-qos")


# --------------------------------------------------------------------------- encoding

_U16 = struct.Struct(">H")
_SUBACK_CODES: Final = frozenset({0, 1, 2, 0x80})


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    if value > MAX_REMAINING_LENGTH:
        raise ProtocolError("packet-too-large")
    out = bytearray()
    while True:
        digit = value & 0x7F
        value >>= 7
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _str(value: str) -> bytes:
    """UTF-8 string with its 2-byte length prefix (surrogates and U+0000 refused)."""
    if "\x00" in value:
        raise ProtocolError("null-character")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("invalid-utf8") from None
    if len(raw) > 0xFFFF:
        raise ProtocolError("string-too-long")
    return _U16.pack(len(raw)) + raw


def _bin(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ProtocolError("binary-too-long")
    return _U16.pack(len(value)) + bytes(value)


def _frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int = 0,
    packet_id: int | None = None,
    *,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """Hot-path PUBLISH encoder; bypasses the connection state machine but checks every field."""
    if not is_valid_topic_name(topic):
        raise ProtocolError("invalid-topic-name")
    try:
        raw_topic = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("invalid-utf8") from None
    topic_len = len(raw_topic)
    if topic_len > 0xFFFF:
        raise ProtocolError("string-too-long")
    if qos == 0:
        if packet_id is not None or dup:
            raise ProtocolError("qos0-with-packet-id-or-dup")
        remaining = 2 + topic_len + len(payload)
        pid = b""
    elif qos == 1 or qos == 2:
        if packet_id is None or not 0 < packet_id <= 0xFFFF:
            raise ProtocolError("invalid-packet-id")
        remaining = 4 + topic_len + len(payload)
        pid = _U16.pack(packet_id)
    else:
        raise ProtocolError("invalid-qos")
    first = 0x30 | (qos << 1) | (8 if dup else 0) | (1 if retain else 0)
    if remaining < 0x80:
        head = bytes((first, remaining))
    else:
        head = bytes((first,)) + _varint(remaining)
    return b"".join((head, _U16.pack(topic_len), raw_topic, pid, payload))


def encode_puback(packet_id: int) -> bytes:
    """Hot-path PUBACK encoder (the reply to every QoS 1 telemetry message)."""
    if not 0 < packet_id <= 0xFFFF:
        raise ProtocolError("invalid-packet-id")
    return b"\x40\x02" + _U16.pack(packet_id)


def _encode_connect(p: Connect) -> bytes:
    if not 0 <= p.keep_alive <= 0xFFFF:
        raise ProtocolError("invalid-keep-alive")
    if not 0 <= p.protocol_level <= 0xFF:
        raise ProtocolError("invalid-protocol-level")
    if p.password is not None and p.username is None:
        raise ProtocolError("password-without-username")
    if not p.client_id and not p.clean_session:
        raise ProtocolError("empty-client-id", ConnAckCode.IDENTIFIER_REJECTED)
    flags = 0x02 if p.clean_session else 0
    parts = [_str(p.client_id)]
    if p.will is not None:
        _check_qos(p.will.qos)
        if not is_valid_topic_name(p.will.topic):
            raise ProtocolError("invalid-will-topic")
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
        parts += (_str(p.will.topic), _bin(p.will.payload))
    if p.username is not None:
        flags |= 0x80
        parts.append(_str(p.username))
    if p.password is not None:
        flags |= 0x40
        parts.append(_bin(p.password))
    name = "MQIsdp" if p.protocol_level == 3 else "MQTT"
    head = _str(name) + bytes((p.protocol_level, flags)) + _U16.pack(p.keep_alive)
    return _frame(0x10, head + b"".join(parts))


def _encode_connack(p: ConnAck) -> bytes:
    if not 0 <= p.return_code <= 5:
        raise ProtocolError("invalid-connack-code")
    if p.session_present and p.return_code != 0:
        raise ProtocolError("session-present-on-refusal")
    return bytes((0x20, 2, 1 if p.session_present else 0, p.return_code))


def _encode_publish_packet(p: Publish) -> bytes:
    return encode_publish(p.topic, p.payload, p.qos, p.packet_id, retain=p.retain, dup=p.dup)


def _ack(first_byte: int, packet_id: int) -> bytes:
    _check_packet_id(packet_id)
    return bytes((first_byte, 2)) + _U16.pack(packet_id)


def _encode_filters(p: Subscribe | Unsubscribe) -> bytes:
    _check_packet_id(p.packet_id)
    if not p.topics:
        raise ProtocolError("subscribe-without-topics")
    parts = [_U16.pack(p.packet_id)]
    for entry in p.topics:
        topic_filter = entry[0] if isinstance(entry, tuple) else entry
        if not is_valid_topic_filter(topic_filter):
            raise ProtocolError("invalid-topic-filter")
        parts.append(_str(topic_filter))
        if isinstance(entry, tuple):
            _check_qos(entry[1])
            parts.append(bytes((entry[1],)))
    return _frame(0x82 if isinstance(p, Subscribe) else 0xA2, b"".join(parts))


def _encode_suback(p: SubAck) -> bytes:
    _check_packet_id(p.packet_id)
    if not p.return_codes or any(code not in _SUBACK_CODES for code in p.return_codes):
        raise ProtocolError("invalid-suback-codes")
    return _frame(0x90, _U16.pack(p.packet_id) + bytes(p.return_codes))


_ENCODERS: Final[dict[type[Packet], Callable[[Any], bytes]]] = {
    Publish: _encode_publish_packet,
    PubAck: lambda p: _ack(0x40, p.packet_id),
    Connect: _encode_connect,
    ConnAck: _encode_connack,
    PubRec: lambda p: _ack(0x50, p.packet_id),
    PubRel: lambda p: _ack(0x62, p.packet_id),
    PubComp: lambda p: _ack(0x70, p.packet_id),
    Subscribe: _encode_filters,
    SubAck: _encode_suback,
    Unsubscribe: _encode_filters,
    UnsubAck: lambda p: _ack(0xB0, p.packet_id),
    PingReq: lambda p: b"\xc0\x00",
    PingResp: lambda p: b"\xd0\x00",
    Disconnect: lambda p: b"\xe0\x00",
}


def encode_packet(packet: Packet) -> bytes:
    """Encode any packet without connection-state checks (tests, tools); raises ProtocolError."""
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise ProtocolError("not-a-packet")
    return encoder(packet)


# --------------------------------------------------------------------------- decoding

# Indexed by packet type (0..15): the fixed-header flags each type must carry (None: PUBLISH or
# reserved type) and the remaining length of the fixed-size packets (None: variable).
_REQUIRED_FLAGS: Final = (None, 0, 0, None, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, None)
_FIXED_LENGTH: Final = (None, None, 2, None, 2, 2, 2, 2, None, None, None, 2, 0, 0, 0, None)
_SERVER_RECEIVES: Final = frozenset({1, 3, 4, 5, 6, 7, 8, 10, 12, 14})
_CLIENT_RECEIVES: Final = frozenset({2, 3, 4, 5, 6, 7, 9, 11, 13})


def _field_end(buf: bytearray, i: int, end: int) -> int:
    """End offset of the 2-byte-length-prefixed field at `i`, checked against the packet end."""
    j = i + 2 + ((buf[i] << 8) | buf[i + 1]) if i + 2 <= end else end + 1
    if j > end:
        raise ProtocolError("truncated-packet")
    return j


def _read_str(buf: bytearray, mv: memoryview, i: int, end: int) -> tuple[str, int]:
    """Read a length-prefixed UTF-8 string; strict decoding already refuses surrogates."""
    j = _field_end(buf, i, end)
    try:
        value = str(mv[i + 2 : j], "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid-utf8") from None
    if "\x00" in value:
        raise ProtocolError("null-character")
    return value, j


def _read_bin(buf: bytearray, mv: memoryview, i: int, end: int) -> tuple[bytes, int]:
    j = _field_end(buf, i, end)
    return mv[i + 2 : j].tobytes(), j


def _read_packet_id(buf: bytearray, i: int, end: int) -> int:
    if i + 2 > end:
        raise ProtocolError("truncated-packet")
    packet_id = (buf[i] << 8) | buf[i + 1]
    if packet_id == 0:
        raise ProtocolError("zero-packet-id")
    return packet_id


def _decode_connect(buf: bytearray, mv: memoryview, i: int, end: int) -> Connect:
    name, i = _read_str(buf, mv, i, end)
    if i >= end:
        raise ProtocolError("truncated-packet")
    level = buf[i]
    if name == "MQIsdp":
        raise ProtocolError("unsupported-protocol-version", ConnAckCode.UNACCEPTABLE_PROTOCOL_VERSION)
    if name != "MQTT":
        raise ProtocolError("unknown-protocol-name")
    if level != 4:
        raise ProtocolError("unsupported-protocol-version", ConnAckCode.UNACCEPTABLE_PROTOCOL_VERSION)
    if i + 4 > end:
        raise ProtocolError("truncated-packet")
    flags = buf[i + 1]
    keep_alive = (buf[i + 2] << 8) | buf[i + 3]
    i += 4
    if flags & 0x01:
        raise ProtocolError("reserved-connect-flag")
    will_qos = (flags >> 3) & 3
    has_will = bool(flags & 0x04)
    if will_qos == 3:
        raise ProtocolError("invalid-will-qos")
    if not has_will and flags & 0x38:
        raise ProtocolError("will-flags-without-will")
    if flags & 0x40 and not flags & 0x80:
        raise ProtocolError("password-without-username")
    client_id, i = _read_str(buf, mv, i, end)
    will = None
    if has_will:
        will_topic, i = _read_str(buf, mv, i, end)
        if not is_valid_topic_name(will_topic):
            raise ProtocolError("invalid-will-topic")
        will_payload, i = _read_bin(buf, mv, i, end)
        will = Will(will_topic, will_payload, will_qos, bool(flags & 0x20))
    username = password = None
    if flags & 0x80:
        username, i = _read_str(buf, mv, i, end)
    if flags & 0x40:
        password, i = _read_bin(buf, mv, i, end)
    if i != end:
        raise ProtocolError("trailing-bytes")
    clean_session = bool(flags & 0x02)
    if not client_id and not clean_session:
        raise ProtocolError("empty-client-id", ConnAckCode.IDENTIFIER_REJECTED)
    return Connect(client_id, username, password, keep_alive, clean_session, will, level)


def _decode_filters(buf: bytearray, mv: memoryview, i: int, end: int, with_qos: bool) -> Packet:
    """SUBSCRIBE (filter, QoS byte)* or UNSUBSCRIBE filter*, at least one entry either way."""
    packet_id = _read_packet_id(buf, i, end)
    i += 2
    entries: list[tuple[str, int]] = []
    while i < end:
        topic_filter, i = _read_str(buf, mv, i, end)
        if not is_valid_topic_filter(topic_filter):
            raise ProtocolError("invalid-topic-filter")
        qos = 0
        if with_qos:
            if i >= end:
                raise ProtocolError("truncated-packet")
            qos = buf[i]
            i += 1
            if qos > 2:
                raise ProtocolError("invalid-qos")
        entries.append((topic_filter, qos))
    if not entries:
        raise ProtocolError("subscribe-without-topics" if with_qos else "unsubscribe-without-topics")
    if with_qos:
        return Subscribe(packet_id, tuple(entries))
    return Unsubscribe(packet_id, tuple(entry[0] for entry in entries))


def _decode_suback(buf: bytearray, i: int, end: int) -> SubAck:
    packet_id = _read_packet_id(buf, i, end)
    codes = tuple(buf[i + 2 : end])
    if not codes or any(code not in _SUBACK_CODES for code in codes):
        raise ProtocolError("invalid-suback-codes")
    return SubAck(packet_id, codes)


def _decode_connack(buf: bytearray, i: int) -> ConnAck:
    ack_flags, code = buf[i], buf[i + 1]
    if ack_flags & 0xFE:
        raise ProtocolError("reserved-connack-flags")
    if code > 5:
        raise ProtocolError("invalid-connack-code")
    if ack_flags and code:
        raise ProtocolError("session-present-on-refusal")
    return ConnAck(bool(ack_flags), code)


def _decode_publish(buf: bytearray, mv: memoryview, flags: int, i: int, end: int) -> Publish:
    """The hot path: one string, an optional packet id and a single copy of the payload."""
    if i + 2 > end:
        raise ProtocolError("truncated-packet")
    j = i + 2 + ((buf[i] << 8) | buf[i + 1])
    if j > end:
        raise ProtocolError("truncated-packet")
    try:
        topic = str(mv[i + 2 : j], "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid-utf8") from None
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise ProtocolError("null-character" if "\x00" in topic else "invalid-topic-name")
    qos = (flags >> 1) & 3
    packet_id = None
    if qos:
        if j + 2 > end:
            raise ProtocolError("truncated-packet")
        packet_id = (buf[j] << 8) | buf[j + 1]
        if packet_id == 0:
            raise ProtocolError("zero-packet-id")
        j += 2
    return Publish(topic, mv[j:end].tobytes(), qos, bool(flags & 1), bool(flags & 8), packet_id)


_PINGREQ, _PINGRESP, _DISCONNECT = PingReq(), PingResp(), Disconnect()
_Decoder = Callable[[bytearray, memoryview, int, int], Packet]
_DECODERS: Final[dict[int, _Decoder]] = {
    1: _decode_connect,
    2: lambda buf, mv, i, end: _decode_connack(buf, i),
    4: lambda buf, mv, i, end: PubAck(_read_packet_id(buf, i, end)),
    5: lambda buf, mv, i, end: PubRec(_read_packet_id(buf, i, end)),
    6: lambda buf, mv, i, end: PubRel(_read_packet_id(buf, i, end)),
    7: lambda buf, mv, i, end: PubComp(_read_packet_id(buf, i, end)),
    8: lambda buf, mv, i, end: _decode_filters(buf, mv, i, end, True),
    9: lambda buf, mv, i, end: _decode_suback(buf, i, end),
    10: lambda buf, mv, i, end: _decode_filters(buf, mv, i, end, False),
    11: lambda buf, mv, i, end: UnsubAck(_read_packet_id(buf, i, end)),
    12: lambda buf, mv, i, end: _PINGREQ,
    13: lambda buf, mv, i, end: _PINGRESP,
    14: lambda buf, mv, i, end: _DISCONNECT,
}
"""Decoders for every packet type but PUBLISH (decoded inline); indexed by type nibble."""


class _State(enum.Enum):
    HANDSHAKE = "handshake"  # server: waiting for CONNECT; client: waiting for CONNACK
    CONNECTED = "connected"
    CLOSED = "closed"  # server received DISCONNECT


class MqttConnection:
    """One MQTT connection's protocol state: feed bytes, pull packets, turn packets into bytes.

    `max_packet_size` bounds a whole packet (fixed header included); a larger announced remaining
    length is refused as soon as the header is complete, before any of the body is buffered, so
    once `next_event()` returns NEED_DATA at most `max_packet_size - 1` bytes are held.
    """

    __slots__ = ("_buf", "_error", "_handshake", "_max", "_receives", "_role", "_send_state", "_state")

    def __init__(
        self,
        role: Literal["server", "client"] = "server",
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    ) -> None:
        if role not in ("server", "client"):
            raise ValueError("role must be 'server' or 'client'")
        if not 8 <= max_packet_size <= _ABSOLUTE_MAX_PACKET:
            raise ValueError("max_packet_size out of range")
        self._role = role
        self._max = max_packet_size
        self._receives = _SERVER_RECEIVES if role == "server" else _CLIENT_RECEIVES
        self._handshake = 1 if role == "server" else 2
        self._buf = bytearray()
        self._state = _State.HANDSHAKE
        self._send_state = _State.HANDSHAKE
        self._error: ProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned as packets (for limits and metrics)."""
        return len(self._buf)

    @property
    def connected(self) -> bool:
        """True once the handshake packet (CONNECT for a server, CONNACK for a client) was read."""
        return self._state is not _State.HANDSHAKE

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes read from the transport; dropped once the connection is broken."""
        if self._error is None:
            self._buf += data

    def _fail(self, reason: str, connack_code: int | None = None) -> NoReturn:
        self._error = ProtocolError(reason, connack_code)
        self._buf.clear()
        raise self._error

    def next_event(self) -> Packet | Literal[NeedData.NEED_DATA]:
        """Return the next complete packet, or NEED_DATA; raise ProtocolError on any violation."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        n = len(buf)
        if n < 2:
            if n and self._state is _State.CLOSED:
                self._fail("data-after-disconnect")
            return NEED_DATA
        first = buf[0]
        remaining = buf[1]
        header = 2
        if remaining & 0x80:
            remaining &= 0x7F
            shift = 7
            while True:
                if header >= n:
                    if header >= 5:
                        self._fail("remaining-length-too-long")
                    return NEED_DATA
                digit = buf[header]
                header += 1
                remaining |= (digit & 0x7F) << shift
                if not digit & 0x80:
                    if digit == 0:
                        self._fail("remaining-length-not-minimal")
                    break
                if header == 5:
                    self._fail("remaining-length-too-long")
                shift += 7
        ptype = first >> 4
        flags = first & 0x0F
        if self._state is not _State.CONNECTED:
            if self._state is _State.CLOSED:
                self._fail("data-after-disconnect")
            if ptype != self._handshake:
                self._fail("first-packet-not-connect" if self._handshake == 1 else "first-packet-not-connack")
        elif ptype == self._handshake:
            self._fail("duplicate-connect" if ptype == 1 else "duplicate-connack")
        if ptype not in self._receives:
            self._fail("unexpected-packet-type")
        required = _REQUIRED_FLAGS[ptype]
        if required is None:  # PUBLISH (reserved types were refused above)
            if flags & 0x06 == 0x06:
                self._fail("invalid-qos")
            if flags & 0x0E == 0x08:
                self._fail("dup-with-qos0")
        elif flags != required:
            self._fail("invalid-fixed-header-flags")
        fixed = _FIXED_LENGTH[ptype]
        if fixed is not None and remaining != fixed:
            self._fail("invalid-remaining-length")
        total = header + remaining
        if total > self._max:
            self._fail("packet-too-large")
        if n < total:
            return NEED_DATA
        try:
            with memoryview(buf) as mv:
                if ptype == 3:
                    packet: Packet = _decode_publish(buf, mv, flags, header, total)
                else:
                    packet = _DECODERS[ptype](buf, mv, header, total)
        except ProtocolError as exc:
            self._fail(exc.reason, exc.connack_code)
        del buf[:total]
        if ptype == self._handshake:
            self._state = _State.CONNECTED
        elif ptype == 14:
            self._state = _State.CLOSED
        return packet

    def send(self, packet: Packet) -> bytes:
        """Encode a packet after checking it is ours to send now (role and handshake order)."""
        kind = type(packet)
        server = self._role == "server"
        if kind not in (SERVER_TO_CLIENT if server else CLIENT_TO_SERVER):
            raise ProtocolError("unexpected-packet-type")
        if self._send_state is _State.CLOSED:
            raise ProtocolError("connection-closed")
        handshake: type[Packet] = ConnAck if server else Connect
        if self._send_state is _State.HANDSHAKE and kind is not handshake:
            raise ProtocolError("connack-not-sent" if server else "connect-not-sent")
        if self._send_state is _State.CONNECTED and kind is handshake:
            raise ProtocolError("duplicate-connack" if server else "duplicate-connect")
        data = encode_packet(packet)
        if isinstance(packet, ConnAck):
            self._send_state = _State.CONNECTED if packet.return_code == 0 else _State.CLOSED
        elif isinstance(packet, Connect):
            self._send_state = _State.CONNECTED
        elif isinstance(packet, Disconnect):
            self._send_state = _State.CLOSED
        return data
