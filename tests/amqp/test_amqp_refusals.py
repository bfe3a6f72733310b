"""Refusals over AMQP, each audited and each leaving other connections working: wrong SASL
credentials, expired / wrong-audience / other-device CBS tokens, another device's address, oversize
messages, garbage and truncated frames. A witness device (SASL PLAIN) sends telemetry after each."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import proton
import pytest
from amqp_helpers import AmqpHub, proton_client, put_token
from proton import ConnectionException
from proton.utils import LinkDetached

from tether.protocols.amqp import AMQP_HEADER, Open, encode_frame
from tether.security.sas import build_token


@pytest.fixture(scope="module")
def witness(amqp_hub: AmqpHub) -> Iterator[Any]:
    device = amqp_hub.create_device("witness")
    conn = proton_client(amqp_hub, user=f"witness@sas.{amqp_hub.ip}", password=amqp_hub.device_token(device))
    sender = conn.create_sender("/devices/witness/messages/events")
    try:
        yield sender
    finally:
        conn.close()


def still_working(sender: Any) -> None:
    delivery = sender.send(proton.Message(body=b"still here"), timeout=30)
    assert delivery.remote_state == proton.Delivery.ACCEPTED


def refused_since(hub: AmqpHub, action: str, started: float, reason: str | None = None) -> list[Any]:
    return [r for r in hub.audit_rows(action, reason) if r.time.timestamp() >= started - 1]


def test_wrong_sasl_credentials(amqp_hub: AmqpHub, witness: Any) -> None:
    device = amqp_hub.create_device("refuse-sasl")
    started = time.time()
    other = amqp_hub.create_device("refuse-sasl-other")
    with pytest.raises(ConnectionException):
        proton_client(amqp_hub, user=f"refuse-sasl@sas.{amqp_hub.ip}", password=amqp_hub.device_token(other),
                      timeout=10)
    with pytest.raises(ConnectionException):
        proton_client(amqp_hub, user="refuse-sasl@sas.otherhub", password=amqp_hub.device_token(device),
                      timeout=10)
    assert [r for r in refused_since(amqp_hub, "auth.amqp", started) if r.outcome == "refused"
            and r.principal == "device:refuse-sasl"]
    assert refused_since(amqp_hub, "amqp.connect", started, "wrong-hub")
    still_working(witness)


def test_expired_wrong_audience_and_other_device_cbs_tokens(amqp_hub: AmqpHub, witness: Any) -> None:
    device = amqp_hub.create_device("refuse-cbs")
    other = amqp_hub.create_device("refuse-cbs-other")
    key = device.authentication.symmetric_key.primary_key
    assert key is not None
    audience = f"{amqp_hub.ip}%2Fdevices%2Frefuse-cbs"
    started = time.time()
    conn = proton_client(amqp_hub, mechs="ANONYMOUS")
    try:
        expired = build_token(f"{amqp_hub.ip}/devices/refuse-cbs", key, int(time.time()) - 3600)
        status, correlation, _ = put_token(conn, expired, audience, request_id=proton.ulong(7))
        assert status == 401 and correlation == 7  # the ulong type: uamqp insists, test_amqp_service
        good = amqp_hub.device_token(device)
        status, _, why = put_token(conn, good, "otherhub.example/devices/refuse-cbs")
        assert (status, why) == (401, "wrong-audience")
        status, _, _ = put_token(conn, amqp_hub.device_token(other), audience)  # another device's token
        assert status == 401
        status, correlation, _ = put_token(conn, good, audience, request_id="req-1")
        assert status == 200 and correlation == "req-1"
    finally:
        conn.close()
    refused = [r for r in refused_since(amqp_hub, "auth.amqp", started) if r.outcome == "refused"]
    assert len(refused) >= 2
    assert refused_since(amqp_hub, "amqp.cbs", started, "wrong-audience")
    still_working(witness)


def test_another_devices_address_is_refused(amqp_hub: AmqpHub, witness: Any) -> None:
    device = amqp_hub.create_device("refuse-addr")
    amqp_hub.create_device("refuse-addr-victim")
    started = time.time()
    conn = proton_client(amqp_hub, user=f"refuse-addr@sas.{amqp_hub.ip}",
                         password=amqp_hub.device_token(device))
    try:
        with pytest.raises(LinkDetached) as info:
            conn.create_sender("/devices/refuse-addr-victim/messages/events")
        assert "amqp:unauthorized-access" in str(info.value)
        with pytest.raises(LinkDetached):
            conn.create_receiver("/devices/refuse-addr-victim/messages/devicebound")
        own = conn.create_sender("/devices/refuse-addr/messages/events")  # the connection stays usable
        still_working(own)
    finally:
        conn.close()
    rows = refused_since(amqp_hub, "amqp.attach", started, "other-device")
    assert len(rows) >= 2
    still_working(witness)


def test_oversize_messages_are_refused(amqp_hub: AmqpHub, witness: Any) -> None:
    device = amqp_hub.create_device("refuse-big")
    started = time.time()
    conn = proton_client(amqp_hub, user=f"refuse-big@sas.{amqp_hub.ip}",
                         password=amqp_hub.device_token(device))
    try:
        sender = conn.create_sender("/devices/refuse-big/messages/events")
        delivery = sender.send(proton.Message(body=b"b" * 270_000), error_states=[], timeout=30)
        assert delivery.remote_state == proton.Delivery.REJECTED
        assert delivery.remote.condition.name == "amqp:link:message-size-exceeded"
        still_working(sender)
        with pytest.raises((LinkDetached, proton.utils.SendException, ConnectionException)):
            sender.send(proton.Message(body=b"c" * 400_000), timeout=30)
    finally:
        conn.close()
    assert refused_since(amqp_hub, "amqp.transfer", started, "message-too-large")
    still_working(witness)


def raw_tls(hub: AmqpHub) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(hub.ca_file))
    sock = socket.create_connection((hub.ip, 5671), timeout=15)
    return ctx.wrap_socket(sock, server_hostname=hub.ip)


def read_until_closed(sock: ssl.SSLSocket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ssl.SSLError, OSError):
        pass
    return data


@pytest.mark.parametrize(("name", "payload", "reason"), [
    ("garbage", b"\x00\x00\x00\x10\x02\x00\x00\x00garbage!", "decode-error"),
    ("truncated performative", b"\x00\x00\x00\x0e\x02\x00\x00\x00\x00\x53\x10\xc0\x10\x05", "decode-error"),
    ("bad frame header", b"\x00\x00\x00\x04\x02\x00\x00\x00", "bad-frame"),
    ("oversize frame", b"\x7f\x00\x00\x00\x02\x00\x00\x00", "frame-too-large"),
])
def test_garbage_and_truncated_frames_close_only_that_connection(
        amqp_hub: AmqpHub, witness: Any, name: str, payload: bytes, reason: str) -> None:
    started = time.time()
    with raw_tls(amqp_hub) as sock:
        sock.sendall(AMQP_HEADER + encode_frame(0, Open(container_id="raw")) + payload)
        answer = read_until_closed(sock)
    assert answer.startswith(AMQP_HEADER)
    assert b"amqp:" in answer  # the close carries the error condition
    assert refused_since(amqp_hub, "amqp.protocol", started, reason)
    still_working(witness)


def test_a_garbage_protocol_header_is_answered_with_ours(amqp_hub: AmqpHub, witness: Any) -> None:
    started = time.time()
    with raw_tls(amqp_hub) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert read_until_closed(sock) == AMQP_HEADER
    # before the open exchange: a failed connection attempt (charged to the peer, like MQTT's)
    assert refused_since(amqp_hub, "amqp.connect", started, "bad-protocol-header")
    still_working(witness)
