"""The real Azure device SDK (azure-iot-device 2.14) against Tether's MQTT listener.

The SDK always dials port 8883 (443 for WebSockets) and checks the host name, so this module runs its
hub on its own loopback address with a certificate for that IP (other modules use other addresses).
Telemetry is read back as a back end would: a fresh consumer group of the same hub's service consumer
API (HTTP, `service` policy token), not the stream object, so the proof covers the whole path.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from azure.iot.device import X509, IoTHubDeviceClient, Message
from mqtt_helpers import HubRunner, ServiceConsumer

from tether.protocols.mqtt.websocket import WEBSOCKET_PATH, mqtt_websocket_handler
from tether.security import pki
from tether.security.tls import start_tls_server

IP = "127.0.0.31"
SDK_OPTIONS = {"connection_retry": False, "keep_alive": 30}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubRunner]:
    r = HubRunner(Path(tmp_path_factory.mktemp("hub")), ip=IP, port=8883, hostname=IP)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def consumer(runner: HubRunner) -> Iterator[ServiceConsumer]:
    """Reads telemetry back through the same hub's service consumer API (closed before the hub)."""
    c = ServiceConsumer(runner)
    try:
        yield c
    finally:
        c.close()


def sas_client(runner: HubRunner, device_id: str, **options: object) -> IoTHubDeviceClient:
    device = runner.create_device(device_id)
    key = device.authentication.symmetric_key.primary_key
    cs = f"HostName={IP};DeviceId={device_id};SharedAccessKey={key}"
    return IoTHubDeviceClient.create_from_connection_string(
        cs, server_verification_cert=runner.ca_file.read_text(), **{**SDK_OPTIONS, **options}
    )


def message(device_id: str, i: int) -> Message:
    msg = Message(json.dumps({"n": i}), message_id=f"{device_id}-mid-{i}", content_encoding="utf-8",
                  content_type="application/json")
    msg.correlation_id = f"corr-{i}"
    msg.custom_properties["alert"] = "high temp"
    msg.custom_properties["zone"] = "a/b&c=d"
    msg.custom_properties["seq"] = str(i)
    return msg


def check_event(event: dict[str, Any], device_id: str, i: int, auth_type: str) -> None:
    """Message `i` of `message()` as the consumer API hands it out: every property intact."""
    system = event["systemProperties"]
    assert system["message-id"] == f"{device_id}-mid-{i}"
    assert system["correlation-id"] == f"corr-{i}"
    assert system["content-type"] == "application/json"
    assert system["content-encoding"] == "utf-8"
    assert system["iothub-connection-device-id"] == device_id
    assert "iothub-connection-module-id" not in system
    assert json.loads(system["iothub-connection-auth-method"]) == {
        "scope": "device", "type": auth_type, "issuer": "iothub" if auth_type == "sas" else "external"}
    assert system["iothub-enqueuedtime"].endswith("Z")
    assert event["properties"] == {"alert": "high temp", "zone": "a/b&c=d", "seq": str(i)}
    assert event["deviceId"] == device_id and event["moduleId"] is None
    assert event["bodyEncoding"] == "utf-8" and json.loads(event["body"]) == {"n": i}


@dataclass(frozen=True)
class Readback:
    group: str
    partition: int
    following: int  # the next sequence number of the partition after the read


def check_events(consumer: ServiceConsumer, device_id: str, count: int,
                 auth_type: str = "sas") -> Readback:
    """A fresh consumer group reads the device's partition from the start through the service
    consumer API: messages 0..count-1, all there, in order, every property intact."""
    group = consumer.create_group(f"cg-{device_id}")
    partition = consumer.partition_of(device_id)
    events, following = consumer.read(partition, group, fromSequence="0")
    mine = [e for e in events if e["deviceId"] == device_id]
    assert [json.loads(e["body"])["n"] for e in mine] == list(range(count))  # all there, in order
    sequences = [e["sequenceNumber"] for e in mine]
    assert sequences == sorted(set(sequences)) and sequences[-1] < following
    for i, event in enumerate(mine):
        check_event(event, device_id, i, auth_type)
    for other in range(consumer.partition_count):  # one device, one partition: its order is kept
        if other != partition:
            rest, _ = consumer.read(other, group, wait=0, fromSequence="0")
            assert not [e for e in rest if e["deviceId"] == device_id]
    return Readback(group, partition, following)


def resume_after_checkpoint(consumer: ServiceConsumer, seen: Readback, client: IoTHubDeviceClient,
                            device_id: str, n: int, auth_type: str = "sas") -> None:
    """Checkpoint the last event read; the group then resumes after it: nothing old comes back,
    only message `n`, sent afterwards."""
    last = seen.following - 1
    consumer.checkpoint(seen.group, seen.partition, last)
    old, _ = consumer.read(seen.partition, seen.group, wait=1, fromCheckpoint="true")
    assert old == []
    client.send_message(message(device_id, n))
    new, _ = consumer.read(seen.partition, seen.group, fromCheckpoint="true")
    assert all(e["sequenceNumber"] > last for e in new)
    mine = [e for e in new if e["deviceId"] == device_id]
    assert len(mine) == 1
    check_event(mine[0], device_id, n, auth_type)


