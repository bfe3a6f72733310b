"""Connection lifecycle over MQTT: presence, disable/delete, token expiry, keep-alive, activity,
subscriptions, twin GET, pipelined telemetry, connection limit, metrics and MQTT over WebSockets."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from mqtt_helpers import HubRunner, PahoDevice, raw_connect, raw_socket, read_until_closed, recv_exactly

from tether.messaging.device_sessions import NullDeviceHooks
from tether.observability.metrics import metrics_handler
from tether.protocols.mqtt.codec import encode_packet, encode_publish
from tether.protocols.mqtt.packets import Connect
from tether.protocols.mqtt.topics import c2d_topic
from tether.protocols.mqtt.websocket import WEBSOCKET_PATH, mqtt_websocket_handler
from tether.registry.models import ConnectionState
from tether.security.principal import Principal
from tether.security.tls import start_tls_server

LIMITS = {"connect_timeout_s": 2.0, "sas_clock_skew_s": 0, "max_connections": 40,
          "device_messages_per_second": 10_000.0}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubRunner]:
    r = HubRunner(Path(tmp_path_factory.mktemp("hub")), limits=LIMITS)
    try:
        yield r
    finally:
        r.stop()


def connect(runner: HubRunner, device_id: str, *, ttl: float = 3600, keepalive: int = 60) -> PahoDevice:
    device = runner.create_device(device_id)
    dev = PahoDevice(runner, device_id, runner.token(device, ttl=ttl), keepalive=keepalive)
    assert dev.connect() == 0
    return dev


def wait_for(predicate: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_second_connection_for_the_same_device_drops_the_first(runner: HubRunner) -> None:
    first = connect(runner, "twice")
    device = runner.call(runner.hub.registry.get("twice"))
    second = PahoDevice(runner, "twice", runner.token(device))
    try:
        assert second.connect() == 0  # accepted at once (the SDK's reconnect before token expiry)
        assert first.wait_disconnected(2)
        second.roundtrip()
        assert runner.connected("twice")
    finally:
        first.close()
        second.close()


def test_disabled_device_is_disconnected_immediately(runner: HubRunner) -> None:
    dev = connect(runner, "to-disable")
    try:
        started = time.monotonic()
        runner.call(runner.hub.registry.set_status("to-disable", False, actor="test"))
        assert dev.wait_disconnected(1.0)
        assert time.monotonic() - started < 1.0
        assert not runner.connected("to-disable")
    finally:
        dev.close()
    again = PahoDevice(runner, "to-disable", runner.token(runner.call(runner.hub.registry.get("to-disable"))))
    try:
        assert again.connect() == 5
    finally:
        again.close()


def test_deleted_device_is_disconnected_immediately(runner: HubRunner) -> None:
    dev = connect(runner, "to-delete")
    try:
        runner.call(runner.hub.registry.delete("to-delete", if_match="*", actor="test"))
        assert dev.wait_disconnected(1.0)
    finally:
        dev.close()


def test_connection_closes_when_the_sas_token_expires(runner: HubRunner) -> None:
    dev = connect(runner, "short-token", ttl=2.5)
    try:
        dev.roundtrip()
        assert not dev.wait_disconnected(1.0)
        assert dev.wait_disconnected(4.0)
    finally:
        dev.close()


def test_keepalive_timeout_closes_a_silent_client(runner: HubRunner) -> None:
    device = runner.create_device("silent")
    sock = raw_socket(runner)
    connect_packet = Connect("silent", f"{runner.hostname}/silent/?api-version=2021-04-12",
                             runner.token(device).encode(), keep_alive=1)
    sock.sendall(encode_packet(connect_packet))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    started = time.monotonic()
    assert read_until_closed(sock) == b""
    assert 1.4 <= time.monotonic() - started < 3.0  # 1.5 x the client's keep-alive
    sock.close()


def test_pings_keep_a_connection_alive(runner: HubRunner) -> None:
    dev = connect(runner, "pinger", keepalive=1)  # paho pings every second
    try:
        assert not dev.wait_disconnected(2.5)
        dev.roundtrip()
    finally:
        dev.close()


def test_connection_state_and_activity_are_recorded(runner: HubRunner) -> None:
    registry = runner.hub.registry
    dev = connect(runner, "stateful")
    try:
        dev.roundtrip()
        runner.call(registry.flush_activity())
        device = runner.call(registry.get("stateful"))
        assert device.connection_state is ConnectionState.connected
        assert device.last_activity_time.year > 2000
    finally:
        dev.close()
    wait_for(lambda: not runner.connected("stateful"))
    time.sleep(0.1)
    runner.call(registry.flush_activity())
    assert runner.call(registry.get("stateful")).connection_state is ConnectionState.disconnected


def test_allowed_subscriptions_get_suback_with_qos_at_most_1(runner: HubRunner) -> None:
    dev = connect(runner, "subscriber")
    try:
        result, mid = dev.client.subscribe([
            ("devices/subscriber/messages/devicebound/#", 1),
            ("$iothub/twin/res/#", 2),
            ("$iothub/methods/POST/#", 0),
        ])
        assert result == mqtt.MQTT_ERR_SUCCESS
        wait_for(lambda: mid in dev.suback)
        assert dev.suback[mid] == (1, 1, 0)
        dev.roundtrip()
    finally:
        dev.close()


def test_twin_get_without_a_twin_service_answers_the_empty_twin(runner: HubRunner) -> None:
    dev = connect(runner, "twin-reader")
    try:
        dev.subscribe("$iothub/twin/res/#")
        dev.wait_acked([dev.publish(b" ", topic="$iothub/twin/GET/?$rid=42")])
        wait_for(lambda: dev.messages)
        reply = dev.messages[0]
        assert reply.topic == "$iothub/twin/res/200/?$rid=42"
        assert json.loads(reply.payload) == {"desired": {"$version": 1}, "reported": {"$version": 1}}
    finally:
        dev.close()


def test_pipelined_publishes_are_acked_in_order_and_stored_in_order(runner: HubRunner) -> None:
    """300 QoS 1 publishes written at once per device: PUBACKs come back in publish order and the
    stream holds the device's messages in that order (they are appended concurrently)."""
    n = 300

    def flood(device_id: str) -> list[int]:
        sock = raw_connect(runner, runner.create_device(device_id))
        try:
            topic = f"devices/{device_id}/messages/events/"
            sock.sendall(b"".join(encode_publish(topic, f"{device_id}:{i}".encode(), 1, i + 1)
                                  for i in range(n)))
            acks = recv_exactly(sock, 4 * n)
            return [int.from_bytes(acks[i + 2 : i + 4], "big") for i in range(0, len(acks), 4)]
        finally:
            sock.close()

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(flood, [f"pipe-{i}" for i in range(3)]))
    for i, acked in enumerate(results):
        assert acked == list(range(1, n + 1))
        bodies = [e.body.decode() for e in runner.events(f"pipe-{i}")]
        assert bodies == [f"pipe-{i}:{k}" for k in range(n)]


