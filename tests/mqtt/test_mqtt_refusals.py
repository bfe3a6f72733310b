"""Every way a device can be refused over MQTT: the right CONNACK code or a disconnect, an audit
record saying why, and a well-behaved device on the same hub that keeps working throughout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_helpers import HubRunner, PahoDevice, new_key, raw_connect, raw_socket, read_until_closed

from tether.protocols.mqtt.codec import encode_packet, encode_publish
from tether.protocols.mqtt.packets import Connect
from tether.security.sas import build_token

LIMITS = {
    "connect_timeout_s": 1.0,
    "sas_clock_skew_s": 0,
    "device_messages_per_second": 50.0,
    "max_d2c_message_bytes": 4096,
}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubRunner]:
    r = HubRunner(Path(tmp_path_factory.mktemp("hub")), limits=LIMITS)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def good(runner: HubRunner) -> Iterator[PahoDevice]:
    """Connected for the whole module; every test checks it is unaffected."""
    device = runner.create_device("good-device")
    dev = PahoDevice(runner, device.device_id, runner.token(device))
    assert dev.connect() == 0
    try:
        yield dev
    finally:
        dev.close()


def connected_device(runner: HubRunner, device_id: str) -> PahoDevice:
    device = runner.create_device(device_id)
    dev = PahoDevice(runner, device_id, runner.token(device))
    assert dev.connect() == 0
    return dev


def test_good_device_publishes_and_gets_pubacks(good: PahoDevice) -> None:
    good.wait_acked([good.publish(f"m{i}") for i in range(20)])
    info = good.client.publish("devices/good-device/messages/events/", b"retained?", qos=1, retain=True)
    good.wait_acked([info.mid])  # the retain flag is ignored, not refused


def test_module_identity_is_parsed_and_refused_without_module_support(
    runner: HubRunner, good: PahoDevice
) -> None:
    device = runner.create_device("with-module")
    token = build_token("localhost/devices/with-module/modules/m1", device.authentication.symmetric_key
                        .primary_key or "", int(time.time()) + 60)
    dev = PahoDevice(runner, "with-module", token, client_id="with-module/m1",
                     username="localhost/with-module/m1/?api-version=2021-04-12")
    try:
        assert dev.connect() == 4
    finally:
        dev.close()
    record = runner.wait_audit("unknown-module", action_prefix="auth.mqtt", target="with-module")
    assert record.principal == "device:with-module/m1"
    good.roundtrip()


def test_publish_to_a_forbidden_topic_disconnects_and_is_audited(runner: HubRunner, good: PahoDevice) -> None:
    dev = connected_device(runner, "bad-topic")
    try:
        dev.publish(b"x", topic="some/other/topic")
        assert dev.wait_disconnected()
        record = runner.wait_audit("forbidden-topic", action_prefix="mqtt.publish", target="bad-topic")
        assert record.principal == "device:bad-topic" and record.details["topic"] == "some/other/topic"
    finally:
        dev.close()
    good.roundtrip()


def test_qos2_publish_disconnects(runner: HubRunner, good: PahoDevice) -> None:
    dev = connected_device(runner, "qos2-device")
    try:
        dev.publish(b"x", qos=2)
        assert dev.wait_disconnected()
        runner.wait_audit("qos2-not-supported", action_prefix="mqtt.publish", target="qos2-device")
    finally:
        dev.close()
    good.roundtrip()


def test_publish_to_another_devices_topic_disconnects(runner: HubRunner, good: PahoDevice) -> None:
    dev = connected_device(runner, "spoofer")
    try:
        dev.publish(b"x", topic="devices/good-device/messages/events/")
        assert dev.wait_disconnected()
        runner.wait_audit("other-device", action_prefix="mqtt.publish", target="spoofer")
    finally:
        dev.close()
    assert not [e for e in runner.events("good-device") if e.body == b"x"]
    good.roundtrip()


def test_subscribe_to_another_devices_topic_disconnects(runner: HubRunner, good: PahoDevice) -> None:
    dev = connected_device(runner, "eavesdropper")
    try:
        dev.subscribe("devices/good-device/messages/devicebound/#")
        assert dev.wait_disconnected()
        record = runner.wait_audit("other-device", action_prefix="mqtt.subscribe", target="eavesdropper")
        assert record.details["topic"] == "devices/good-device/messages/devicebound/#"
    finally:
        dev.close()
    good.roundtrip()


def test_bad_password_gets_connack_4(runner: HubRunner, good: PahoDevice) -> None:
    device = runner.create_device("bad-password")
    dev = PahoDevice(runner, "bad-password", runner.token(device, key=new_key()))
    try:
        assert dev.connect() == 4
        assert dev.wait_disconnected()
    finally:
        dev.close()
    record = runner.wait_audit("bad-signature", action_prefix="auth.mqtt", target="bad-password")
    assert record.peer and record.peer.startswith("127.0.0.1:")
    assert not runner.connected("bad-password")
    good.roundtrip()


def test_expired_token_gets_connack_4(runner: HubRunner, good: PahoDevice) -> None:
    device = runner.create_device("expired-token")
    dev = PahoDevice(runner, "expired-token", runner.token(device, ttl=-5))
    try:
        assert dev.connect() == 4
    finally:
        dev.close()
    runner.wait_audit("expired", action_prefix="auth.mqtt", target="expired-token")
    good.roundtrip()


def test_disabled_device_gets_connack_5(runner: HubRunner, good: PahoDevice) -> None:
    device = runner.create_device("disabled-device", status="disabled")
    dev = PahoDevice(runner, "disabled-device", runner.token(device))
    try:
        assert dev.connect() == 5
    finally:
        dev.close()
    runner.wait_audit("device-disabled", action_prefix="auth.mqtt", target="disabled-device")
    good.roundtrip()


def test_unknown_device_gets_connack_4(runner: HubRunner, good: PahoDevice) -> None:
    device = runner.create_device("known-device")
    token = runner.token(device).replace("known-device", "ghost-device")
    dev = PahoDevice(runner, "ghost-device", token)
    try:
        assert dev.connect() == 4
    finally:
        dev.close()
    runner.wait_audit("unknown-device", action_prefix="auth.mqtt", target="ghost-device")
    good.roundtrip()


def test_client_id_other_than_the_username_device_gets_connack_2(runner: HubRunner, good: PahoDevice) -> None:
    device = runner.create_device("id-mismatch")
    dev = PahoDevice(runner, "id-mismatch", runner.token(device), client_id="someone-else")
    try:
        assert dev.connect() == 2
    finally:
        dev.close()
    record = runner.wait_audit("client-id-mismatch", action_prefix="mqtt.connect", target="id-mismatch")
    assert record.details["client_id"] == "someone-else"
    good.roundtrip()


def test_username_for_another_hub_gets_connack_4(runner: HubRunner, good: PahoDevice) -> None:
    device = runner.create_device("other-hub")
    dev = PahoDevice(runner, "other-hub", runner.token(device),
                     username="evil.example.com/other-hub/?api-version=2021-04-12")
    try:
        assert dev.connect() == 4
    finally:
        dev.close()
    runner.wait_audit("wrong-hostname", action_prefix="mqtt.connect", target="other-hub")
    good.roundtrip()


def test_hostname_in_username_is_case_insensitive(runner: HubRunner, good: PahoDevice) -> None:
    device = runner.create_device("upper-host")
    dev = PahoDevice(runner, "upper-host", runner.token(device),
                     username="LocalHost/upper-host/?api-version=2021-04-12&unknown=1&DeviceClientType=x")
    try:
        assert dev.connect() == 0
        dev.roundtrip()
    finally:
        dev.close()


def test_mqtt5_connect_gets_connack_1(runner: HubRunner, good: PahoDevice) -> None:
    sock = raw_socket(runner)
    port = sock.getsockname()[1]
    # CONNECT, protocol "MQTT" level 5, clean start, keep-alive 60, no properties, client id "v5"
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x02v5"
    sock.sendall(bytes([0x10, len(body)]) + body)
    assert read_until_closed(sock) == b"\x20\x02\x00\x01"
    sock.close()
    runner.wait_audit("unsupported-protocol-version", action_prefix="mqtt.connect", peer_port=port)
    good.roundtrip()


def test_oversize_message_disconnects(runner: HubRunner, good: PahoDevice) -> None:
    dev = connected_device(runner, "big-sender")
    try:
        dev.wait_acked([dev.publish(b"a" * 4096)])  # exactly at the limit is fine
        dev.publish(b"a" * 4097)
        assert dev.wait_disconnected()
        record = runner.wait_audit("message-too-large", action_prefix="mqtt.publish", target="big-sender")
        assert record.details["size"] == 4097
    finally:
        dev.close()
    assert [len(e.body) for e in runner.events("big-sender")] == [4096]
    good.roundtrip()


def test_garbage_before_connect_closes_the_socket(runner: HubRunner, good: PahoDevice) -> None:
    sock = raw_socket(runner)
    port = sock.getsockname()[1]
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_until_closed(sock) == b""
    sock.close()
    runner.wait_audit("first-packet-not-connect", action_prefix="mqtt.connect", peer_port=port)
    good.roundtrip()


def test_no_connect_within_the_timeout_closes_the_socket(runner: HubRunner, good: PahoDevice) -> None:
    sock = raw_socket(runner)
    port = sock.getsockname()[1]
    started = time.monotonic()
    sock.sendall(b"\x10")  # a slowloris: the start of a CONNECT, then nothing
    assert read_until_closed(sock) == b""
    assert 0.8 < time.monotonic() - started < 3.0
    sock.close()
    runner.wait_audit("connect-timeout", action_prefix="mqtt.connect", peer_port=port)
    good.roundtrip()


def test_malformed_packet_after_connect_closes_only_that_connection(
    runner: HubRunner, good: PahoDevice
) -> None:
    device = runner.create_device("malformed")
    sock = raw_socket(runner)
    connect = Connect("malformed", f"{runner.hostname}/malformed/?api-version=2021-04-12",
                      runner.token(device).encode(), keep_alive=60)
    sock.sendall(encode_packet(connect))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    sock.sendall(b"\x30\xff\xff\xff\xff\x01")  # remaining length longer than 4 bytes
    assert read_until_closed(sock) == b""
    sock.close()
    runner.wait_audit("remaining-length-too-long", action_prefix="mqtt.protocol", target="malformed")
    good.roundtrip()


def test_rate_limit_disconnects_a_flooder(runner: HubRunner, good: PahoDevice) -> None:
    """400 messages in one burst at 50/s (burst 100): the hub stores about 100 and disconnects.
    (A raw socket: paho writing from two threads on one TLS socket garbles the stream.)"""
    sock = raw_connect(runner, runner.create_device("flooder"))
    topic = "devices/flooder/messages/events/"
    try:
        sock.sendall(b"".join(encode_publish(topic, b"f") for _ in range(400)))
    except OSError:
        pass  # the hub may close before it has read everything
    assert read_until_closed(sock) == b""
    sock.close()
    runner.wait_audit("rate-limited", action_prefix="mqtt.publish", target="flooder")
    assert 95 <= len(runner.events("flooder")) <= 110
    good.roundtrip()
