"""Microsoft's Node.js device SDK (azure-iot-device + azure-iot-device-amqp) sends telemetry over Amqp
and AmqpWs, with SAS (CBS put-token) and X.509 (TLS client certificate, no token); the events are read
back through the consumer API with every property."""

from __future__ import annotations

import pytest
from amqp_helpers import AmqpHub, NodeDevice

pytestmark = pytest.mark.usefixtures("node_sdk")


@pytest.mark.parametrize("transport", ["Amqp", "AmqpWs"])
def test_sas_device_telemetry_with_properties(amqp_hub: AmqpHub, transport: str) -> None:
    device = amqp_hub.create_device(f"node-sas-{transport.lower()}")
    node = NodeDevice(amqp_hub, device, transport)
    try:
        node.call("open")
        node.call("send", body='{"t":21.5}', messageId="msg-1", correlationId="corr-1",
                  contentType="application/json", contentEncoding="utf-8",
                  props={"alert": "high", "zone": "a/b"})
        node.call("send", body="second")
    finally:
        node.close()
    events = amqp_hub.events_of(device.device_id, count=2)
    first, second = events[0], events[1]
    assert first["body"] == {"t": 21.5} or first["body"] == '{"t":21.5}'
    assert first["properties"] == {"alert": "high", "zone": "a/b"}
    system = first["systemProperties"]
    assert system["message-id"] == "msg-1" and system["correlation-id"] == "corr-1"
    assert system["content-type"] == "application/json" and system["content-encoding"] == "utf-8"
    assert system["iothub-connection-device-id"] == device.device_id
    assert '"type":"sas"' in system["iothub-connection-auth-method"]
    assert second["body"] == "second"


@pytest.mark.parametrize("transport", ["Amqp", "AmqpWs"])
def test_x509_device_telemetry(amqp_hub: AmqpHub, transport: str) -> None:
    device, cert, key = amqp_hub.create_x509_device(f"node-x509-{transport.lower()}")
    node = NodeDevice(amqp_hub, device, transport, identity=(cert, key))
    try:
        node.call("open")
        node.call("send", body="from x509", props={"k": "v"})
    finally:
        node.close()
    (event,) = amqp_hub.events_of(device.device_id)
    assert event["body"] == "from x509" and event["properties"] == {"k": "v"}
    assert '"x509Certificate"' in event["systemProperties"]["iothub-connection-auth-method"]


def test_amqp_messages_and_connections_are_counted_per_protocol(amqp_hub: AmqpHub) -> None:
    device = amqp_hub.create_device("node-metrics")
    node = NodeDevice(amqp_hub, device, "Amqp")
    try:
        node.call("open")
        node.call("send", body="counted")
        with amqp_hub.rest() as rest:
            text = rest.get("/metrics").text
        assert 'tether_d2c_messages_total{protocol="amqp"}' in text
        assert 'tether_connected_devices{protocol="amqp"}' in text
    finally:
        node.close()
