"""Every MQTT 3.1.1 rule the codec enforces ends in ProtocolError with the right CONNACK code."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.protocols.mqtt import (
    NEED_DATA,
    Connect,
    MqttConnection,
    ProtocolError,
    Publish,
    encode_packet,
)

CORPUS = Path(__file__).parents[1] / "fuzz" / "corpus" / "mqtt"
CONNECT = encode_packet(Connect("dev1", "localhost/dev1/?api-version=2021-04-12", b"sas", 60, False))


def s(text: str) -> bytes:
    """An MQTT length-prefixed string of raw UTF-8 (or deliberately broken) bytes."""
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(2, "big") + raw


def raw_str(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def frame(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes((first, len(body))) + body


def connect_body(name: str = "MQTT", level: int = 4, flags: int = 0x02, payload: bytes = s("dev1")) -> bytes:
    return s(name) + bytes((level, flags)) + b"\x00\x3c" + payload


def refuse(data: bytes, *, role: str = "server", after_connect: bool = True) -> ProtocolError:
    conn = MqttConnection("server" if role == "server" else "client")
    if after_connect:
        conn.receive_data(CONNECT if role == "server" else b"\x20\x02\x00\x00")
        assert conn.next_event() is not NEED_DATA
    conn.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        while conn.next_event() is not NEED_DATA:
            pass
    assert conn.buffered_bytes == 0
    return info.value


# (name, bytes after a valid CONNECT, reason)
AFTER_CONNECT = [
    ("varint-5-bytes", b"\x30\xff\xff\xff\xff\x01", "remaining-length-too-long"),
    ("varint-non-minimal", b"\x30\x80\x00", "remaining-length-not-minimal"),
    ("reserved-type-0", b"\x00\x00", "unexpected-packet-type"),
    ("reserved-type-15", b"\xf0\x00", "unexpected-packet-type"),
    ("second-connect", CONNECT, "duplicate-connect"),
    ("connack-from-client", b"\x20\x02\x00\x00", "unexpected-packet-type"),
    ("suback-from-client", b"\x90\x03\x00\x01\x00", "unexpected-packet-type"),
    ("pingresp-from-client", b"\xd0\x00", "unexpected-packet-type"),
    ("pubrel-flags-0", b"\x60\x02\x00\x01", "invalid-fixed-header-flags"),
    ("subscribe-flags-0", frame(0x80, b"\x00\x01" + s("a") + b"\x00"), "invalid-fixed-header-flags"),
    ("unsubscribe-flags-0", frame(0xA0, b"\x00\x01" + s("a")), "invalid-fixed-header-flags"),
    ("puback-flags-2", b"\x42\x02\x00\x01", "invalid-fixed-header-flags"),
    ("pingreq-flags-1", b"\xc1\x00", "invalid-fixed-header-flags"),
    ("disconnect-flags-8", b"\xe8\x00", "invalid-fixed-header-flags"),
    ("puback-length-3", b"\x40\x03\x00\x01\x00", "invalid-remaining-length"),
    ("pingreq-length-1", b"\xc0\x01\x00", "invalid-remaining-length"),
    ("puback-id-0", b"\x40\x02\x00\x00", "zero-packet-id"),
    ("publish-qos3", frame(0x36, s("a") + b"\x00\x01"), "invalid-qos"),
    ("publish-qos0-dup", frame(0x38, s("a")), "dup-with-qos0"),
    ("publish-qos1-id-0", frame(0x32, s("a") + b"\x00\x00"), "zero-packet-id"),
    ("publish-qos1-no-id", frame(0x32, s("a")), "truncated-packet"),
    ("publish-empty-topic", frame(0x30, s("")), "invalid-topic-name"),
    ("publish-plus", frame(0x30, s("a/+/b")), "invalid-topic-name"),
    ("publish-hash", frame(0x30, s("a/#")), "invalid-topic-name"),
    ("publish-nul", frame(0x30, s("a\x00b")), "null-character"),
    ("publish-invalid-utf8", frame(0x30, raw_str(b"a\xff")), "invalid-utf8"),
    ("publish-surrogate", frame(0x30, raw_str(b"\xed\xa0\x80")), "invalid-utf8"),
    ("publish-overlong-utf8", frame(0x30, raw_str(b"\xc0\x80")), "invalid-utf8"),
    ("publish-topic-past-end", b"\x30\x03\x00\x05a", "truncated-packet"),
    ("subscribe-no-filters", frame(0x82, b"\x00\x01"), "subscribe-without-topics"),
    ("subscribe-id-0", frame(0x82, b"\x00\x00" + s("a") + b"\x00"), "zero-packet-id"),
    ("subscribe-qos3", frame(0x82, b"\x00\x01" + s("a") + b"\x03"), "invalid-qos"),
    ("subscribe-reserved-qos-bits", frame(0x82, b"\x00\x01" + s("a") + b"\x04"), "invalid-qos"),
    ("subscribe-missing-qos", frame(0x82, b"\x00\x01" + s("a")), "truncated-packet"),
    ("subscribe-hash-not-last", frame(0x82, b"\x00\x01" + s("a/#/b") + b"\x00"), "invalid-topic-filter"),
    ("subscribe-hash-in-level", frame(0x82, b"\x00\x01" + s("a#") + b"\x00"), "invalid-topic-filter"),
    ("subscribe-plus-in-level", frame(0x82, b"\x00\x01" + s("a/b+") + b"\x00"), "invalid-topic-filter"),
    ("subscribe-empty-filter", frame(0x82, b"\x00\x01" + s("") + b"\x00"), "invalid-topic-filter"),
    ("subscribe-nul", frame(0x82, b"\x00\x01" + s("a\x00") + b"\x00"), "null-character"),
    ("unsubscribe-no-filters", frame(0xA2, b"\x00\x01"), "unsubscribe-without-topics"),
    ("unsubscribe-bad-filter", frame(0xA2, b"\x00\x01" + s("+a")), "invalid-topic-filter"),
    ("data-after-disconnect", b"\xe0\x00\xc0\x00", "data-after-disconnect"),
]


@pytest.mark.parametrize(
    ("data", "reason"), [c[1:] for c in AFTER_CONNECT], ids=[c[0] for c in AFTER_CONNECT]
)
def test_violation_after_connect_is_a_protocol_error(data: bytes, reason: str) -> None:
    error = refuse(data)
    assert (error.reason, error.connack_code) == (reason, None)


# (name, first packet, reason, CONNACK code)
CONNECTS = [
    ("mqtt5", (CORPUS / "connect_mqtt5.bin").read_bytes(), "unsupported-protocol-version", 0x01),
    ("mqtt31-mqisdp", (CORPUS / "connect_mqtt31.bin").read_bytes(), "unsupported-protocol-version", 0x01),
    ("mqtt-level-3", frame(0x10, connect_body(level=3)), "unsupported-protocol-version", 0x01),
    ("mqtt-level-5", frame(0x10, connect_body(level=5)), "unsupported-protocol-version", 0x01),
    ("unknown-protocol-name", frame(0x10, connect_body(name="HTTP")), "unknown-protocol-name", None),
    ("empty-id-persistent", frame(0x10, connect_body(flags=0x00, payload=s(""))), "empty-client-id", 0x02),
    ("reserved-flag", frame(0x10, connect_body(flags=0x03)), "reserved-connect-flag", None),
    ("will-qos-3", frame(0x10, connect_body(flags=0x1E)), "invalid-will-qos", None),
    ("will-qos-without-will", frame(0x10, connect_body(flags=0x0A)), "will-flags-without-will", None),
    ("will-retain-without-will", frame(0x10, connect_body(flags=0x22)), "will-flags-without-will", None),
    (
        "password-without-username",
        frame(0x10, connect_body(flags=0x42, payload=s("d") + s("pw"))),
        "password-without-username",
        None,
    ),
    ("username-flag-but-missing", frame(0x10, connect_body(flags=0x82)), "truncated-packet", None),
    (
        "will-topic-wildcard",
        frame(0x10, connect_body(flags=0x06, payload=s("d") + s("a/#") + s("x"))),
        "invalid-will-topic",
        None,
    ),
    ("trailing-bytes", frame(0x10, connect_body(payload=s("d") + b"\x00")), "trailing-bytes", None),
    ("client-id-invalid-utf8", frame(0x10, connect_body(payload=raw_str(b"\xff"))), "invalid-utf8", None),
    ("connect-flags-nibble", b"\x12" + CONNECT[1:], "invalid-fixed-header-flags", None),
    ("first-packet-publish", frame(0x30, s("a")), "first-packet-not-connect", None),
    ("first-packet-pingreq", b"\xc0\x00", "first-packet-not-connect", None),
    ("truncated-connect", frame(0x10, s("MQTT")), "truncated-packet", None),
]


@pytest.mark.parametrize(("data", "reason", "code"), [c[1:] for c in CONNECTS], ids=[c[0] for c in CONNECTS])
def test_bad_connect_is_refused_with_the_right_connack_code(
    data: bytes, reason: str, code: int | None
) -> None:
    error = refuse(data, after_connect=False)
    assert (error.reason, error.connack_code) == (reason, code)


def test_empty_client_id_is_accepted_with_clean_session() -> None:
    conn = MqttConnection("server")
    conn.receive_data(frame(0x10, connect_body(flags=0x02, payload=s(""))))
    assert conn.next_event() == Connect("", None, None, 60, True)


def test_announced_oversize_packet_is_refused_before_its_body_arrives() -> None:
    conn = MqttConnection("server", max_packet_size=1024)
    conn.receive_data(CONNECT)
    conn.next_event()
    conn.receive_data(b"\x30\xff\xff\xff\x7f")  # 256 MB announced, nothing of it sent
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.reason == "packet-too-large"
    assert conn.buffered_bytes == 0


def test_the_limit_counts_the_whole_packet() -> None:
    fits = encode_packet(Publish("t", b"x" * 91))  # 2 + 2 + 1 + 91 = 96 bytes
    assert len(fits) == 96
    conn = MqttConnection("server", max_packet_size=96)
    conn.receive_data(encode_packet(Connect("c")) + fits)
    conn.next_event()
    assert conn.next_event() == Publish("t", b"x" * 91)
    assert refuse_with_limit(encode_packet(Publish("t", b"x" * 92)), 96).reason == "packet-too-large"


def refuse_with_limit(data: bytes, limit: int) -> ProtocolError:
    conn = MqttConnection("server", max_packet_size=limit)
    conn.receive_data(encode_packet(Connect("c")))
    conn.next_event()
    conn.receive_data(data[:2])  # the header alone is enough to refuse
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    return info.value


def test_partial_header_and_body_wait_for_more_data() -> None:
    conn = MqttConnection("server")
    conn.receive_data(CONNECT)
    conn.next_event()
    data = encode_packet(Publish("t", b"x" * 300))
    for cut in (1, 2, 3, 100):
        probe = MqttConnection("server")
        probe.receive_data(CONNECT + data[:cut])
        probe.next_event()
        assert probe.next_event() is NEED_DATA
        assert probe.buffered_bytes == cut


# (name, bytes after CONNACK for a client, reason)
CLIENT_SIDE = [
    ("connack-reserved-flags", b"\x20\x02\x02\x00", "reserved-connack-flags"),
    ("connack-code-6", b"\x20\x02\x00\x06", "invalid-connack-code"),
    ("session-present-on-refusal", b"\x20\x02\x01\x05", "session-present-on-refusal"),
    ("suback-bad-code", b"\x90\x03\x00\x01\x03", "invalid-suback-codes"),
    ("suback-no-codes", b"\x90\x02\x00\x01", "invalid-suback-codes"),
    ("connect-to-client", CONNECT, "unexpected-packet-type"),
    ("pingreq-to-client", b"\xc0\x00", "unexpected-packet-type"),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in CLIENT_SIDE], ids=[c[0] for c in CLIENT_SIDE])
def test_client_role_checks_what_the_server_sends(data: bytes, reason: str) -> None:
    first_connack = data.startswith(b"\x20")
    error = refuse(data, role="client", after_connect=not first_connack)
    assert error.reason == reason


def test_client_role_requires_connack_first() -> None:
    assert refuse(b"\xd0\x00", role="client", after_connect=False).reason == "first-packet-not-connack"
