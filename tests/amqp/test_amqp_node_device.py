"""Microsoft's Node.js device SDK over Amqp and AmqpWs: C2D complete / reject / abandon with the
matching feedback, twin get / reported patch / desired-patch handler, direct methods."""

from __future__ import annotations

from typing import Any

import pytest
from amqp_helpers import API, AmqpHub, NodeDevice, run_service_sdk

pytestmark = pytest.mark.usefixtures("node_sdk")
TRANSPORTS = ["Amqp", "AmqpWs"]


def feedback_records(hub: AmqpHub, count: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while len(records) < count:
        batch = hub.call(hub.hub.c2d.feedback.receive(timeout_s=30))
        assert batch is not None, f"only {len(records)} feedback records arrived"
        records += [r.to_wire() for r in batch.records]
        hub.call(hub.hub.c2d.feedback.complete(batch.lock_token))
    return records


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_c2d_complete_reject_abandon_with_feedback(amqp_hub: AmqpHub, transport: str) -> None:
    device = amqp_hub.create_device(f"node-c2d-{transport.lower()}")
    node = NodeDevice(amqp_hub, device, transport)
    try:
        node.call("open")
        node.call("c2d")
        with amqp_hub.rest() as rest:
            for action in ("complete", "reject", "abandon-once"):
                path = f"/devices/{device.device_id}/messages/deviceBound{API}"
                r = rest.post(path, content=f"do {action}",
                              headers={"iothub-ack": "full", "iothub-messageid": f"m-{action}",
                                       "iothub-correlationid": "c-1", "iothub-app-action": action})
                assert r.status_code in (201, 204), r.text
                got = node.next_event("c2d")
                assert got["messageId"] == f"m-{action}" and got["data"] == f"do {action}"
                assert got["correlationId"] == "c-1" and got["props"]["action"] == action
                assert got["ack"] == "full"
                settled = node.next_event("settled")
                if action == "abandon-once":  # redelivered, then completed
                    again = node.next_event("c2d")
                    assert again["messageId"] == "m-abandon-once" and again["action"] == "complete"
                    node.next_event("settled")
                assert settled["messageId"] == f"m-{action}"
    finally:
        node.close()
    records = {r["originalMessageId"]: r["statusCode"] for r in feedback_records(amqp_hub, 3)
               if r["deviceId"] == device.device_id}
    assert records == {"m-complete": "Success", "m-reject": "Rejected", "m-abandon-once": "Success"}
    assert amqp_hub.call(amqp_hub.hub.c2d.queue_depth(device.device_id)) == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_twin_get_reported_patch_and_desired_patches(amqp_hub: AmqpHub, transport: str) -> None:
    device = amqp_hub.create_device(f"node-twin-{transport.lower()}")
    node = NodeDevice(amqp_hub, device, transport)
    try:
        node.call("open")
        with amqp_hub.rest() as rest:
            r = rest.patch(f"/twins/{device.device_id}{API}", json={"properties": {"desired": {"rate": 5}}})
            assert r.status_code == 200, r.text
            twin = node.call("twin")
            assert twin["desired"]["rate"] == 5 and twin["desired"]["$version"] >= 2
            node.call("report", patch={"firmware": "1.2.3", "temp": {"max": 40}})
            reported = rest.get(f"/twins/{device.device_id}{API}").json()["properties"]["reported"]
            assert reported["firmware"] == "1.2.3" and reported["temp"] == {"max": 40}
            r = rest.patch(f"/twins/{device.device_id}{API}", json={"properties": {"desired": {"rate": 9}}})
            assert r.status_code == 200, r.text
            patch = node.next_event("desired")["patch"]
            while patch.get("rate") == 5:  # the SDK first hands the handler the whole desired state
                patch = node.next_event("desired")["patch"]
            assert patch["rate"] == 9 and patch["$version"] == r.json()["properties"]["desired"]["$version"]
    finally:
        node.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_direct_methods(amqp_hub: AmqpHub, transport: str) -> None:
    device = amqp_hub.create_device(f"node-method-{transport.lower()}")
    node = NodeDevice(amqp_hub, device, transport)
    try:
        node.call("open")
        node.call("methods", names=["reboot", "fail"])
        with amqp_hub.rest() as rest:
            r = rest.post(f"/twins/{device.device_id}/methods{API}", json={
                "methodName": "reboot", "payload": {"delay": 3}, "responseTimeoutInSeconds": 30,
                "connectTimeoutInSeconds": 10})
            assert r.status_code == 200, r.text
            assert r.json() == {"status": 200, "payload": {"echo": {"delay": 3}, "name": "reboot"}}
            seen = node.next_event("method")
            assert seen["name"] == "reboot" and seen["payload"] == {"delay": 3}
            r = rest.post(f"/twins/{device.device_id}/methods{API}", json={
                "methodName": "fail", "payload": None, "responseTimeoutInSeconds": 30})
            assert r.status_code == 200 and r.json()["status"] == 500, r.text
    finally:
        node.close()


def test_registry_manager_c2d_reaches_an_amqp_device_with_its_properties(amqp_hub: AmqpHub) -> None:
    """Python azure-iot-hub `send_c2d_message` (uamqp) to a Node.js device on AMQP."""
    device = amqp_hub.create_device("node-c2d-from-uamqp")
    node = NodeDevice(amqp_hub, device, "Amqp")
    try:
        node.call("open")
        node.call("c2d")
        result = run_service_sdk(amqp_hub, device.device_id, ["from the registry manager"], {
            "messageId": "uamqp-1", "correlationId": "corr-9", "contentType": "text/plain",
            "iothub-ack": "positive", "color": "green", "shape": "round"})
        assert result == {"ok": True}
        got = node.next_event("c2d")
        assert got["data"] == "from the registry manager"
        assert got["messageId"] == "uamqp-1" and got["correlationId"] == "corr-9"
        assert got["contentType"] == "text/plain" and got["ack"] == "positive"
        assert got["props"]["color"] == "green" and got["props"]["shape"] == "round"
        node.next_event("settled")
    finally:
        node.close()
