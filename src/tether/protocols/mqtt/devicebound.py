"""How a cloud-to-device message looks to an MQTT device: its `devices/{id}/messages/devicebound/{bag}`
topic. Delivery itself (locking, settling, redelivery) is protocol-neutral: `messaging.c2d_delivery`."""

from __future__ import annotations

from tether.messaging.c2d import C2DMessage
from tether.protocols.mqtt.topics import c2d_topic

__all__ = ["c2d_message_topic"]


def c2d_message_topic(message: C2DMessage) -> str:
    """The topic carrying `message`, with the properties azure-iot-device reads back into its
    `Message` (`$.mid` message_id, `$.cid` correlation_id, `$.uid` user_id, `$.ct` content_type,
    `$.ce` content_encoding, `$.exp` expiry_time_utc, `iothub-ack` ack, the rest custom_properties).
    Raises `TopicError` for text no topic can carry."""
    system = {"$.mid": message.message_id, "$.to": f"/devices/{message.device_id}/messages/deviceBound"}
    if message.correlation_id:
        system["$.cid"] = message.correlation_id
    if message.user_id:
        system["$.uid"] = message.user_id
    if message.content_type:
        system["$.ct"] = message.content_type
    if message.content_encoding:
        system["$.ce"] = message.content_encoding
    system["$.exp"] = message.expiry_time.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    app = dict(message.properties)
    if message.ack != "none":
        app["iothub-ack"] = message.ack
    return c2d_topic(message.device_id, system, app)
