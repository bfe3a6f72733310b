"""Module identities over AMQP (issue 15 on the AMQP surface).

Microsoft's Node.js `ModuleClient` (azure-iot-device + azure-iot-device-amqp, CBS audience
`{host}/devices/{id}/modules/{mid}`) over Amqp and AmqpWs: telemetry read back with
`iothub-connection-module-id`, the module twin (get, reported patch, desired patches) and module direct
methods — none of it touching the device's own twin. python-qpid-proton as a module with SASL PLAIN
`{deviceId}/modules/{moduleId}@sas.{hub}`. Refusals, each audited: the device's key in a module client,
a device token for a module audience (and a module token for the device's), and a module attaching
another module's, its device's or another device's addresses — a module acts only as itself.
"""

from __future__ import annotations

import time
from typing import Any

import proton
import pytest
from amqp_helpers import API, AmqpHub, NodeDevice, NodeError, proton_client, put_token
from proton.utils import LinkDetached

pytestmark = pytest.mark.usefixtures("node_sdk")


def accepted(sender: Any, body: bytes) -> bool:
    return bool(sender.send(proton.Message(body=body), timeout=30).remote_state == proton.Delivery.ACCEPTED)


def refusals(hub: AmqpHub, action: str, started: float, reason: str | None = None,
             principal: str | None = None, timeout: float = 15) -> list[Any]:
    """Refused records of `action` since `started` (waits for the batched audit writer)."""
    deadline = time.monotonic() + timeout
    while True:
        hub.call(hub.hub.audit.flush())
        rows = [r for r in hub.audit_rows(action, reason) if r.time.timestamp() >= started - 1
                and r.outcome == "refused" and (principal is None or r.principal == principal)]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["Amqp", "AmqpWs"])
def test_module_client_telemetry_module_twin_and_module_methods(amqp_hub: AmqpHub, transport: str) -> None:
    device_id = f"mod-dev-{transport.lower()}"
    module = amqp_hub.create_module(device_id, "sensor")
    node = NodeDevice(amqp_hub, None, transport, connection_string=amqp_hub.module_connection_string(module))
    twin_path = f"/twins/{device_id}/modules/sensor{API}"
    try:
        node.call("open")
        node.call("send", body='{"t":7}', messageId="mod-msg-1", props={"zone": "b"})
        with amqp_hub.rest() as rest:
            r = rest.patch(twin_path, json={"properties": {"desired": {"rate": 5}}})
            assert r.status_code == 200, r.text
            twin = node.call("twin")
            assert twin["desired"]["rate"] == 5
            node.call("report", patch={"firmware": "4.5.6"})
            reported = rest.get(twin_path).json()["properties"]["reported"]
            assert reported["firmware"] == "4.5.6"
            device_reported = rest.get(f"/twins/{device_id}{API}").json()["properties"]["reported"]
            assert "firmware" not in device_reported  # the module's twin, not its device's
            r = rest.patch(twin_path, json={"properties": {"desired": {"rate": 9}}})
            assert r.status_code == 200, r.text
            patch = node.next_event("desired")["patch"]
            while patch.get("rate") == 5:  # the SDK first hands the handler the whole desired state
                patch = node.next_event("desired")["patch"]
            assert patch["rate"] == 9

            node.call("methods", names=["calibrate"])
            r = rest.post(f"/twins/{device_id}/modules/sensor/methods{API}", json={
                "methodName": "calibrate", "payload": {"gain": 2}, "responseTimeoutInSeconds": 30,
                "connectTimeoutInSeconds": 10})
            assert r.status_code == 200, r.text
            assert r.json() == {"status": 200, "payload": {"echo": {"gain": 2}, "name": "calibrate"}}
            # the device itself is not connected: a method for it finds nobody
            r = rest.post(f"/twins/{device_id}/methods{API}", json={
                "methodName": "calibrate", "payload": None, "responseTimeoutInSeconds": 5,
                "connectTimeoutInSeconds": 0})
            assert r.status_code == 404, r.text
    finally:
        node.close()
    (event,) = amqp_hub.events_of(device_id)
    assert event["properties"] == {"zone": "b"}
    system = event["systemProperties"]
    assert system["message-id"] == "mod-msg-1"
    assert system["iothub-connection-device-id"] == device_id
    assert system["iothub-connection-module-id"] == "sensor"
    assert '"scope":"module"' in system["iothub-connection-auth-method"]


def test_a_module_client_signing_with_its_devices_key_is_refused(amqp_hub: AmqpHub) -> None:
    module = amqp_hub.create_module("mod-devkey", "edge")
    device = amqp_hub.call(amqp_hub.hub.registry.get("mod-devkey"))
    device_key = device.authentication.symmetric_key.primary_key
    started = time.time()
    node = NodeDevice(amqp_hub, None, "Amqp",
                      connection_string=amqp_hub.module_connection_string(module, key=device_key))
    try:
        with pytest.raises(NodeError) as info:
            node.call("open", timeout=120)
        assert info.value.name == "UnauthorizedError", info.value.answer
    finally:
        node.close()
    assert refusals(amqp_hub, "auth.amqp", started, principal="device:mod-devkey/edge")