def test_sockets_beyond_max_connections_are_closed(tmp_path: Path) -> None:
    r = HubRunner(tmp_path, tls=False, limits={"max_connections": 2})
    socks = []
    try:
        socks = [raw_socket(r) for _ in range(2)]
        time.sleep(0.2)
        extra = raw_socket(r)
        extra.settimeout(5)
        try:
            assert extra.recv(10) == b""
        except ConnectionResetError:
            pass
        extra.close()
        for s in socks:  # the admitted ones are still open (they wait for CONNECT)
            s.settimeout(0.1)
            with pytest.raises(socket.timeout):
                s.recv(10)
    finally:
        for s in socks:
            s.close()
        r.stop()


def test_metrics_endpoint_reports_connections_messages_and_stream(runner: HubRunner) -> None:
    dev = connect(runner, "measured")

    async def serve() -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler)
        app_runner = web.AppRunner(app)
        await app_runner.setup()
        site = web.TCPSite(app_runner, "127.0.0.1", 0)
        await site.start()
        return app_runner, app_runner.addresses[0][1]

    app_runner, port = runner.call(serve())
    try:
        dev.roundtrip()
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'tether_connected_devices{protocol="mqtt"}' in text
        assert 'tether_d2c_messages_total{protocol="mqtt"}' in text
        assert "tether_auth_failures_total" in text or "tether_auth_failures" in text
        assert "tether_stream_fsync_seconds_bucket" in text
        assert "tether_stream_avg_batch_size" in text
    finally:
        dev.close()
        runner.call(app_runner.cleanup())


