"""Azure topic rules, checked against azure-wire.md samples and the real SDK's own topic code."""

from __future__ import annotations

import pytest
from azure.iot.device import Message
from azure.iot.device.iothub.pipeline import mqtt_topic_iothub as sdk

from tether.protocols.mqtt.topics import (
    MethodResponse,
    Telemetry,
    TopicError,
    TwinGet,
    TwinReportedPatch,
    authorize_subscribe,
    c2d_topic,
    classify_publish,
    classify_subscribe,
    desired_patch_topic,
    encode_property_bag,
    input_topic,
    method_request_topic,
    parse_property_bag,
    parse_username,
    twin_response_topic,
)

SDK_TELEMETRY_TOPIC = (
    "devices/dev1/messages/events/%24.mid=msg-1&%24.cid=corr-1&%24.ct=application%2Fjson"
    "&%24.ce=utf-8&alert=high%20temp&zone=a%2Fb"
)


def test_sdk_telemetry_topic_sample_parses() -> None:
    target = classify_publish(SDK_TELEMETRY_TOPIC, "dev1", None)
    assert target == Telemetry(
        {"$.mid": "msg-1", "$.cid": "corr-1", "$.ct": "application/json", "$.ce": "utf-8"},
        {"alert": "high temp", "zone": "a/b"},
    )


def test_topic_built_by_the_sdk_itself_parses() -> None:
    message = Message(b"{}", message_id="m 1", content_type="application/json", content_encoding="utf-8")
    message.correlation_id = "c&=1"
    message.custom_properties.update({"plus": "a+b", "pct": "100%", "ünï": "çødé"})
    topic = sdk.encode_message_properties_in_topic(message, sdk.get_telemetry_topic_for_publish("dev1", None))
    assert topic.startswith("devices/dev1/messages/events/%24.mid=m%201&%24.cid=c%26%3D1")
    target = classify_publish(topic, "dev1")
    assert isinstance(target, Telemetry)
    assert target.system_properties == {
        "$.mid": "m 1",
        "$.cid": "c&=1",
        "$.ct": "application/json",
        "$.ce": "utf-8",
    }
    assert target.properties == {"plus": "a+b", "pct": "100%", "ünï": "çødé"}


def test_module_output_telemetry() -> None:
    message = Message(b"x", output_name="out1")
    topic = sdk.encode_message_properties_in_topic(
        message, sdk.get_telemetry_topic_for_publish("dev1", "mod1")
    )
    assert classify_publish(topic, "dev1", "mod1") == Telemetry({"$.on": "out1"}, {})


@pytest.mark.parametrize(
    ("bag", "system", "app"),
    [
        ("", {}, {}),
        ("a", {}, {"a": ""}),
        ("a=", {}, {"a": ""}),
        ("a=1&&b=2&", {}, {"a": "1", "b": "2"}),
        ("=v&k=v", {}, {"k": "v"}),
        ("k=a+b", {}, {"k": "a+b"}),
        ("k=%zz%2", {}, {"k": "%zz%2"}),
        ("k=%FF", {}, {"k": "\ufffd"}),
        ("k=1&k=2", {}, {"k": "2"}),
        ("k=a=b", {}, {"k": "a=b"}),
        ("$.to=%2Fdevices%2Fd&%24.exp=2030", {"$.to": "/devices/d", "$.exp": "2030"}, {}),
        ("$x=1&%24.=2", {"$.": "2"}, {"$x": "1"}),
    ],
)
def test_property_bag_parsing_is_lenient(bag: str, system: dict[str, str], app: dict[str, str]) -> None:
    assert parse_property_bag(bag) == (system, app)


def test_property_bag_limits() -> None:
    assert len(parse_property_bag("&".join(f"k{i}=v" for i in range(100)))[1]) == 100
    with pytest.raises(TopicError, match="too-many-properties"):
        parse_property_bag("&".join(f"k{i}=v" for i in range(101)))
    with pytest.raises(TopicError, match="property-bag-too-large"):
        parse_property_bag("k=" + "v" * 8191)
    with pytest.raises(TopicError, match="property-bag-too-large"):
        parse_property_bag("k=" + "é" * 4096)  # 8194 bytes in UTF-8


def test_encode_property_bag_orders_and_quotes_like_the_sdk() -> None:
    bag = encode_property_bag(
        {"$.ct": "application/json", "$.mid": "msg-1", "$.cid": "corr-1", "$.ce": "utf-8"},
        {"zone": "a/b", "alert": "high temp"},
    )
    assert bag == SDK_TELEMETRY_TOPIC.split("events/")[1]
    assert encode_property_bag({}, {"k=&": "v=/&?#+ "}) == "k%3D%26=v%3D%2F%26%3F%23%2B%20"
    with pytest.raises(TopicError, match="invalid-text"):
        encode_property_bag({}, {"k": "\ud800"})


