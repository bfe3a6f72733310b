"""The core end-to-end flows on both backend sets (see conftest.py): device create via REST, MQTT
connect (paho, plain TCP), telemetry PUBACK → read back through the consumer API, C2D delivery, twin
desired patch delivery, direct method, disable → drop. Same assertions on SQLite + local stream and on
PostgreSQL + JetStream (+ the cluster bus, which a single node must not change)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from backend_env import BackendSet
from e2e_kit import MqttDevice, NodeThread, Rest, new_key, wait_for


def test_core_flows(backend: BackendSet, node: NodeThread, ca_file: Path) -> None:
    rest = Rest(node.ports["https"], ca_file, node.connection_string)
    device_id, key = f"e2e-{backend.name}.1", new_key()  # a '.' in the id: NATS subjects must cope
    device = MqttDevice(device_id, key, method_answers={"reboot": {"rebooting": True}})
    try:
        created = rest.create_device(device_id, key)
        assert created["deviceId"] == device_id and created["status"] == "enabled"

        assert device.connect(node.ports["mqtt"]) == 0
        device.subscribe_all()
        bodies = [f"t{i}" for i in range(20)]
        for body in bodies:
            device.publish(body)
        device.wait_acked(len(bodies))
        assert device.acked_bodies == bodies
        assert rest.event_bodies(device_id) == bodies

        rest.send_c2d(device_id, b"hello-c2d", **{"iothub-messageid": "m-1"})
        topic, payload = device.wait_message(lambda t, p: "/messages/devicebound/" in t)
        assert payload == b"hello-c2d" and f"devices/{device_id}/messages/devicebound/" in topic

        twin = rest.patch_desired(device_id, {"fan": {"speed": 3}})
        version = twin["properties"]["desired"]["$version"]
        topic, payload = device.wait_message(lambda t, p: t.startswith("$iothub/twin/PATCH/"))
        assert topic == f"$iothub/twin/PATCH/properties/desired/?$version={version}"
        assert json.loads(payload) == {"fan": {"speed": 3}, "$version": version}

        answer = rest.invoke(device_id, "reboot", {"delay": 1})
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"status": 200, "payload": {"rebooting": True}}
        assert device.method_calls == [("reboot", {"delay": 1})]

        offline = rest.invoke("no-such-device", "reboot", None)
        assert offline.status_code == 404 and offline.json()["errorCode"] == "DeviceNotFound"

        began = time.monotonic()
        rest.disable(device_id)
        assert device.disconnected.wait(5), "disabled device still connected"
        assert device.disconnected_at is not None and device.disconnected_at - began < 1.0
        assert device.connect(node.ports["mqtt"]) == 5  # CONNACK 5: not authorized (disabled)
        wait_for(lambda: node.hub.connections.get(device_id) is None, what="no connection left")

        later = rest.invoke(device_id, "reboot", None)
        assert later.status_code == 404 and later.json()["errorCode"] == "DeviceNotOnline"
    finally:
        device.close()
        rest.close()