@pytest.fixture(scope="module")
def ws_port(runner: HubRunner) -> Iterator[int]:
    """An HTTPS listener (the one TLS layer) with only the MQTT WebSocket route mounted."""

    async def serve() -> tuple[web.AppRunner, asyncio.AbstractServer]:
        app = web.Application()
        app.router.add_get(WEBSOCKET_PATH, mqtt_websocket_handler(runner.hub))
        app_runner = web.AppRunner(app)
        await app_runner.setup()
        assert app_runner.server is not None
        return app_runner, await start_tls_server(app_runner.server, "127.0.0.1", 0, runner.hub.tls)

    app_runner, server = runner.call(serve())
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        async def stop() -> None:
            server.close()
            await app_runner.cleanup()

        runner.call(stop())


def ws_client(runner: HubRunner, device_id: str, token: str) -> mqtt.Client:
    client = mqtt.Client(client_id=device_id, clean_session=False, transport="websockets")
    client.ws_set_options(path=WEBSOCKET_PATH)
    client.tls_set(ca_certs=str(runner.ca_file), cert_reqs=ssl.CERT_REQUIRED)
    client.username_pw_set(f"{runner.hostname}/{device_id}/?api-version=2021-04-12", token)
    client.reconnect_delay_set(300, 300)
    return client


def test_mqtt_over_websockets(runner: HubRunner, ws_port: int) -> None:
    device = runner.create_device("ws-device")
    client = ws_client(runner, "ws-device", runner.token(device))
    acked: list[int] = []
    client.on_publish = lambda c, u, mid: acked.append(mid)
    lost = threading.Event()
    client.on_disconnect = lambda c, u, rc: lost.set()  # paho's is_connected() misses a lost link
    try:
        client.connect("127.0.0.1", ws_port, 60)
        client.loop_start()
        infos = [client.publish("devices/ws-device/messages/events/%24.mid=w" + str(i), f"ws{i}", qos=1)
                 for i in range(50)]
        wait_for(lambda: len(acked) == 50, 10)
        assert sorted(acked) == sorted(i.mid for i in infos)
        events = runner.events("ws-device")
        assert [e.body for e in events] == [f"ws{i}".encode() for i in range(50)]
        assert events[0].system_properties["message-id"] == "w0"
        assert runner.hub.connections.get("ws-device").protocol == "mqtt-ws"  # type: ignore[attr-defined]
        runner.call(runner.hub.registry.set_status("ws-device", False, actor="test"))
        assert lost.wait(1.0)
    finally:
        client.disconnect()
        client.loop_stop()


def test_websocket_connect_refusal_answers_connack_and_closes(runner: HubRunner, ws_port: int) -> None:
    runner.create_device("ws-refused")
    client = ws_client(runner, "ws-refused", "SharedAccessSignature sr=x&sig=y&se=1")
    codes: list[int] = []
    client.on_connect = lambda c, u, f, rc: codes.append(rc)
    lost = threading.Event()
    client.on_disconnect = lambda c, u, rc: lost.set()
    try:
        client.connect("127.0.0.1", ws_port, 60)
        client.loop_start()
        wait_for(lambda: codes, 5)
        assert codes == [4]
        assert lost.wait(2)
    finally:
        client.disconnect()
        client.loop_stop()
    runner.wait_audit("malformed", action_prefix="auth.mqttws", target="ws-refused")


def test_plain_http_on_the_websocket_path_is_refused(runner: HubRunner, ws_port: int) -> None:
    r = httpx.get(f"https://127.0.0.1:{ws_port}{WEBSOCKET_PATH}", verify=ssl.create_default_context(
        cafile=str(runner.ca_file)))
    assert r.status_code == 400