def test_c2d_topic_is_read_back_by_the_sdk() -> None:
    topic = c2d_topic(
        "dev1",
        {"$.mid": "m/1", "$.to": "/devices/dev1/messages/deviceBound", "$.cid": "c=1"},
        {"iothub-ack": "full", "temp": "21 °C", "a&b": "x+y"},
    )
    assert topic.startswith("devices/dev1/messages/devicebound/%24.mid=m%2F1&%24.cid=c%3D1&%24.to=")
    assert sdk.is_c2d_topic(topic, "dev1")
    received = Message(b"")
    sdk.extract_message_properties_from_topic(topic, received)
    assert (received.message_id, received.correlation_id, received.ack) == ("m/1", "c=1", "full")
    assert received.custom_properties == {"temp": "21 °C", "a&b": "x+y"}


def test_input_topic_is_read_back_by_the_sdk() -> None:
    topic = input_topic("dev1", "mod1", "in 1", {"$.mid": "7"}, {"k": "v"})
    assert sdk.is_input_topic(topic, "dev1", "mod1")
    assert sdk.get_input_name_from_topic(topic) == "in 1"
    received = Message(b"")
    sdk.extract_message_properties_from_topic(topic, received)
    assert (received.message_id, received.custom_properties) == ("7", {"k": "v"})


def test_twin_and_method_topics_are_read_back_by_the_sdk() -> None:
    topic = twin_response_topic(204, "rid-1", version=7)
    assert topic == "$iothub/twin/res/204/?$rid=rid-1&$version=7"
    assert sdk.is_twin_response_topic(topic)
    assert sdk.get_twin_request_id_from_topic(topic) == "rid-1"
    assert sdk.get_twin_status_code_from_topic(topic) == "204"
    assert twin_response_topic(200, "a b") == "$iothub/twin/res/200/?$rid=a%20b"
    assert desired_patch_topic(12) == "$iothub/twin/PATCH/properties/desired/?$version=12"
    assert sdk.is_twin_desired_property_patch_topic(desired_patch_topic(12))
    topic = method_request_topic("reboot now", "42")
    assert topic == "$iothub/methods/POST/reboot%20now/?$rid=42"
    assert sdk.get_method_name_from_topic(topic) == "reboot now"
    assert sdk.get_method_request_id_from_topic(topic) == "42"


def test_sdk_twin_and_method_publishes_classify() -> None:
    get = sdk.get_twin_topic_for_publish("GET", "/", "r-1")
    patch = sdk.get_twin_topic_for_publish("PATCH", "/properties/reported/", "r 2")
    response = sdk.get_method_topic_for_publish("r-3", 404)
    assert (get, response) == ("$iothub/twin/GET/?$rid=r-1", "$iothub/methods/res/404/?$rid=r-3")
    assert classify_publish(get, "dev1") == TwinGet("r-1")
    assert classify_publish(patch, "dev1", "mod1") == TwinReportedPatch("r 2")
    assert classify_publish(response, "dev1") == MethodResponse(404, "r-3")
    assert classify_publish("$iothub/methods/res/-1?$rid=x", "dev1") == MethodResponse(-1, "x")


@pytest.mark.parametrize(
    ("topic", "device", "module", "reason"),
    [
        ("devices/dev2/messages/events/", "dev1", None, "other-device"),
        ("devices/dev10/messages/events/", "dev1", None, "other-device"),
        ("devices/dev/messages/events/", "dev1", None, "other-device"),
        ("devices/dev1/modules/m1/messages/events/", "dev1", None, "other-module"),
        ("devices/dev1/messages/events/", "dev1", "m1", "other-module"),
        ("devices/dev1/modules/m2/messages/events/", "dev1", "m1", "other-module"),
        ("devices/dev1/messages/eventsX", "dev1", None, "forbidden-topic"),
        ("devices/dev1/messages/devicebound/x", "dev1", None, "forbidden-topic"),
        ("devices/dev1/modules/m1/inputs/i", "dev1", "m1", "forbidden-topic"),
        ("devices/dev1", "dev1", None, "forbidden-topic"),
        ("$iothub/twin/res/200/?$rid=1", "dev1", None, "forbidden-topic"),
        ("$iothub/twin/PATCH/properties/desired/?$rid=1", "dev1", None, "forbidden-topic"),
        ("$iothub/methods/POST/m/?$rid=1", "dev1", None, "forbidden-topic"),
        ("$iothub/twin/GET/", "dev1", None, "missing-rid"),
        ("$iothub/twin/GET/?$rid=", "dev1", None, "missing-rid"),
        ("$iothub/methods/res/abc/?$rid=1", "dev1", None, "bad-status"),
        ("$iothub/methods/res/200/x/?$rid=1", "dev1", None, "bad-status"),
        ("$iothub/methods/res/\u0663/?$rid=1", "dev1", None, "bad-status"),
        ("other/topic", "dev1", None, "forbidden-topic"),
        ("", "dev1", None, "forbidden-topic"),
    ],
)
def test_publish_refusals(topic: str, device: str, module: str | None, reason: str) -> None:
    with pytest.raises(TopicError) as info:
        classify_publish(topic, device, module)
    assert info.value.reason == reason


