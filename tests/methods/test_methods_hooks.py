"""`DeviceSessions` over real MQTT with paho: twin GET and reported patches reach `TwinService`,
desired patches written over REST reach subscribed devices, a C2D subscription starts the pump."""

from __future__ import annotations

import json
import queue
import time

import httpx
import paho.mqtt.client as mqtt
from methods_helpers import API, DeviceFactory, HubHarness, PahoDevice

from tether.security.principal import CredentialKind, Principal, PrincipalKind

TWIN_RES = "$iothub/twin/res/#"
DESIRED = "$iothub/twin/PATCH/properties/desired/#"


def twin_request(dev: PahoDevice, topic: str, body: bytes = b" ") -> mqtt.MQTTMessage:
    dev.client.publish(topic, body, qos=1)
    return dev.next_message()


def test_twin_get_and_reported_patch_use_the_twin_service(harness: HubHarness, rest: httpx.Client,
                                                          device: DeviceFactory) -> None:
    dev = device("h-twin", subscribe=False)
    dev.subscribe(TWIN_RES)
    assert rest.patch(f"/twins/h-twin{API}", json={"properties": {"desired": {"rate": 5}}}).status_code == 200
    got = twin_request(dev, "$iothub/twin/GET/?$rid=1")
    assert got.topic == "$iothub/twin/res/200/?$rid=1"
    assert json.loads(got.payload) == {"desired": {"rate": 5, "$version": 2}, "reported": {"$version": 1}}

    res = twin_request(dev, "$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"temp": 21.5, "fw": "1.0"}')
    assert res.topic == "$iothub/twin/res/204/?$rid=2&$version=2"
    twin = rest.get(f"/twins/h-twin{API}").json()
    reported = twin["properties"]["reported"]
    assert reported["temp"] == 21.5 and reported["fw"] == "1.0" and reported["$version"] == 2


def test_bad_reported_patches_are_answered_400_with_a_reason(device: DeviceFactory) -> None:
    dev = device("h-bad", subscribe=False)
    dev.subscribe(TWIN_RES)
    for rid, body in enumerate((b"not json", b"[1, 2]", b'{"a": NaN}', b'{"$bad": 1}'), start=10):
        res = twin_request(dev, f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", body)
        assert res.topic == f"$iothub/twin/res/400/?$rid={rid}", body
        assert json.loads(res.payload)["errorCode"] == "ArgumentInvalid"
    ok = twin_request(dev, "$iothub/twin/PATCH/properties/reported/?$rid=20", b'{"fine": true}')
    assert ok.topic.startswith("$iothub/twin/res/204/?$rid=20&$version=")  # still connected, still works


def test_desired_patches_reach_subscribed_devices_only(harness: HubHarness, rest: httpx.Client,
                                                       device: DeviceFactory) -> None:
    listening = device("h-desired", subscribe=False)
    listening.subscribe(DESIRED)
    deaf = device("h-deaf", subscribe=False)
    deaf.subscribe(TWIN_RES)
    for device_id in ("h-desired", "h-deaf"):
        r = rest.patch(f"/twins/{device_id}{API}", json={"properties": {"desired": {"mode": "eco", "n": 1}}})
        assert r.status_code == 200
    rest.patch(f"/twins/h-desired{API}", json={"properties": {"desired": {"n": None}}})
    first, second = listening.next_message(), listening.next_message()
    assert first.topic == "$iothub/twin/PATCH/properties/desired/?$version=2" and first.qos == 0
    assert json.loads(first.payload) == {"mode": "eco", "n": 1, "$version": 2}
    assert second.topic == "$iothub/twin/PATCH/properties/desired/?$version=3"
    assert json.loads(second.payload) == {"n": None, "$version": 3}
    time.sleep(0.2)
    assert deaf.messages.empty()


def test_c2d_subscription_starts_the_pump_and_puback_completes(harness: HubHarness,
                                                               device: DeviceFactory) -> None:
    dev = device("h-c2d", subscribe=False)
    with harness.rest("service") as service:
        r = service.post(f"/devices/h-c2d/messages/deviceBound{API}", content=b"queued before subscribe",
                         headers={"iothub-messageid": "c2d-1", "iothub-app-color": "red"})
        assert r.status_code == 201, r.text
        dev.subscribe("devices/h-c2d/messages/devicebound/#")
        message = dev.next_message()
        assert message.payload == b"queued before subscribe" and message.qos == 1
        assert message.topic.startswith("devices/h-c2d/messages/devicebound/")
        assert "%24.mid=c2d-1" in message.topic and "color=red" in message.topic
        harness.wait(lambda: harness.call(harness.c2d.queue_depth("h-c2d")) == 0, what="completed on PUBACK")
    try:
        dev.next_message(timeout=0.3)
        raise AssertionError("the completed message was delivered again")
    except queue.Empty:
        pass


def test_connected_cue_clean_session_forgets_subscriptions(harness: HubHarness, rest: httpx.Client,
                                                           device: DeviceFactory) -> None:
    """`DeviceSessions.connected` (the session's after-CONNACK cue): a persistent session keeps the
    identity's method and desired subscriptions, a clean one drops them (Azure's clean_session)."""
    device("h-clean", subscribe=False).subscribe(DESIRED)
    harness.wait(lambda: "desired-patches" in harness.hooks.subscriptions("h-clean"),
                 what="desired subscription")
    handle = harness.hub.connections.get("h-clean")  # type: ignore[attr-defined]
    principal = Principal(PrincipalKind.device, CredentialKind.device_key, device_id="h-clean")
    harness.methods.subscribed("h-clean", None, "mqtt")
    harness.call(harness.hooks.connected(principal, handle, persistent=True))
    assert harness.methods.online("h-clean") is not None
    assert "desired-patches" in harness.hooks.subscriptions("h-clean")
    harness.call(harness.hooks.connected(principal, handle, persistent=False))
    assert harness.methods.online("h-clean") is None
    assert "desired-patches" not in harness.hooks.subscriptions("h-clean")
    r = rest.post(f"/twins/h-clean/methods{API}", json={"methodName": "x"})
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotOnline"
