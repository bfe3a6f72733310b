"""Azure IoT Hub's MQTT topic, username and property-bag rules as pure functions.

Kept apart from the codec (generic MQTT) and the session (I/O, auth state) so the rules that decide
what a device may publish or subscribe to are small, total and fuzzable: every malformed input ends
in `TopicError`, never in another exception.

Encoding follows the Python device SDK (azure-iot-device 2.14): device and module ids are never
URL-encoded in topics or the username (ids may contain `%`), while property-bag and query keys and
values are percent-encoded with `quote(safe="")` and decoded with `unquote` (so `+` stays `+`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple
from urllib.parse import quote, unquote

__all__ = [
    "MAX_PROPERTIES",
    "MAX_PROPERTY_BAG_BYTES",
    "SYSTEM_PROPERTY_ORDER",
    "MethodResponse",
    "PublishTarget",
    "SubscriptionKind",
    "Telemetry",
    "TopicError",
    "TwinGet",
    "TwinReportedPatch",
    "Username",
    "authorize_subscribe",
    "c2d_topic",
    "classify_publish",
    "classify_subscribe",
    "desired_patch_topic",
    "encode_property_bag",
    "input_topic",
    "method_request_topic",
    "parse_property_bag",
    "parse_username",
    "twin_response_topic",
]

MAX_PROPERTIES: Final = 100
"""Most key=value pairs accepted in one property bag or query string."""

MAX_PROPERTY_BAG_BYTES: Final = 8192
"""Largest property bag or query string accepted, in UTF-8 bytes as sent."""

SYSTEM_PROPERTY_ORDER: Final = ("$.on", "$.mid", "$.cid", "$.uid", "$.to", "$.ct", "$.ce", "$.ifid", "$.exp")
"""The order the SDK writes system properties; `encode_property_bag` follows it, unknown keys last."""

_SYSTEM_PREFIX: Final = "$."
_STATUS_RE: Final = re.compile(r"-?[0-9]{1,9}")
_TWIN_PREFIX: Final = "$iothub/twin/"
_METHOD_RES_PREFIX: Final = "$iothub/methods/res/"


class TopicError(Exception):
    """A topic, username or property bag is malformed or not this identity's to use.

    `reason` is a slug: "forbidden-topic", "other-device", "other-module", "missing-rid",
    "bad-status", "bad-username", "too-many-properties", "property-bag-too-large", "invalid-text".
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Username(NamedTuple):
    """The parts of an Azure MQTT username; `query` holds every key (unknown ones included)."""

    hostname: str
    device_id: str
    module_id: str | None
    query: dict[str, str]


@dataclass(frozen=True, slots=True)
class Telemetry:
    """`devices/{id}[/modules/{mid}]/messages/events/{bag}`: one D2C message."""

    system_properties: dict[str, str]
    properties: dict[str, str]


@dataclass(frozen=True, slots=True)
class TwinGet:
    """`$iothub/twin/GET/?$rid={rid}`: the device asks for its whole twin."""

    rid: str


@dataclass(frozen=True, slots=True)
class TwinReportedPatch:
    """`$iothub/twin/PATCH/properties/reported/?$rid={rid}`: the body patches reported properties."""

    rid: str


@dataclass(frozen=True, slots=True)
class MethodResponse:
    """`$iothub/methods/res/{status}/?$rid={rid}`: the device answers a direct method."""

    status: int
    rid: str


PublishTarget = Telemetry | TwinGet | TwinReportedPatch | MethodResponse

SubscriptionKind = Literal["c2d", "inputs", "twin-responses", "desired-patches", "methods"]


# --------------------------------------------------------------------------- property bags


