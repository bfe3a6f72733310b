"""Fuzz harnesses for the HTTP header and message-property paths (registered in `tests/fuzz/run.py`).

What reaches them is whatever a client put in its request headers, as aiohttp hands them over: header
bytes decoded with `surrogateescape`, so undecodable bytes become lone surrogates (the outside test's
500s: `UnicodeEncodeError` in property building). Two paths, each run exactly as the routes run them:

* device telemetry (`POST /devices/{id}/messages/events`): the request guard
  (`api.server.undecodable_header`), `iothub-*` headers → system properties, `iothub-app-*` →
  application properties, then the event's properties as the stream stores them
  (`messaging.telemetry.build_properties`);
* C2D send (`POST /devices/{id}/messages/deviceBound`): TTL / expiry, ack, ids, content type and
  encoding, application properties (`messaging.c2d` checks), then the MQTT topic property bag the
  device receives them in.

Invariants: a header value that is not UTF-8 is refused by the guard; hostile input only ever raises
`BadRequest` (a 400); what is accepted encodes as UTF-8, its system-property JSON parses back to the
same properties, and C2D application properties survive the MQTT property bag round trip.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import strategies as st
from multidict import CIMultiDict

from tether.api.c2d_routes import APP_PREFIX, _ttl_from_headers, app_properties
from tether.api.device_routes import _system_properties
from tether.api.server import undecodable_header
from tether.errors import BadRequest
from tether.messaging.c2d import ACK_MODES, MESSAGE_ID_RE, _check_properties, _check_text
from tether.messaging.telemetry import build_properties
from tether.protocols.mqtt.topics import TopicError, c2d_topic, parse_property_bag
from tether.security.principal import CredentialKind, Permission, Principal, PrincipalKind

from .harness import Harness, corpus, fuzz_examples

NOW = 1_800_000_000.0
PRINCIPAL = Principal(PrincipalKind.device, CredentialKind.device_key, device_id="meter",
                      permissions=frozenset({Permission.device_connect}))
HEADER_SEEDS = [data for _, data in corpus("http_headers")]
KNOWN = ["iothub-messageid", "iothub-correlationid", "iothub-userid", "iothub-to", "iothub-contenttype",
         "iothub-content-type", "Content-Type", "iothub-contentencoding", "Content-Encoding",
         "iothub-creationtimeutc", "iothub-expiry", "iothub-ttl", "iothub-ack", "iothub-interface-id"]
TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"


def headers_from_bytes(data: bytes) -> CIMultiDict[str]:
    """`Name: value` lines as aiohttp's parser would hand them over (values `surrogateescape`-decoded;
    names that are not HTTP tokens would not parse at all, so they are dropped here too)."""
    headers: CIMultiDict[str] = CIMultiDict()
    for line in data.split(b"\n"):
        name, sep, value = line.partition(b":")
        text = name.decode("latin-1").strip()
        if sep and text and all(c in TOKEN for c in text):
            headers.add(text, value.strip(b" \t\r").decode("utf-8", "surrogateescape"))
    return headers


def _encodable(*texts: str) -> None:
    for text in texts:
        text.encode("utf-8")  # raises on a lone surrogate: that would have been a 500


def check_device_headers(headers: CIMultiDict[str]) -> None:
    """The guard refuses undecodable values with a 400 before the handler runs; the mapping below must
    hold up without it too (defence in depth, and other callers: AMQP annotations, future routes)."""
    bad = undecodable_header(headers)
    if bad is not None:
        assert any(0xD800 <= ord(c) <= 0xDFFF for value in headers.getall(bad) for c in value)
    try:
        system = _system_properties(headers)
        app = app_properties(headers)
        stored_app, stored_system = build_properties(PRINCIPAL, system, app, now=NOW)
    except BadRequest as exc:
        assert exc.http_status == 400 and exc.message
        return
    for key, value in stored_app.items():
        _encodable(key, value)
    encoded = stored_system.encoded
    assert encoded is not None
    assert json.loads(encoded) == dict(stored_system)


def check_c2d_headers(headers: CIMultiDict[str]) -> None:
    try:
        _ttl_from_headers(headers, NOW)
        ack = (headers.get("iothub-ack") or "none").lower()
        if ack not in ACK_MODES:
            raise BadRequest("ack", field="ack")
        message_id = headers.get("iothub-messageid") or None
        if message_id is not None and not MESSAGE_ID_RE.fullmatch(message_id):
            raise BadRequest("messageId", field="messageId")
        texts = [_check_text(headers.get("iothub-correlationid") or None, "correlationId"),
                 _check_text(headers.get("iothub-userid") or None, "userId"),
                 _check_text(headers.get("iothub-contenttype") or headers.get("Content-Type") or None,
                             "contentType"),
                 _check_text(headers.get("iothub-contentencoding") or headers.get("Content-Encoding") or None,
                             "contentEncoding", 64)]
        properties = _check_properties(app_properties(headers))
    except BadRequest as exc:
        assert exc.http_status == 400 and exc.message
        return
    _encodable(*(t for t in texts if t), *properties, *properties.values())
    try:
        topic = c2d_topic("meter", {}, properties)
    except TopicError:
        return  # the pump rejects such a message at delivery (logged), never a 500 at send
    _encodable(topic)
    assert parse_property_bag(topic.split("/", 4)[4])[1] == properties


# --------------------------------------------------------------------------- strategies

raw_values = st.one_of(
    st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.text(max_size=40),
    st.sampled_from(["\udcff", "ok\udced\udca0\udc80", "°C", "2030-01-01T00:00:00Z", "1e309", "nan", "-1",
                     "positive", "FULL", "", " ", "a" * 300, "\x7f", "x\ty", "%00"]),
)
names = st.one_of(st.sampled_from(KNOWN), st.text(st.sampled_from(TOKEN), min_size=1, max_size=10).map(
    lambda n: APP_PREFIX + n), st.sampled_from([APP_PREFIX, APP_PREFIX + "$.mid", APP_PREFIX + "iothub-x",
                                                "IOTHUB-APP-Mixed", "iothub-app-a b"]))
header_sets = st.lists(st.tuples(names, raw_values), max_size=12).map(CIMultiDict)
byte_headers = st.one_of(st.binary(max_size=300), st.sampled_from(HEADER_SEEDS)).map(headers_from_bytes)
any_headers: st.SearchStrategy[Any] = st.one_of(header_sets, byte_headers)

HARNESSES = [
    Harness("http.device_headers", any_headers, check_device_headers,
            seeds=[headers_from_bytes(s) for s in HEADER_SEEDS]),
    Harness("http.c2d_headers", any_headers, check_c2d_headers,
            seeds=[headers_from_bytes(s) for s in HEADER_SEEDS]),
]


@pytest.mark.parametrize("harness", HARNESSES, ids=[h.name for h in HARNESSES])
def test_harness_never_crashes(harness: Harness) -> None:
    assert harness.run(fuzz_examples()) >= len(harness.seeds)


def test_corpus_is_present() -> None:
    assert len(HEADER_SEEDS) >= 3


@pytest.mark.parametrize("value", ["\udcff", "a\udcc3(", "\ud800"])
def test_regression_a_lone_surrogate_in_a_property_is_a_400_not_a_500(value: str) -> None:
    """The outside test's 500s, below the request guard too: property building and the C2D checks
    refuse text they could not encode, with a 400."""
    with pytest.raises(BadRequest):
        build_properties(PRINCIPAL, {"$.mid": value}, {}, now=NOW)
    with pytest.raises(BadRequest):
        build_properties(PRINCIPAL, {}, {"unit": value}, now=NOW)
    with pytest.raises(BadRequest):
        _check_properties({"unit": value})
