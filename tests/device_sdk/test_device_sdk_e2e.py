"""The real Azure SDKs end to end: azure-iot-device 2.14 over MQTT/TLS on 127.0.0.27:8883 (the SDK
always dials 8883 and checks the host name; no other test module uses this address) and the service
side over HTTPS (httpx, and azure-iot-hub's `invoke_device_method`): direct methods, twins, C2D."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.iot.device import IoTHubDeviceClient, Message, MethodRequest, MethodResponse
from methods_helpers import API, HubHarness

IP = "127.0.0.27"
SDK_OPTIONS: dict[str, Any] = {"connection_retry": False, "keep_alive": 30}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubHarness]:
    h = HubHarness(Path(tmp_path_factory.mktemp("sdk-hub")), ip=IP, mqtt_port=8883, tls=True, hostname=IP,
                   rest_tls=True)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def rest(harness: HubHarness) -> Iterator[httpx.Client]:
    with harness.rest() as client:
        yield client


@pytest.fixture
def sdk_client(harness: HubHarness) -> Iterator[Any]:
    """`sdk_client(device_id, **options)`: a connected IoTHubDeviceClient, shut down after the test."""
    clients: list[IoTHubDeviceClient] = []

    def make(device_id: str, **options: Any) -> IoTHubDeviceClient:
        device = harness.create_device(device_id)
        assert harness.ca_file is not None
        client = IoTHubDeviceClient.create_from_connection_string(
            harness.device_connection_string(device), server_verification_cert=harness.ca_file.read_text(),
            **{**SDK_OPTIONS, **options},
        )
        clients.append(client)
        client.connect()
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.shutdown()


def answer_methods(client: IoTHubDeviceClient, seen: list[MethodRequest]) -> None:
    def handler(request: MethodRequest) -> None:
        seen.append(request)
        status = 200 if request.name != "fail" else 500
        body = {"name": request.name, "got": request.payload, "rid": request.request_id}
        client.send_method_response(MethodResponse.create_from_method_request(request, status, body))

    client.on_method_request_received = handler  # subscribes to $iothub/methods/POST/# before returning


def test_sdk_device_answers_a_direct_method(harness: HubHarness, rest: httpx.Client, sdk_client: Any) -> None:
    client = sdk_client("sdk-method")
    seen: list[MethodRequest] = []
    answer_methods(client, seen)
    payload = {"interval": 5, "labels": ["a", "b"]}
    r = rest.post(f"/twins/sdk-method/methods{API}", json={
        "methodName": "configure", "payload": payload, "responseTimeoutInSeconds": 10,
        "connectTimeoutInSeconds": 5})  # covers the instant between the SUBACK and the hub's hook
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == 200
    assert body["payload"]["name"] == "configure" and body["payload"]["got"] == payload
    assert seen[0].name == "configure" and seen[0].payload == payload
    r = rest.post(f"/twins/sdk-method/methods{API}", json={"methodName": "fail"})
    assert r.status_code == 200 and r.json()["status"] == 500  # the device's status is passed through


def test_service_sdk_invokes_a_method_on_an_sdk_device(harness: HubHarness, sdk_client: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import CloudToDeviceMethod

    client = sdk_client("sdk-svc-method")
    answer_methods(client, [])
    harness.wait(lambda: harness.methods.online("sdk-svc-method") is not None, what="method subscription")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(harness.ca_file))
    record = harness.call(harness.hub.policies.get("service"))
    manager = IoTHubRegistryManager.from_connection_string(
        f"HostName={IP}:{harness.rest_port};SharedAccessKeyName=service;SharedAccessKey={record.primary_key}")
    result = manager.invoke_device_method("sdk-svc-method", CloudToDeviceMethod(
        method_name="reboot", payload={"now": True}, response_timeout_in_seconds=10))
    assert result.status == 200
    assert result.payload["name"] == "reboot" and result.payload["got"] == {"now": True}


def test_sdk_twin_desired_patch_get_twin_and_reported_patch(harness: HubHarness, rest: httpx.Client,
                                                            sdk_client: Any) -> None:
    client = sdk_client("sdk-twin")
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    harness.wait(lambda: "desired-patches" in harness.hooks.subscriptions("sdk-twin"),
                 what="desired subscription")

    r = rest.patch(f"/twins/sdk-twin{API}", json={"properties": {"desired": {"fan": "on", "speed": 3}}})
    assert r.status_code == 200, r.text
    assert patches.get(timeout=10) == {"fan": "on", "speed": 3, "$version": 2}
    rest.patch(f"/twins/sdk-twin{API}", json={"properties": {"desired": {"speed": None}}})
    assert patches.get(timeout=10) == {"speed": None, "$version": 3}

    twin = client.get_twin()
    assert twin["desired"] == {"fan": "on", "$version": 3}
    assert twin["reported"] == {"$version": 1}

    client.patch_twin_reported_properties({"temperature": 21.5, "firmware": {"version": "1.2.0"}})
    reported = rest.get(f"/twins/sdk-twin{API}").json()["properties"]["reported"]
    assert reported["temperature"] == 21.5 and reported["firmware"] == {"version": "1.2.0"}
    assert reported["$version"] == 2
    assert client.get_twin()["reported"]["temperature"] == 21.5


def test_sdk_device_receives_c2d_with_properties_and_the_sender_gets_feedback(
    harness: HubHarness, sdk_client: Any
) -> None:
    client = sdk_client("sdk-c2d")
    received: queue.Queue[Message] = queue.Queue()
    client.on_message_received = received.put  # subscribes to devices/sdk-c2d/messages/devicebound/#
    with harness.rest("service") as service:
        r = service.post(f"/devices/sdk-c2d/messages/deviceBound{API}", content=b'{"cmd": "open"}', headers={
            "iothub-messageid": "c2d-sdk-1", "iothub-correlationid": "corr-9", "iothub-ack": "positive",
            "iothub-app-priority": "high", "iothub-app-zone": "a/b&c=d", "Content-Type": "application/json"})
        assert r.status_code == 201, r.text
        message = received.get(timeout=10)
        assert message.data == b'{"cmd": "open"}'
        assert message.message_id == "c2d-sdk-1" and message.correlation_id == "corr-9"
        assert message.custom_properties == {"priority": "high", "zone": "a/b&c=d"}
        assert message.content_type == "application/json" and message.ack == "positive"

        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while not records and time.monotonic() < deadline:
            fb = service.get(f"/messages/serviceBound/feedback{API}&timeout=5")
            if fb.status_code == 200:
                records += [rec for rec in fb.json() if rec["originalMessageId"] == "c2d-sdk-1"]
                assert service.delete(f"/messages/serviceBound/feedback/{fb.headers['ETag'].strip(chr(34))}"
                                      f"{API}").status_code == 204
        assert records, "no feedback for the completed message"
        assert records[0]["statusCode"] == "Success" and records[0]["deviceId"] == "sdk-c2d"


def test_sdk_methods_keep_working_after_the_token_renewal_reconnect(harness: HubHarness, rest: httpx.Client,
                                                                    sdk_client: Any) -> None:
    """The SDK renews its token 120 s before expiry by reconnecting, without subscribing again:
    methods, desired patches and C2D must all keep flowing on the new connection."""
    client = sdk_client("sdk-renew", sastoken_ttl=124)
    answer_methods(client, [])
    received: queue.Queue[Message] = queue.Queue()
    patches: queue.Queue[dict[str, Any]] = queue.Queue()
    client.on_message_received = received.put
    client.on_twin_desired_properties_patch_received = patches.put
    harness.wait(lambda: harness.methods.online("sdk-renew") is not None, what="method subscription")
    first = harness.hub.connections.get("sdk-renew")  # type: ignore[attr-defined]
    harness.wait(lambda: harness.hub.connections.get("sdk-renew") not in (None, first), timeout=15,  # type: ignore[attr-defined]
                 what="renewal reconnect")
    r = rest.post(f"/twins/sdk-renew/methods{API}", json={"methodName": "afterRenewal",
                                                           "connectTimeoutInSeconds": 5})
    assert r.status_code == 200, r.text
    assert r.json()["payload"]["name"] == "afterRenewal"
    rest.patch(f"/twins/sdk-renew{API}", json={"properties": {"desired": {"after": "renewal"}}})
    # after reconnecting, the SDK itself fetches the twin and hands its desired section over as a
    # patch ({"$version": 1} here) so nothing is missed; the pushed patch follows
    seen = [patches.get(timeout=10)]
    while seen[-1] != {"after": "renewal", "$version": 2}:
        seen.append(patches.get(timeout=10))
    assert all(p["$version"] in (1, 2) for p in seen), seen
    with harness.rest("service") as service:
        sent = service.post(f"/devices/sdk-renew/messages/deviceBound{API}", content=b"after renewal")
        assert sent.status_code == 201, sent.text
    assert received.get(timeout=10).data == b"after renewal"


def test_sdk_devices_in_parallel_each_answer_their_own_methods(harness: HubHarness, sdk_client: Any) -> None:
    ids = [f"sdk-par-{i}" for i in range(3)]
    for device_id in ids:
        answer_methods(sdk_client(device_id), [])
    errors: list[BaseException] = []

    def call(device_id: str) -> None:
        try:
            with harness.rest("service") as service:
                for n in range(3):
                    r = service.post(f"/twins/{device_id}/methods{API}", json={
                        "methodName": f"m{n}", "payload": {"to": device_id}, "connectTimeoutInSeconds": 5})
                    assert r.json()["payload"]["got"] == {"to": device_id}, r.text
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(d,)) for d in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
