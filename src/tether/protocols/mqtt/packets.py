"""MQTT 3.1.1 control packets as small immutable values (the h11 "event" model).

The codec turns bytes into these and these into bytes; constructing a packet checks nothing, so
sessions, tests and fuzzers can build and compare packets freely. Field values are checked by the
codec when a packet is encoded (`send`) or decoded (`next_event`), with the two topic predicates
below shared by both directions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PacketType(enum.IntEnum):
    """Control packet type: the high nibble of the fixed header's first byte."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnAckCode(enum.IntEnum):
    """CONNACK return codes of MQTT 3.1.1 (the only ones the Azure SDKs understand)."""

    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_USERNAME_OR_PASSWORD = 0x04
    NOT_AUTHORIZED = 0x05


SUBACK_FAILURE = 0x80
"""SUBACK return code refusing one topic filter (the others are the granted QoS 0, 1, 2)."""


@dataclass(frozen=True, slots=True)
class Will:
    """Last-will message carried by CONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT. `password` is bytes: MQTT defines it as binary data (Azure puts a SAS token there)."""

    client_id: str
    username: str | None = None
    password: bytes | None = None
    keep_alive: int = 60
    clean_session: bool = True
    will: Will | None = None
    protocol_level: int = 4


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool = False
    return_code: int = ConnAckCode.ACCEPTED


@dataclass(frozen=True, slots=True)
class Publish:
    """PUBLISH. `packet_id` is None exactly when qos == 0."""

    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PubRec:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PubRel:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PubComp:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """SUBSCRIBE: `topics` is a tuple of (topic filter, requested QoS)."""

    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class SubAck:
    """SUBACK: one return code per requested filter (granted QoS or `SUBACK_FAILURE`)."""

    packet_id: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


Packet = (
    Connect
    | ConnAck
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
)
"""Every MQTT 3.1.1 control packet."""

CLIENT_TO_SERVER: frozenset[type[Packet]] = frozenset(
    {Connect, Publish, PubAck, PubRec, PubRel, PubComp, Subscribe, Unsubscribe, PingReq, Disconnect}
)
"""Packets a client may send (and a server may receive)."""

SERVER_TO_CLIENT: frozenset[type[Packet]] = frozenset(
    {ConnAck, Publish, PubAck, PubRec, PubRel, PubComp, SubAck, UnsubAck, PingResp}
)
"""Packets a server may send (and a client may receive)."""


def is_valid_topic_name(topic: str) -> bool:
    """A PUBLISH topic name: non-empty, no wildcards, no U+0000 (MQTT-4.7.3-1, 3.3.2-2)."""
    return bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic


def is_valid_topic_filter(topic_filter: str) -> bool:
    """A SUBSCRIBE filter: non-empty, `#` only as a whole last level, `+` only as a whole level."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return True
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return False
        if "+" in level and level != "+":
            return False
    return True
