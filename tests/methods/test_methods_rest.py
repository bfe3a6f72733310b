"""Direct methods end to end: `POST /twins/{id}/methods` over real HTTP, paho devices over real MQTT."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from methods_helpers import API, DeviceFactory, HubHarness, echo_responder, parse_method_topic

from tether.api.app import build_app
from tether.api.context import ROUTES_KEY, SPEC_KEY
from tether.api.method_routes import METHOD_PATHS
from tether.messaging.methods import MAX_PAYLOAD_BYTES


def invoke(rest: httpx.Client, device_id: str, method: str = "ping", payload: Any = None,
           **extra: Any) -> httpx.Response:
    body = {"methodName": method, "payload": payload, **extra}
    return rest.post(f"/twins/{device_id}/methods{API}", json=body)


def invoke_later(harness: HubHarness, pool: ThreadPoolExecutor, device_id: str, method: str = "ping",
                 payload: Any = None, **extra: Any) -> Future[httpx.Response]:
    """Start a call on its own HTTP client (the caller keeps driving the device meanwhile)."""

    def run() -> httpx.Response:
        with harness.rest() as client:
            return invoke(client, device_id, method, payload, **extra)

    return pool.submit(run)


def test_method_round_trip_returns_the_device_status_and_payload(rest: httpx.Client,
                                                                 device: DeviceFactory) -> None:
    device("m-rt", responder=echo_responder(201))
    payload = {"delay": 3, "tags": ["a", "é"], "nested": {"ok": True}}
    r = invoke(rest, "m-rt", "reboot", payload, responseTimeoutInSeconds=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": 201, "payload": {"method": "reboot", "echo": payload}}
    for value in ("text", 42, None, [1, 2]):  # any JSON value goes through both ways
        r = invoke(rest, "m-rt", "echo", value)
        assert r.json() == {"status": 201, "payload": {"method": "echo", "echo": value}}


def test_request_topic_qos_and_body_and_an_empty_answer(harness: HubHarness, device: DeviceFactory) -> None:
    dev = device("m-wire")
    with ThreadPoolExecutor(1) as pool:
        call = invoke_later(harness, pool, "m-wire", "set.Mode_1", {"mode": "eco"},
                            responseTimeoutInSeconds=10)
        request = dev.next_message()
        name, rid = parse_method_topic(request.topic)
        assert name == "set.Mode_1" and rid
        assert request.qos == 0  # as Azure sends method requests
        assert json.loads(request.payload) == {"mode": "eco"}
        dev.answer(rid, 404, None, raw=b"")
        r = call.result(10)
    assert r.status_code == 200  # the device's status is data, not the HTTP status
    assert r.json() == {"status": 404, "payload": None}


def test_offline_device_is_404_device_not_online(harness: HubHarness, rest: httpx.Client,
                                                 device: DeviceFactory) -> None:
    harness.create_device("m-offline")
    r = invoke(rest, "m-offline")
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotOnline"
    device("m-unsubscribed", subscribe=False)  # connected, but not listening for methods
    r = invoke(rest, "m-unsubscribed")
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotOnline"
    r = invoke(rest, "m-no-such-device")
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound"
    r = rest.post(f"/twins/m-offline/modules/mod1/methods{API}", json={"methodName": "x"})
    assert r.status_code == 404 and r.json()["errorCode"] == "ModuleNotFound"
    r = rest.put(f"/devices/m-offline/modules/mod1{API}", json={"moduleId": "mod1"})
    assert r.status_code == 200, r.text
    r = rest.post(f"/twins/m-offline/modules/mod1/methods{API}", json={"methodName": "x"})
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotOnline"


def test_slow_device_is_504_gateway_timeout(rest: httpx.Client, device: DeviceFactory) -> None:
    dev = device("m-slow")
    started = time.monotonic()
    r = invoke(rest, "m-slow", responseTimeoutInSeconds=5)
    elapsed = time.monotonic() - started
    assert r.status_code == 504 and r.json()["errorCode"] == "GatewayTimeout", r.text
    assert 4.9 <= elapsed < 8
    _, rid = parse_method_topic(dev.next_message().topic)
    dev.answer(rid, 200, {"too": "late"})  # a late answer is ignored and costs nothing
    dev.answer(rid, 200, {"too": "late"})


def test_device_connecting_within_the_connect_timeout_is_called(harness: HubHarness,
                                                                device: DeviceFactory) -> None:
    harness.create_device("m-late")
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        call = invoke_later(harness, pool, "m-late", "hello", {"n": 1}, connectTimeoutInSeconds=20)
        time.sleep(0.5)
        assert not call.done()
        device("m-late", create=False, responder=echo_responder())
        r = call.result(20)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": 200, "payload": {"method": "hello", "echo": {"n": 1}}}
    assert time.monotonic() - started < 5


def test_connect_timeout_expiring_is_404(harness: HubHarness, rest: httpx.Client) -> None:
    harness.create_device("m-never")
    started = time.monotonic()
    r = invoke(rest, "m-never", connectTimeoutInSeconds=1)
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotOnline"
    assert 0.9 <= time.monotonic() - started < 4


def test_a_response_with_another_rid_is_ignored(harness: HubHarness, device: DeviceFactory) -> None:
    dev = device("m-rid")
    with ThreadPoolExecutor(1) as pool:
        call = invoke_later(harness, pool, "m-rid", "getStatus", responseTimeoutInSeconds=10)
        _, rid = parse_method_topic(dev.next_message().topic)
        dev.answer(rid + "0", 500, {"wrong": 1})
        dev.answer("no-such-rid", 500, {"wrong": 2})
        time.sleep(0.3)
        assert not call.done()
        dev.answer(rid, 200, {"right": True})
        dev.answer(rid, 500, {"second": True})  # only the first answer counts
        r = call.result(10)
    assert r.json() == {"status": 200, "payload": {"right": True}}
    assert harness.connected("m-rid") and harness.methods.pending_count == 0


def test_a_device_cannot_answer_for_another_device(harness: HubHarness, device: DeviceFactory) -> None:
    target = device("m-victim")
    forger = device("m-forger", subscribe=False)
    with ThreadPoolExecutor(1) as pool:
        call = invoke_later(harness, pool, "m-victim", "unlock", responseTimeoutInSeconds=10)
        _, rid = parse_method_topic(target.next_message().topic)
        forger.answer(rid, 200, {"forged": True})  # the response topic names no device: ignored
        time.sleep(0.3)
        assert not call.done()
        target.answer(rid, 200, {"real": True})
        assert call.result(10).json() == {"status": 200, "payload": {"real": True}}
    assert harness.connected("m-forger")
    # Anything naming the other device is refused by topic authorization: the forger is disconnected.
    forger.client.publish("devices/m-victim/messages/events/", b"x", qos=1)
    assert forger.disconnected.wait(5)
    harness.wait(lambda: not harness.connected("m-forger"), what="forger disconnected")


def test_disconnect_while_waiting_is_404_at_once(harness: HubHarness, device: DeviceFactory) -> None:
    dev = device("m-drop")
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        call = invoke_later(harness, pool, "m-drop", responseTimeoutInSeconds=60)
        dev.next_message()
        dev.close()
        r = call.result(10)
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotOnline"
    assert "disconnected" in r.json()["message"]
    assert time.monotonic() - started < 5
    assert harness.methods.pending_count == 0


def test_method_subscription_survives_a_reconnect(harness: HubHarness, rest: httpx.Client,
                                                  device: DeviceFactory) -> None:
    """Azure keeps a clean_session=0 session's subscriptions; the SDK relies on it after renewing
    its token (it reconnects without subscribing again)."""
    first = device("m-renew")
    first.close()
    harness.wait(lambda: not harness.connected("m-renew"), what="disconnect")
    assert invoke(rest, "m-renew").json()["errorCode"] == "DeviceNotOnline"
    again = device("m-renew", create=False, subscribe=False, responder=echo_responder())
    assert again.connected.is_set()
    r = invoke(rest, "m-renew", "after", {"reconnected": True})
    assert r.json() == {"status": 200, "payload": {"method": "after", "echo": {"reconnected": True}}}


def test_concurrent_calls_to_several_devices_get_their_own_answers(harness: HubHarness,
                                                                   device: DeviceFactory) -> None:
    ids = [f"m-par-{i}" for i in range(3)]
    for device_id in ids:
        device(device_id, responder=echo_responder())
    with ThreadPoolExecutor(6) as pool:
        calls = {(d, n): invoke_later(harness, pool, d, f"call{n}", {"d": d, "n": n})
                 for d in ids for n in range(2)}
        for (d, n), call in calls.items():
            assert call.result(20).json() == {"status": 200, "payload": {"method": f"call{n}",
                                                                         "echo": {"d": d, "n": n}}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"methodName": ""}, "methodName"),
        ({"methodName": "a/b"}, "methodName"),
        ({"methodName": "x" * 129}, "methodName"),
        ({"methodName": 7}, "methodName"),
        ({"payload": 1}, "methodName"),
        ({"methodName": "m", "responseTimeoutInSeconds": 4}, "responseTimeoutInSeconds"),
        ({"methodName": "m", "responseTimeoutInSeconds": 301}, "responseTimeoutInSeconds"),
        ({"methodName": "m", "responseTimeoutInSeconds": "30"}, "responseTimeoutInSeconds"),
        ({"methodName": "m", "connectTimeoutInSeconds": -1}, "connectTimeoutInSeconds"),
        ({"methodName": "m", "connectTimeoutInSeconds": 301}, "connectTimeoutInSeconds"),
        ({"methodName": "m", "payload": "x" * MAX_PAYLOAD_BYTES}, "payload"),
        ({"methodName": "m", "timeout": 5}, "timeout"),
    ],
)
def test_invalid_requests_are_400(harness: HubHarness, rest: httpx.Client, body: dict[str, Any],
                                  field: str) -> None:
    harness.call(harness.hub.registry.find("m-valid")) or harness.create_device("m-valid")
    r = rest.post(f"/twins/m-valid/methods{API}", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field and r.json()["errorCode"] in ("ArgumentInvalid", "MessageTooLarge")


def test_a_payload_of_exactly_128_kb_is_accepted(rest: httpx.Client, device: DeviceFactory) -> None:
    device("m-big", responder=lambda dev, name, rid, payload: dev.answer(rid, 200, len(payload)))
    text = "x" * (MAX_PAYLOAD_BYTES - 2)  # plus the JSON quotes: 128 KB exactly
    r = invoke(rest, "m-big", "size", text)
    assert r.json() == {"status": 200, "payload": len(text)}


def test_invoking_needs_service_connect(harness: HubHarness, device: DeviceFactory) -> None:
    device("m-auth", responder=echo_responder())
    with harness.rest("registryReadWrite") as client:
        r = invoke(client, "m-auth")
    assert r.status_code == 403 and r.json()["errorCode"] == "IotHubUnauthorizedAccess"
    with httpx.Client(base_url=harness.rest_url) as anonymous:
        assert invoke(anonymous, "m-auth").status_code == 401
    with harness.rest("service") as client:
        assert invoke(client, "m-auth").json()["status"] == 200


def test_invocations_are_audited_and_listed_in_openapi(harness: HubHarness, rest: httpx.Client,
                                                       device: DeviceFactory) -> None:
    device("m-audit", responder=echo_responder(202))
    invoke(rest, "m-audit", "audited")

    async def records() -> list[Any]:
        await harness.hub.audit.flush()
        return await harness.hub.audit.query(action_prefix="method.invoke", limit=1000)

    mine = [r for r in harness.call(records()) if r.target == "m-audit"]
    assert mine and mine[0].outcome == "ok" and mine[0].principal == "policy:iothubowner"
    assert mine[0].details == {"method": "audited", "status": 202}
    spec = rest.get("/openapi.json").json()
    assert "post" in spec["paths"]["/twins/{id}/methods"]
    assert "post" in spec["paths"]["/twins/{id}/modules/{mid}/methods"]


def test_paho_device_sees_only_its_own_requests(harness: HubHarness, device: DeviceFactory) -> None:
    a, b = device("m-own-a"), device("m-own-b")
    with ThreadPoolExecutor(1) as pool:
        call = invoke_later(harness, pool, "m-own-a", "mine")
        _, rid = parse_method_topic(a.next_message().topic)
        a.answer(rid, 200, None)
        call.result(10)
    assert b.messages.empty()


def test_method_routes_are_mounted_once_and_documented(harness: HubHarness) -> None:
    app = build_app(harness.hub)
    paths = [(r.method, r.path) for r in app[ROUTES_KEY]]
    assert all(paths.count(p) == 1 for p in METHOD_PATHS)
    assert "/twins/{id}/modules/{mid}/methods" in json.loads(app[SPEC_KEY])["paths"]