def _parse_pairs(text: str) -> dict[str, str]:
    """`k=v&k2=v2` with percent-decoding; bounded so a hostile topic cannot cost much."""
    if (
        len(text) > MAX_PROPERTY_BAG_BYTES
        or len(text.encode("utf-8", "surrogatepass")) > MAX_PROPERTY_BAG_BYTES
    ):
        raise TopicError("property-bag-too-large")
    pairs: dict[str, str] = {}
    if not text:
        return pairs
    entries = [entry for entry in text.split("&") if entry]
    if len(entries) > MAX_PROPERTIES:
        raise TopicError("too-many-properties")
    for entry in entries:
        key, _, value = entry.partition("=")
        key = unquote(key)
        if key:
            pairs[key] = unquote(value)
    return pairs


def parse_property_bag(bag: str) -> tuple[dict[str, str], dict[str, str]]:
    """Split a bag into (system, app) properties; system keys keep their `$.` prefix.

    Lenient like Azure: a key without `=` gets "", empty entries and empty keys are skipped,
    malformed percent-escapes are kept as written, a repeated key keeps its last value.
    """
    system: dict[str, str] = {}
    app: dict[str, str] = {}
    for key, value in _parse_pairs(bag).items():
        (system if key.startswith(_SYSTEM_PREFIX) else app)[key] = value
    return system, app


def _quote(text: str) -> str:
    try:
        return quote(text, safe="")
    except UnicodeEncodeError:  # lone surrogates (e.g. from a JSON "\ud800" escape)
        raise TopicError("invalid-text") from None


def encode_property_bag(system: dict[str, str], app: dict[str, str]) -> str:
    """`k=v&…` as the SDK writes it: system keys in SDK order first, then app keys sorted.

    Everything is percent-encoded with `quote(safe="")` (`$` → `%24`, `/` → `%2F`, `=` → `%3D`), which
    the SDK's split-on-`/`, split-on-`=` parser needs. Raises TopicError("invalid-text") for lone
    surrogates, which no UTF-8 topic can carry.
    """
    rank = {key: index for index, key in enumerate(SYSTEM_PROPERTY_ORDER)}
    ordered = sorted(system.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))
    ordered += sorted(app.items())
    return "&".join(f"{_quote(key)}={_quote(value)}" for key, value in ordered)


# --------------------------------------------------------------------------- CONNECT username


def parse_username(username: str) -> Username:
    """Parse `{host}/{deviceId}[/{moduleId}]/?{query}`; query keys and values are URL-decoded.

    The query starts at the last `/?` (the SDK percent-encodes `/` and `?` inside it, while device
    ids may themselves contain `?`); a username without a query is accepted with an empty one.
    """
    path, sep, query_text = username.rpartition("/?")
    if not sep:
        path, query_text = (username[:-1] if username.endswith("/") else username), ""
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise TopicError("bad-username")
    query = _parse_pairs(query_text)
    return Username(parts[0], parts[1], parts[2] if len(parts) == 3 else None, query)


# --------------------------------------------------------------------------- device publishes


def _base(device_id: str, module_id: str | None) -> str:
    return f"devices/{device_id}/modules/{module_id}" if module_id else f"devices/{device_id}"


def _request_id(query_text: str) -> str:
    rid = _parse_pairs(query_text).get("$rid", "")
    if not rid:
        raise TopicError("missing-rid")
    return rid


def classify_publish(topic: str, device_id: str, module_id: str | None = None) -> PublishTarget:
    """Decide what a device's (or module's) PUBLISH means, or refuse it with TopicError.

    Allowed: its own telemetry topic (with or without `/` and a property bag), twin GET, reported
    patch and direct-method responses. A telemetry topic naming another identity is "other-device"
    or "other-module"; anything else is "forbidden-topic".
    """
    if topic.startswith("devices/"):
        own = _base(device_id, module_id) + "/messages/events"
        if topic.startswith(own) and (len(topic) == len(own) or topic[len(own)] == "/"):
            system, app = parse_property_bag(topic[len(own) + 1 :])
            return Telemetry(system, app)
        named_device, _, rest = topic[len("devices/") :].partition("/")
        if named_device != device_id:
            raise TopicError("other-device")
        named_module = rest[len("modules/") :].partition("/")[0] if rest.startswith("modules/") else None
        if named_module != (module_id or None):
            raise TopicError("other-module")
        raise TopicError("forbidden-topic")
    if topic.startswith(_TWIN_PREFIX):
        path, _, query_text = topic.partition("?")
        path = path.removesuffix("/")
        if path == "$iothub/twin/GET":
            return TwinGet(_request_id(query_text))
        if path == "$iothub/twin/PATCH/properties/reported":
            return TwinReportedPatch(_request_id(query_text))
    elif topic.startswith(_METHOD_RES_PREFIX):
        path, _, query_text = topic.partition("?")
        status_text = path[len(_METHOD_RES_PREFIX) :].removesuffix("/")
        status = unquote(status_text)
        if "/" in status_text or not _STATUS_RE.fullmatch(status):
            raise TopicError("bad-status")
        return MethodResponse(int(status), _request_id(query_text))
    raise TopicError("forbidden-topic")