def test_device_and_module_tokens_do_not_cross_over(amqp_hub: AmqpHub) -> None:
    module = amqp_hub.create_module("mod-scope", "edge")
    device = amqp_hub.call(amqp_hub.hub.registry.get("mod-scope"))
    module_audience = f"{amqp_hub.ip}%2Fdevices%2Fmod-scope%2Fmodules%2Fedge"
    started = time.time()
    conn = proton_client(amqp_hub, mechs="ANONYMOUS")
    try:
        status, _, why = put_token(conn, amqp_hub.device_token(device), module_audience)
        assert (status, why) == (401, "wrong-scope")
        status, _, why = put_token(conn, amqp_hub.module_token(module), f"{amqp_hub.ip}/devices/mod-scope")
        assert (status, why) == (401, "wrong-scope")
        with pytest.raises(LinkDetached):  # nothing was granted
            conn.create_sender("/devices/mod-scope/modules/edge/messages/events")
        status, _, _ = put_token(conn, amqp_hub.module_token(module), module_audience)
        assert status == 200
        sender = conn.create_sender("/devices/mod-scope/modules/edge/messages/events")
        assert accepted(sender, b"cbs module")
    finally:
        conn.close()
    scopes = {r.principal: r.details.get("tokenScope") for r in refusals(amqp_hub, "auth.amqp", started,
                                                                          "wrong-scope")}
    assert scopes == {"device:mod-scope/edge": "device", "device:mod-scope": "module"}
    (event,) = amqp_hub.events_of("mod-scope")
    assert event["systemProperties"]["iothub-connection-module-id"] == "edge"


def test_a_module_acts_only_as_itself(amqp_hub: AmqpHub) -> None:
    module = amqp_hub.create_module("mod-own", "own")
    amqp_hub.create_module("mod-own", "sibling")
    amqp_hub.create_module("mod-stranger", "own")
    started = time.time()
    conn = proton_client(amqp_hub, user=f"mod-own/modules/own@sas.{amqp_hub.ip}",
                         password=amqp_hub.module_token(module))
    refused = {
        ("sender", "/devices/mod-own/modules/sibling/messages/events"): "other-module",
        ("receiver", "/devices/mod-own/modules/sibling/twin"): "other-module",
        ("receiver", "/devices/mod-own/modules/sibling/methods/devicebound"): "other-module",
        ("sender", "/devices/mod-own/messages/events"): "other-module",  # its device's own address
        ("receiver", "/devices/mod-own/messages/devicebound"): "other-module",  # modules get no C2D
        ("sender", "/devices/mod-stranger/modules/own/messages/events"): "other-device",
    }
    try:
        own = conn.create_sender("/devices/mod-own/modules/own/messages/events")
        for (role, address), _ in refused.items():
            with pytest.raises(LinkDetached) as info:
                if role == "sender":
                    conn.create_sender(address)
                else:
                    conn.create_receiver(address)
            assert "amqp:unauthorized-access" in str(info.value), address
        # the connection stays usable for the module itself
        assert accepted(own, b"still me")
    finally:
        conn.close()
    rows = refusals(amqp_hub, "amqp.attach", started)
    deadline = time.monotonic() + 15
    while len(rows) < len(refused) and time.monotonic() < deadline:
        rows = refusals(amqp_hub, "amqp.attach", started)
    by_address = {r.details.get("address"): (r.reason, r.target) for r in rows}
    for (_, address), reason in refused.items():
        assert by_address[address][0] == reason, (address, by_address.get(address))
    assert by_address["/devices/mod-own/modules/sibling/twin"][1] == "mod-own/sibling"
    (event,) = amqp_hub.events_of("mod-own")
    assert event["body"] == "still me"
    assert event["systemProperties"]["iothub-connection-module-id"] == "own"


def test_deleting_a_module_detaches_its_links_and_its_credential_is_not_taken_again(
        amqp_hub: AmqpHub) -> None:
    module = amqp_hub.create_module("mod-gone", "edge")
    conn = proton_client(amqp_hub, user=f"mod-gone/modules/edge@sas.{amqp_hub.ip}",
                         password=amqp_hub.module_token(module))
    try:
        sender = conn.create_sender("/devices/mod-gone/modules/edge/messages/events")
        assert accepted(sender, b"before")
        connections = amqp_hub.hub.connections
        amqp_hub.wait(lambda: connections.get("mod-gone", "edge") is not None, what="registered")
        started = time.time()
        with amqp_hub.rest() as rest:
            r = rest.delete(f"/devices/mod-gone/modules/edge{API}", headers={"If-Match": "*"})
            assert r.status_code == 204, r.text
        amqp_hub.wait(lambda: connections.get("mod-gone", "edge") is None, what="dropped")
        with pytest.raises((LinkDetached, proton.utils.SendException)):
            sender.send(proton.Message(body=b"after"), timeout=30)
        # the SASL credential this connection still holds is checked again, and refused
        with pytest.raises(LinkDetached) as info:
            conn.create_sender("/devices/mod-gone/modules/edge/messages/events")
        assert "amqp:unauthorized-access" in str(info.value)
    finally:
        conn.close()
    assert refusals(amqp_hub, "auth.amqp", started, principal="device:mod-gone/edge")
    events = amqp_hub.events_of("mod-gone")
    assert [e["body"] for e in events] == ["before"]


def test_a_device_disabled_after_sasl_cannot_attach_with_that_credential(amqp_hub: AmqpHub) -> None:
    device = amqp_hub.create_device("dev-disabled-later")
    conn = proton_client(amqp_hub, user=f"dev-disabled-later@sas.{amqp_hub.ip}",
                         password=amqp_hub.device_token(device))
    try:
        started = time.time()
        amqp_hub.call(amqp_hub.hub.registry.set_status("dev-disabled-later", False, actor="test"))
        with pytest.raises(LinkDetached) as info:
            conn.create_sender("/devices/dev-disabled-later/messages/events")
        assert "amqp:unauthorized-access" in str(info.value)
    finally:
        conn.close()
    assert refusals(amqp_hub, "auth.amqp", started, "device-disabled", principal="device:dev-disabled-later")