def test_deliver_hook_publishes_to_the_device_and_completes_on_its_puback(runner: HubRunner) -> None:
    """The MQTT session's PUBLISH under every device-bound send: QoS 1 completes when the device acks."""
    dev = connect(runner, "c2d-target")
    try:
        mid = dev.subscribe("devices/c2d-target/messages/devicebound/#")
        wait_for(lambda: mid in dev.suback)
        topic = c2d_topic("c2d-target", {"$.mid": "c1"}, {"k": "v"})

        async def send() -> None:
            handle = runner.hub.connections.get("c2d-target")  # type: ignore[attr-defined]
            await asyncio.wait_for(handle.deliver(topic, b"hello", qos=1), 5)

        runner.call(send())
        wait_for(lambda: dev.messages)
        assert dev.messages[0].payload == b"hello" and dev.messages[0].topic == topic
    finally:
        dev.close()
    wait_for(lambda: not runner.connected("c2d-target"))


def test_many_devices_connect_at_once(runner: HubRunner) -> None:
    devices = [runner.create_device(f"crowd-{i}") for i in range(25)]
    with ThreadPoolExecutor(25) as pool:
        socks = list(pool.map(lambda d: raw_connect(runner, d), devices))
    try:
        assert all(runner.connected(d.device_id) for d in devices)
    finally:
        for s in socks:
            s.close()


class RecordingHooks(NullDeviceHooks):
    """Device hooks in place of the hub's `DeviceSessions` (`hub.device_sessions`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def twin_get(self, principal: Principal) -> tuple[int, bytes]:
        self.calls.append(("get", principal.device_id))
        return 200, b'{"desired":{"$version":3},"reported":{"$version":5}}'

    async def twin_patch_reported(self, principal: Principal, body: bytes) -> tuple[int, bytes, int | None]:
        self.calls.append(("patch", body))
        return 204, b"", 6

    async def method_response(self, principal: Principal, rid: str, status: int, body: bytes) -> None:
        self.calls.append(("method", (rid, status, body)))

    async def subscribed(self, principal: Principal, handle: object, kinds: object) -> None:
        self.calls.append(("subscribed", list(kinds)))  # type: ignore[call-overload]

    async def connected(self, principal: Principal, handle: object, *, persistent: bool) -> None:
        self.calls.append(("connected", persistent))


def test_twin_and_method_traffic_goes_to_the_hub_hooks(tmp_path: Path) -> None:
    hooks = RecordingHooks()
    r = HubRunner(tmp_path, tls=False, hooks=hooks)
    dev = None
    try:
        device = r.create_device("hooked")
        dev = PahoDevice(r, "hooked", r.token(device))
        assert dev.connect() == 0
        mid = dev.subscribe("$iothub/twin/res/#")
        wait_for(lambda: mid in dev.suback)
        dev.wait_acked([dev.publish(b" ", topic="$iothub/twin/GET/?$rid=1"),
                        dev.publish(b'{"a":1}', topic="$iothub/twin/PATCH/properties/reported/?$rid=2"),
                        dev.publish(b'{"ok":true}', topic="$iothub/methods/res/200/?$rid=abc")])
        wait_for(lambda: len(dev.messages) == 2)
        replies = {m.topic: m.payload for m in dev.messages}
        assert json.loads(replies["$iothub/twin/res/200/?$rid=1"])["reported"] == {"$version": 5}
        assert replies["$iothub/twin/res/204/?$rid=2&$version=6"] == b""
        wait_for(lambda: len(hooks.calls) == 5)
        assert ("connected", True) in hooks.calls  # paho connects like the SDK: clean_session=0, persistent
        assert ("subscribed", ["twin-responses"]) in hooks.calls
        assert ("get", "hooked") in hooks.calls and ("patch", b'{"a":1}') in hooks.calls
        assert ("method", ("abc", 200, b'{"ok":true}')) in hooks.calls
    finally:
        if dev is not None:
            dev.close()
        r.stop()