# --------------------------------------------------------------------------- device subscribes


def classify_subscribe(
    topic_filter: str, device_id: str, module_id: str | None = None
) -> SubscriptionKind | None:
    """Which hub feature a SUBSCRIBE filter turns on, or None when the identity may not use it.

    Accepts the filters the Azure SDKs send: `devices/{id}/messages/devicebound/#` (also with `+`
    for the last level, and `devices/+/…` as the embedded C SDK writes it), modules'
    `devices/{id}/modules/{mid}/inputs/#` (the C SDK: `devices/{id}/modules/{mid}/#`), and
    `$iothub/twin/res/#`,
    `$iothub/twin/PATCH/properties/desired/#`, `$iothub/methods/POST/#` for both.
    """
    if topic_filter == "$iothub/twin/res/#":
        return "twin-responses"
    if topic_filter == "$iothub/twin/PATCH/properties/desired/#":
        return "desired-patches"
    if topic_filter == "$iothub/methods/POST/#":
        return "methods"
    if module_id:
        own = f"devices/{device_id}/modules/{module_id}/"
        if topic_filter in (own + "inputs/#", own + "#"):  # the C SDK subscribes its whole namespace
            return "inputs"
        return None
    for device in (device_id, "+"):  # modules get no C2D
        if topic_filter in (
            f"devices/{device}/messages/devicebound/#",
            f"devices/{device}/messages/devicebound/+",
        ):
            return "c2d"
    return None


def authorize_subscribe(topic_filter: str, device_id: str, module_id: str | None = None) -> bool:
    """True when the identity may subscribe to `topic_filter` (see `classify_subscribe`)."""
    return classify_subscribe(topic_filter, device_id, module_id) is not None


# --------------------------------------------------------------------------- hub publishes


def c2d_topic(device_id: str, system: dict[str, str], app: dict[str, str]) -> str:
    """`devices/{id}/messages/devicebound/{bag}` for a cloud-to-device message."""
    return f"devices/{device_id}/messages/devicebound/{encode_property_bag(system, app)}"


def input_topic(
    device_id: str, module_id: str, input_name: str, system: dict[str, str], app: dict[str, str]
) -> str:
    """`devices/{id}/modules/{mid}/inputs/{input}/{bag}` for a message routed to a module input."""
    bag = encode_property_bag(system, app)
    return f"devices/{device_id}/modules/{module_id}/inputs/{_quote(input_name)}/{bag}"


def twin_response_topic(status: int, rid: str, version: int | None = None) -> str:
    """`$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]` (the SDK strips `$` from the keys)."""
    topic = f"$iothub/twin/res/{int(status)}/?$rid={_quote(rid)}"
    return topic if version is None else f"{topic}&$version={int(version)}"


def desired_patch_topic(version: int) -> str:
    """`$iothub/twin/PATCH/properties/desired/?$version={v}` for a desired-properties update."""
    return f"$iothub/twin/PATCH/properties/desired/?$version={int(version)}"


def method_request_topic(name: str, rid: str) -> str:
    """`$iothub/methods/POST/{name}/?$rid={rid}`; the SDK URL-decodes both parts."""
    return f"$iothub/methods/POST/{_quote(name)}/?$rid={_quote(rid)}"