def test_device_ids_with_special_characters_are_matched_literally() -> None:
    assert classify_publish("devices/a%2Fb?$/messages/events/k=v", "a%2Fb?$") == Telemetry({}, {"k": "v"})
    with pytest.raises(TopicError, match="forbidden-topic"):
        classify_publish("devices/a/b/messages/events/", "a")


@pytest.mark.parametrize(
    ("topic_filter", "module", "kind"),
    [
        ("devices/dev1/messages/devicebound/#", None, "c2d"),
        ("devices/dev1/messages/devicebound/+", None, "c2d"),
        ("devices/+/messages/devicebound/#", None, "c2d"),
        ("$iothub/twin/res/#", None, "twin-responses"),
        ("$iothub/twin/PATCH/properties/desired/#", None, "desired-patches"),
        ("$iothub/methods/POST/#", None, "methods"),
        ("$iothub/methods/POST/#", "m1", "methods"),
        ("devices/dev1/modules/m1/inputs/#", "m1", "inputs"),
        ("devices/dev1/modules/m1/#", "m1", "inputs"),  # the C SDK's module filter
        ("devices/dev1/modules/m2/#", "m1", None),
        ("devices/dev1/modules/m1/#", None, None),
        ("devices/dev2/messages/devicebound/#", None, None),
        ("devices/dev1/messages/events/#", None, None),
        ("devices/dev1/messages/devicebound/#", "m1", None),
        ("devices/dev1/modules/m2/inputs/#", "m1", None),
        ("devices/dev1/modules/m1/inputs/#", None, None),
        ("#", None, None),
        ("$iothub/#", None, None),
        ("devices/+/messages/events/#", None, None),
    ],
)
def test_subscribe_authorization(topic_filter: str, module: str | None, kind: str | None) -> None:
    assert classify_subscribe(topic_filter, "dev1", module) == kind
    assert authorize_subscribe(topic_filter, "dev1", module) is (kind is not None)


def test_sdk_subscribe_filters_are_all_authorized() -> None:
    for topic_filter in (
        sdk.get_c2d_topic_for_subscribe("dev1"),
        sdk.get_twin_response_topic_for_subscribe(),
        sdk.get_twin_patch_topic_for_subscribe(),
        sdk.get_method_topic_for_subscribe(),
    ):
        assert authorize_subscribe(topic_filter, "dev1", None)
    assert authorize_subscribe(sdk.get_input_topic_for_subscribe("dev1", "m1"), "dev1", "m1")


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        (
            "localhost/dev1/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0%28x%29",
            (
                "localhost",
                "dev1",
                None,
                {"api-version": "2019-10-01", "DeviceClientType": "azure-iot-device-iothub-py/2.14.0(x)"},
            ),
        ),
        (
            "hub.example:8883/dev1/mod1/?api-version=2020-09-30&model-id=dtmi%3Acom%3Aexample%3BX%3B1",
            (
                "hub.example:8883",
                "dev1",
                "mod1",
                {"api-version": "2020-09-30", "model-id": "dtmi:com:example;X;1"},
            ),
        ),
        (
            "127.0.0.1/d?1/?api-version=x&unknown",
            ("127.0.0.1", "d?1", None, {"api-version": "x", "unknown": ""}),
        ),
        ("host/dev1/", ("host", "dev1", None, {})),
        ("host/dev1", ("host", "dev1", None, {})),
        ("host/dev1/?", ("host", "dev1", None, {})),
        ("host/dev1/mod1/", ("host", "dev1", "mod1", {})),
    ],
)
def test_username_parsing(username: str, expected: tuple[object, ...]) -> None:
    assert tuple(parse_username(username)) == expected


@pytest.mark.parametrize(
    "username", ["", "host", "host/", "/dev1/?a=b", "host//?a=b", "a/b/c/d/?x=1", "h/d/m/x"]
)
def test_bad_usernames(username: str) -> None:
    with pytest.raises(TopicError, match="bad-username"):
        parse_username(username)
