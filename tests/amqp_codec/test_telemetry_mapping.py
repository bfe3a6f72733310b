"""How a device's AMQP message becomes telemetry: the same `$.` keys MQTT uses, and the hot-path reader
(`read_telemetry`) agrees with the general decoder followed by `system_bag` on every message."""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.protocols.amqp import (
    AmqpValue,
    Header,
    Message,
    Properties,
    Symbol,
    Timestamp,
    ULong,
    decode_message,
)
from tether.protocols.amqp.telemetry import message_body, read_telemetry, system_bag

NODE_MESSAGE = Message(
    header=Header(),
    message_annotations={Symbol("iothub-interface-id"): "dtmi:x;1", Symbol("dt-subject"): "thermo"},
    properties=Properties(message_id=uuid.UUID("7b1f4c84-6f0a-4a1c-9f3e-2a5d4c3b2a19"),
                          to="/devices/d/messages/events", correlation_id="c-1",
                          content_type=Symbol("application/json"), content_encoding=Symbol("utf-8"),
                          absolute_expiry_time=Timestamp(1_700_000_000_000)),
    application_properties={"alert": "high", "iothub-outputname": "out1", "count": 3},
    body=(b'{"t":1}',),
)


def test_a_node_sdk_message_maps_to_the_mqtt_keys() -> None:
    system, app, body = read_telemetry(NODE_MESSAGE.encode())
    assert system == {"$.mid": "7b1f4c84-6f0a-4a1c-9f3e-2a5d4c3b2a19", "$.cid": "c-1",
                      "$.ct": "application/json", "$.ce": "utf-8", "$.exp": "2023-11-14T22:13:20.000Z",
                      "$.ifid": "dtmi:x;1", "$.sub": "thermo", "$.on": "out1"}
    assert app == {"alert": "high", "count": "3"}
    assert body == b'{"t":1}'


ids = st.one_of(st.text(max_size=20), st.uuids(), st.integers(0, 2**64 - 1).map(ULong), st.binary(max_size=8))
texts = st.text(max_size=12)
messages = st.builds(
    Message,
    header=st.none() | st.just(Header()),
    message_annotations=st.none() | st.dictionaries(
        st.sampled_from(["iothub-interface-id", "dt-subject", "x-other"]).map(Symbol), texts, max_size=3),
    properties=st.none() | st.builds(
        Properties, message_id=st.none() | ids, correlation_id=st.none() | ids,
        content_type=st.none() | texts.map(lambda t: Symbol(t.encode("ascii", "ignore").decode())),
        user_id=st.none() | st.binary(max_size=8),
        absolute_expiry_time=st.none() | st.integers(0, 2**41).map(Timestamp),
        creation_time=st.none() | st.integers(0, 2**41).map(Timestamp)),
    application_properties=st.none() | st.dictionaries(
        st.one_of(texts, st.just("iothub-outputname")),
        st.one_of(texts, st.integers(-(2**63), 2**63 - 1), st.booleans()),
        max_size=4),
    body=st.one_of(st.lists(st.binary(max_size=20), min_size=1, max_size=3).map(tuple),
                   st.binary(max_size=20).map(AmqpValue), texts.map(AmqpValue)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages)
def test_the_hot_path_reader_equals_the_general_decoder(message: Message) -> None:
    payload = message.encode()
    decoded = decode_message(payload)
    assert read_telemetry(payload) == (*system_bag(decoded), message_body(decoded))
