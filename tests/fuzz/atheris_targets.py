"""Coverage-guided (atheris/libFuzzer) targets over the parsers that read untrusted bytes.

Each target turns raw fuzzer bytes into the input its parser really receives and runs the same check
(invariants included) as the matching Hypothesis harness; Hypothesis keeps the structured harnesses
(round trips, registry validation on a real database), atheris explores the raw byte space guided by
the branches it reaches in `tether`. Seeds: `tests/fuzz/corpus/<corpus>/*.bin`, shared by both
engines, so a crash input saved there is replayed by every later run of both.

Text decodings follow where each input comes from: MQTT strings are strict UTF-8 (the codec refuses
the rest), HTTP headers and JSON strings can carry lone surrogates (aiohttp decodes headers with
`surrogateescape`, JSON has `\\ud800` escapes), so those targets get them too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import test_fuzz_amqp as amqp
from . import test_fuzz_http as http
from . import test_fuzz_mqtt as mqtt
from . import test_fuzz_rest as rest
from . import test_fuzz_security as security


@dataclass(frozen=True)
class Target:
    name: str
    corpus: str  # directory under tests/fuzz/corpus
    one_input: Callable[[bytes], None]


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def mqtt_codec(data: bytes) -> None:
    """A server-side byte stream, cut into reads of a size the input picks (CONNECT first, as real
    streams must start; other openings are the Hypothesis harness's)."""
    stream = data if data.startswith(b"\x10") else mqtt.CONNECT + data
    mqtt.check_stream((stream, 4096, [1 + len(data) % 61]))


def amqp_frames(data: bytes) -> None:
    """A server-side AMQP byte stream (a protocol header first, as real streams must) cut into reads
    of a size the input picks, then the same bytes to the type and message decoders."""
    amqp.check_stream((amqp.opening(data), [1 + len(data) % 97]))
    amqp.check_decode(data)


def mqtt_topics(data: bytes) -> None:
    """Publish and subscribe topics, their property bags and the CONNECT username."""
    text = data.decode("utf-8", "replace")
    mqtt.check_bag(text)
    mqtt.check_username(text)
    mqtt.check_classify((text, "dev1", None))
    mqtt.check_classify((text, "dev1", "mod1"))
    mqtt.check_subscribe((text, "dev1", None))


def sas_token(data: bytes) -> None:
    security.check_parse_token(_text(data))


def connection_string(data: bytes) -> None:
    security.check_connstr(_text(data))


def query(data: bytes) -> None:
    rest.check_query(_text(data))


def rest_bodies(data: bytes) -> None:
    """Request bodies (JSON object, NDJSON import, If-Match), then the device model on what parses."""
    rest.check_parse_bodies(data)
    try:
        body = rest.parse_json_object(data)
    except rest.BadRequest:
        return
    rest.check_model(body)


def http_headers(data: bytes) -> None:
    """Request header lines as aiohttp hands them over (`surrogateescape`), through the device
    telemetry and the C2D send paths: guard, header → property mapping, stored encodings."""
    headers = http.headers_from_bytes(data)
    http.check_device_headers(headers)
    http.check_c2d_headers(headers)


def _planted_crash(data: bytes) -> None:
    """For the rig's own test: proves a failing check stops the run and saves the input."""
    if data.startswith(b"\x00crash"):
        raise AssertionError("planted crash")


SELFTEST = Target("selftest.crash", "", _planted_crash)

TARGETS = {
    t.name: t
    for t in (
        Target("amqp.frames", "amqp", amqp_frames),
        Target("mqtt.codec", "mqtt", mqtt_codec),
        Target("mqtt.topics", "topics", mqtt_topics),
        Target("sas.token", "sas", sas_token),
        Target("connstr.parse", "connstr", connection_string),
        Target("query.parse", "query", query),
        Target("rest.bodies", "device_json", rest_bodies),
        Target("http.headers", "http_headers", http_headers),
    )
}
