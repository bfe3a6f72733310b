"""The service side over AMQP: Python `azure-iot-hub`'s `send_c2d_message` (uamqp: SASL MSSBCBS, CBS
with a ulong message-id, an absolute target URL) queues C2D for an MQTT device with its properties;
feedback is read over AMQP by python-qpid-proton; refusals carry the conditions the SDKs map and
are audited."""

from __future__ import annotations

import json
import uuid
from typing import Any

import proton
import pytest
from amqp_helpers import AmqpHub, proton_client, run_service_sdk, service_user
from azure.iot.device import IoTHubDeviceClient


def mqtt_device(hub: AmqpHub, device_id: str) -> Any:
    device = hub.create_device(device_id)
    client = IoTHubDeviceClient.create_from_connection_string(
        hub.connection_string(device), server_verification_cert=hub.ca_file.read_text(),
        connection_retry=False)
    client.connect()
    return client


def test_send_c2d_message_reaches_an_mqtt_device_with_its_properties(amqp_hub: AmqpHub) -> None:
    client = mqtt_device(amqp_hub, "svc-mqtt-1")
    try:
        result = run_service_sdk(amqp_hub, "svc-mqtt-1", ["to mqtt"],
                                 {"messageId": "c2d-42", "correlationId": "corr-7", "iothub-ack": "full",
                                  "contentType": "text/plain", "color": "blue"})
        assert result == {"ok": True}
        message = client.receive_message(timeout=60)
        assert message is not None, "no C2D message reached the MQTT device"
        assert message.data == b"to mqtt"
        assert message.message_id == "c2d-42" and message.correlation_id == "corr-7"
        assert message.custom_properties.get("color") == "blue"
        assert message.content_type == "text/plain"
        assert message.ack == "full"
    finally:
        client.shutdown()


def read_feedback(hub: AmqpHub, timeout: float = 60) -> tuple[Any, list[dict[str, Any]]]:
    user, password = service_user(hub)
    conn = proton_client(hub, user=user, password=password)
    try:
        receiver = conn.create_receiver("/messages/serviceBound/feedback")
        message = receiver.receive(timeout=timeout)
        receiver.accept()
        return message, json.loads(bytes(message.body))
    finally:
        conn.close()


def test_feedback_is_read_over_amqp_with_azures_batch_shape(amqp_hub: AmqpHub) -> None:
    client = mqtt_device(amqp_hub, "svc-mqtt-fb")
    try:
        sent = run_service_sdk(amqp_hub, "svc-mqtt-fb", ["ack me"],
                               {"messageId": "fb-1", "iothub-ack": "full"})
        assert sent == {"ok": True}
        assert client.receive_message(timeout=60) is not None  # the SDK completes it (PUBACK)
    finally:
        client.shutdown()
    message, records = read_feedback(amqp_hub)
    assert message.content_type == "application/vnd.microsoft.iothub.feedback.json"
    mine = [r for r in records if r["originalMessageId"] == "fb-1"]
    assert mine and mine[0]["statusCode"] == "Success" and mine[0]["deviceId"] == "svc-mqtt-fb"
    assert set(mine[0]) == {"originalMessageId", "enqueuedTimeUtc", "statusCode", "description", "deviceId",
                            "deviceGenerationId"}
    amqp_hub.wait(lambda: amqp_hub.call(amqp_hub.hub.c2d.feedback.pending()) == 0,
                  what="the accepted batch to be completed")


def send_with_proton(hub: AmqpHub, to: str, body: bytes = b"x", policy: str = "iothubowner") -> Any:
    user, password = service_user(hub, policy)
    conn = proton_client(hub, user=user, password=password)
    try:
        sender = conn.create_sender("/messages/devicebound")
        delivery = sender.send(proton.Message(body=body, address=to, id=str(uuid.uuid4())), error_states=[])
        return delivery.remote_state, (delivery.remote.condition.name if delivery.remote.condition else None)
    finally:
        conn.close()


def test_unknown_and_disabled_devices_and_full_queues_are_rejected_with_conditions(amqp_hub: AmqpHub) -> None:
    assert send_with_proton(amqp_hub, "/devices/nobody/messages/devicebound") == \
        (proton.Delivery.REJECTED, "amqp:not-found")
    amqp_hub.create_device("svc-disabled")
    amqp_hub.call(amqp_hub.hub.registry.set_status("svc-disabled", False, actor="test"))
    assert send_with_proton(amqp_hub, "/devices/svc-disabled/messages/devicebound") == \
        (proton.Delivery.REJECTED, "amqp:not-found")
    amqp_hub.create_device("svc:full")
    depth = amqp_hub.hub.c2d.max_queue_depth
    for _ in range(depth):
        assert send_with_proton(amqp_hub, "/devices/svc%3Afull/messages/devicebound")[0] == \
            proton.Delivery.ACCEPTED
    assert send_with_proton(amqp_hub, "/devices/svc%3Afull/messages/devicebound") == \
        (proton.Delivery.REJECTED, "amqp:resource-limit-exceeded")
    assert send_with_proton(amqp_hub, "amqps://127.0.0.60/devices/svc%3Afull/messages/deviceBound",
                            b"y" * 70_000)[1] == "amqp:link:message-size-exceeded"


def test_a_device_connect_policy_cannot_attach_service_links(amqp_hub: AmqpHub) -> None:
    user, password = service_user(amqp_hub, "device")
    conn = proton_client(amqp_hub, user=user, password=password)
    try:
        with pytest.raises(proton.utils.LinkDetached) as info:
            conn.create_sender("/messages/devicebound")
        assert "amqp:unauthorized-access" in str(info.value)
        with pytest.raises(proton.utils.LinkDetached):
            conn.create_receiver("/messages/serviceBound/feedback")
    finally:
        conn.close()
    rows = amqp_hub.audit_rows("amqp.attach", "missing-permission")
    assert len(rows) >= 2


def test_send_c2d_message_over_websockets(amqp_hub: AmqpHub) -> None:
    """uamqp's AmqpOverWebsocket: `wss://{host}:443/$servicebus/websocket/`, subprotocol AMQPWSB10."""
    amqp_hub.create_device("svc-ws")
    result = run_service_sdk(amqp_hub, "svc-ws", ["over websockets"], {"messageId": "ws-1"}, websocket=True)
    assert result == {"ok": True}
    assert amqp_hub.call(amqp_hub.hub.c2d.queue_depth("svc-ws")) == 1
    message = amqp_hub.call(amqp_hub.hub.c2d.receive("svc-ws"))
    assert message is not None and message.message_id == "ws-1" and message.body == b"over websockets"

