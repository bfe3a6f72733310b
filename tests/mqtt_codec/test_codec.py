"""The codec turns real client bytes into packets and back, however the bytes are split."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether.protocols.mqtt import (
    NEED_DATA,
    ConnAck,
    ConnAckCode,
    Connect,
    Disconnect,
    MqttConnection,
    Packet,
    PingReq,
    PingResp,
    ProtocolError,
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
    encode_packet,
    encode_puback,
    encode_publish,
)
from tether.protocols.mqtt.topics import parse_username

CORPUS = Path(__file__).parents[1] / "fuzz" / "corpus" / "mqtt"
AZURE_USERNAME = "localhost/dev1/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0"
AZURE_PASSWORD = (
    b"SharedAccessSignature sr=localhost%2Fdevices%2Fdev1"
    b"&sig=VVWqmxbPMUEIbKav5a2cJpYL9j38xff0E1wt%2FMsscy8%3D&se=1795392981"
)
# paho-mqtt 1.6.1: Client("paho-min", clean_session=True) with will_set(topic, b"offline", 1, True)
PAHO_WILL_CONNECT = bytes.fromhex(
    "103600044d515454042e003c00087061686f2d6d696e0017646576696365732f7061686f2d6d696e2f737461747573"
    "00076f66666c696e65"
)
TELEMETRY_TOPIC = (
    "devices/dev1/messages/events/%24.mid=msg-1&%24.cid=corr-1&%24.ct=application%2Fjson"
    "&%24.ce=utf-8&alert=high%20temp&zone=a%2Fb"
)

CLIENT_PACKETS: list[Packet] = [
    Connect("dev1", AZURE_USERNAME, AZURE_PASSWORD, 60, False),
    Connect("", None, None, 0, True, Will("a/b", b"bye", 2, True)),
    Connect("dev1/mod1", "u", b"", 1177, True),
    Publish("devices/dev1/messages/events/", b"", 0),
    Publish("t", b"\x00\xff" * 100, 1, True, True, 65535),
    Publish("$iothub/twin/GET/?$rid=1", b" ", 2, False, False, 1),
    PubAck(1),
    PubRec(2),
    PubRel(3),
    PubComp(4),
    Subscribe(7, (("devices/dev1/messages/devicebound/#", 1), ("$iothub/twin/res/#", 0), ("+/+/#", 2))),
    Unsubscribe(8, ("a/+", "#")),
    PingReq(),
    Disconnect(),
]
SERVER_PACKETS: list[Packet] = [
    ConnAck(True, ConnAckCode.ACCEPTED),
    Publish("devices/dev1/messages/devicebound/%24.mid=1", b"cmd", 1, False, False, 9),
    PubAck(9),
    SubAck(7, (1, 0, 0x80)),
    UnsubAck(8),
    PingResp(),
]


def server_after_connect() -> MqttConnection:
    conn = MqttConnection("server")
    conn.receive_data(encode_packet(CLIENT_PACKETS[0]))
    assert isinstance(conn.next_event(), Connect)
    return conn


def drain(conn: MqttConnection) -> list[Packet]:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def test_next_event_needs_data_on_empty_buffer() -> None:
    assert MqttConnection().next_event() is NEED_DATA


@pytest.mark.parametrize("packet", CLIENT_PACKETS, ids=lambda p: type(p).__name__)
def test_every_client_packet_round_trips(packet: Packet) -> None:
    conn = MqttConnection("server") if isinstance(packet, Connect) else server_after_connect()
    conn.receive_data(encode_packet(packet))
    assert conn.next_event() == packet
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("packet", SERVER_PACKETS, ids=lambda p: type(p).__name__)
def test_every_server_packet_round_trips(packet: Packet) -> None:
    conn = MqttConnection("client")
    if not isinstance(packet, ConnAck):
        conn.receive_data(b"\x20\x02\x00\x00")
        assert conn.next_event() == ConnAck()
    conn.receive_data(encode_packet(packet))
    assert conn.next_event() == packet


def test_byte_by_byte_feeding_gives_the_same_events() -> None:
    stream = b"".join(encode_packet(p) for p in CLIENT_PACKETS[:1] + CLIENT_PACKETS[3:])
    whole = MqttConnection("server")
    whole.receive_data(stream)
    expected = drain(whole)
    assert expected == CLIENT_PACKETS[:1] + CLIENT_PACKETS[3:]
    split = MqttConnection("server")
    events: list[Packet] = []
    for index in range(len(stream)):
        split.receive_data(stream[index : index + 1])
        events += drain(split)
    assert events == expected
    assert split.buffered_bytes == 0


def test_many_packets_in_one_chunk_come_out_in_order() -> None:
    conn = server_after_connect()
    conn.receive_data(b"".join(encode_publish("t", bytes([i]), 1, i + 1) for i in range(50)))
    events = drain(conn)
    assert [e.packet_id for e in events if isinstance(e, Publish)] == list(range(1, 51))


@pytest.mark.parametrize("size", [0, 125, 126, 16_380, 16_381, 2_097_148, 2_097_149])
def test_remaining_length_varint_boundaries(size: int) -> None:
    data = encode_publish("t", b"x" * size)  # remaining = 3 + size: crosses 127, 16383, 2097151
    assert len(data) == 1 + len(varint_of(3 + size)) + 3 + size
    conn = MqttConnection("server", max_packet_size=4_000_000)
    conn.receive_data(encode_packet(CLIENT_PACKETS[0]) + data)
    assert drain(conn)[1] == Publish("t", b"x" * size)


def varint_of(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = value >> 7, value & 0x7F
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_paho_will_connect_vector_decodes_and_re_encodes_byte_exact() -> None:
    conn = MqttConnection("server")
    conn.receive_data(PAHO_WILL_CONNECT)
    packet = conn.next_event()
    assert packet == Connect(
        "paho-min", None, None, 60, True, Will("devices/paho-min/status", b"offline", 1, True)
    )
    assert encode_packet(packet) == PAHO_WILL_CONNECT


def test_azure_sdk_shaped_connect_decodes_to_username_parts() -> None:
    data = (CORPUS / "connect_azure_sdk.bin").read_bytes()
    conn = MqttConnection("server")
    conn.receive_data(data)
    packet = conn.next_event()
    assert packet == Connect("dev1", AZURE_USERNAME, AZURE_PASSWORD, 60, False)
    assert encode_packet(packet) == data
    assert isinstance(packet, Connect) and packet.username is not None
    user = parse_username(packet.username)
    assert (user.hostname, user.device_id, user.module_id) == ("localhost", "dev1", None)
    assert user.query["DeviceClientType"] == "azure-iot-device-iothub-py/2.14.0"


def test_sdk_telemetry_publish_vector() -> None:
    conn = server_after_connect()
    data = (CORPUS / "publish_telemetry_qos1.bin").read_bytes()
    conn.receive_data(data)
    assert conn.next_event() == Publish(TELEMETRY_TOPIC, b'{"t":21.5}', 1, packet_id=3)
    assert encode_publish(TELEMETRY_TOPIC, b'{"t":21.5}', 1, 3) == data


def test_fast_encoders_match_the_generic_encoder() -> None:
    assert encode_puback(0x1234) == b"\x40\x02\x12\x34" == encode_packet(PubAck(0x1234))
    packet = Publish("a/b", b"p" * 300, 1, True, True, 5)
    assert encode_publish("a/b", b"p" * 300, 1, 5, retain=True, dup=True) == encode_packet(packet)


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: encode_publish("a/+", b""), "invalid-topic-name"),
        (lambda: encode_publish("", b""), "invalid-topic-name"),
        (lambda: encode_publish("a\ud800", b""), "invalid-utf8"),
        (lambda: encode_publish("a", b"", 1), "invalid-packet-id"),
        (lambda: encode_publish("a", b"", 0, 3), "qos0-with-packet-id-or-dup"),
        (lambda: encode_publish("a", b"", 3, 1), "invalid-qos"),
        (lambda: encode_publish("a" * 65536, b""), "string-too-long"),
        (lambda: encode_puback(0), "invalid-packet-id"),
        (lambda: encode_puback(65536), "invalid-packet-id"),
        (lambda: encode_packet(Subscribe(1, ())), "subscribe-without-topics"),
        (lambda: encode_packet(Subscribe(1, (("a/#/b", 0),))), "invalid-topic-filter"),
        (lambda: encode_packet(SubAck(1, (3,))), "invalid-suback-codes"),
        (lambda: encode_packet(ConnAck(True, 5)), "session-present-on-refusal"),
        (lambda: encode_packet(Connect("c", None, b"pw")), "password-without-username"),
        (lambda: encode_packet(Connect("", clean_session=False)), "empty-client-id"),
        (lambda: encode_packet(Connect("a\x00b")), "null-character"),
    ],
)
def test_encoders_refuse_invalid_fields(call: object, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        call()  # type: ignore[operator]
    assert info.value.reason == reason


def test_server_must_send_connack_first_and_once() -> None:
    conn = server_after_connect()
    with pytest.raises(ProtocolError, match="connack-not-sent"):
        conn.send(PubAck(1))
    assert conn.send(ConnAck()) == b"\x20\x02\x00\x00"
    assert conn.send(PubAck(1)) == b"\x40\x02\x00\x01"
    with pytest.raises(ProtocolError, match="duplicate-connack"):
        conn.send(ConnAck())
    with pytest.raises(ProtocolError, match="unexpected-packet-type"):
        conn.send(Subscribe(1, (("a", 0),)))


def test_server_sends_nothing_after_a_refusing_connack() -> None:
    conn = MqttConnection("server")
    conn.receive_data((CORPUS / "connect_mqtt5.bin").read_bytes())
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.connack_code is not None
    assert conn.send(ConnAck(False, info.value.connack_code)) == b"\x20\x02\x00\x01"
    with pytest.raises(ProtocolError, match="connection-closed"):
        conn.send(PingResp())


def test_client_role_sends_connect_first_and_nothing_after_disconnect() -> None:
    conn = MqttConnection("client")
    with pytest.raises(ProtocolError, match="connect-not-sent"):
        conn.send(PingReq())
    conn.send(Connect("c"))
    with pytest.raises(ProtocolError, match="duplicate-connect"):
        conn.send(Connect("c"))
    assert conn.send(Disconnect()) == b"\xe0\x00"
    with pytest.raises(ProtocolError, match="connection-closed"):
        conn.send(PingReq())


def test_a_protocol_error_is_sticky_and_drops_further_data() -> None:
    conn = MqttConnection("server")
    conn.receive_data(b"\x30\x00")
    with pytest.raises(ProtocolError) as first:
        conn.next_event()
    conn.receive_data(encode_packet(CLIENT_PACKETS[0]))
    assert conn.buffered_bytes == 0
    with pytest.raises(ProtocolError) as second:
        conn.next_event()
    assert second.value is first.value


def test_connected_flag_follows_the_handshake() -> None:
    conn = MqttConnection("server")
    assert not conn.connected
    conn.receive_data(encode_packet(Connect("c")))
    conn.next_event()
    assert conn.connected


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        MqttConnection("broker")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MqttConnection(max_packet_size=4)