def test_sdk_telemetry_keeps_every_property_and_the_order(runner: HubRunner,
                                                           consumer: ServiceConsumer) -> None:
    """Connection string (SAS) device → MQTT → stream → a consumer group over the service API."""
    client = sas_client(runner, "sdk-sas")
    try:
        client.connect()
        for i in range(20):
            client.send_message(message("sdk-sas", i))
        seen = check_events(consumer, "sdk-sas", 20)
        resume_after_checkpoint(consumer, seen, client, "sdk-sas", 20)
    finally:
        client.shutdown()


def test_several_sdk_devices_at_once_keep_their_own_order(runner: HubRunner,
                                                          consumer: ServiceConsumer) -> None:
    ids = [f"sdk-par-{i}" for i in range(3)]
    clients = [sas_client(runner, d) for d in ids]
    errors: list[BaseException] = []

    def run(client: IoTHubDeviceClient, device_id: str) -> None:
        try:
            client.connect()
            for i in range(15):
                client.send_message(message(device_id, i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c, d)) for c, d in zip(clients, ids, strict=True)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for c in clients:
            c.shutdown()
    assert not errors
    for device_id in ids:
        check_events(consumer, device_id, 15)


def test_sdk_get_twin_of_a_new_device(runner: HubRunner) -> None:
    client = sas_client(runner, "sdk-twin")
    try:
        client.connect()
        twin = client.get_twin()
    finally:
        client.shutdown()
    assert twin == {"desired": {"$version": 1}, "reported": {"$version": 1}}


def test_sdk_reconnects_with_a_renewed_token_before_expiry(runner: HubRunner,
                                                           consumer: ServiceConsumer) -> None:
    """The SDK renews its token 120 s before expiry by reconnecting with the same client id."""
    client = sas_client(runner, "sdk-renew", sastoken_ttl=124)
    try:
        client.connect()
        client.send_message(message("sdk-renew", 0))
        time.sleep(6)  # renewal happens at 4 s
        client.send_message(message("sdk-renew", 1))
        assert client.connected
    finally:
        client.shutdown()
    check_events(consumer, "sdk-renew", 2)
    allowed = runner.audit(action_prefix="auth.mqtt", outcome="allowed")
    assert len([r for r in allowed if r.target == "sdk-renew"]) >= 2


def test_sdk_x509_self_signed_device(runner: HubRunner, consumer: ServiceConsumer,
                                     tmp_path: Path) -> None:
    """Self-signed X.509 device → MQTT → stream → a consumer group over the service API."""
    cert, key = pki.issue_device_cert("sdk-x509", self_signed=True)
    cert_file, key_file = tmp_path / "device.pem", tmp_path / "device.key"
    pki.write_certificates(cert_file, [cert])
    pki.write_private_key(key_file, key)
    sha1, _ = pki.thumbprints(cert)
    runner.create_device("sdk-x509", authentication={
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": sha1}})
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(cert_file), str(key_file)), hostname=IP, device_id="sdk-x509",
        server_verification_cert=runner.ca_file.read_text(), **SDK_OPTIONS,
    )
    try:
        client.connect()
        for i in range(5):
            client.send_message(message("sdk-x509", i))
        seen = check_events(consumer, "sdk-x509", 5, auth_type="x509Certificate")
        resume_after_checkpoint(consumer, seen, client, "sdk-x509", 5, auth_type="x509Certificate")
    finally:
        client.shutdown()


def test_sdk_x509_with_an_unregistered_certificate_is_refused(runner: HubRunner, tmp_path: Path) -> None:
    registered, _ = pki.issue_device_cert("sdk-x509-bad", self_signed=True)
    presented, key = pki.issue_device_cert("sdk-x509-bad", self_signed=True)
    cert_file, key_file = tmp_path / "device.pem", tmp_path / "device.key"
    pki.write_certificates(cert_file, [presented])
    pki.write_private_key(key_file, key)
    runner.create_device("sdk-x509-bad", authentication={
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": pki.thumbprints(registered)[0]}})
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(cert_file), str(key_file)), hostname=IP, device_id="sdk-x509-bad",
        server_verification_cert=runner.ca_file.read_text(), **SDK_OPTIONS,
    )
    try:
        with pytest.raises(Exception):  # noqa: B017 - the SDK's own CredentialError
            client.connect()
    finally:
        client.shutdown()
    runner.wait_audit("thumbprint-mismatch", action_prefix="auth.mqtt", target="sdk-x509-bad")


def test_sdk_over_websockets(runner: HubRunner, consumer: ServiceConsumer) -> None:
    async def serve() -> tuple[web.AppRunner, object]:
        app = web.Application()
        app.router.add_get(WEBSOCKET_PATH, mqtt_websocket_handler(runner.hub))
        app_runner = web.AppRunner(app)
        await app_runner.setup()
        assert app_runner.server is not None
        return app_runner, await start_tls_server(app_runner.server, IP, 443, runner.hub.tls)

    app_runner, server = runner.call(serve())
    client = sas_client(runner, "sdk-ws", websockets=True)
    try:
        client.connect()
        for i in range(10):
            client.send_message(message("sdk-ws", i))
        assert client.get_twin()["desired"]["$version"] == 1
    finally:
        client.shutdown()

        async def stop() -> None:
            server.close()  # type: ignore[attr-defined]
            await app_runner.cleanup()

        runner.call(stop())
    check_events(consumer, "sdk-ws", 10)
