"""Every 500 (and logged traceback) of the outside test is now a 4xx without a traceback (issue 14,
"Parsers are total"): invalid UTF-8 in device HTTPS headers, invalid UTF-8 in `iothub-app-*` on C2D
send, JSON nested 1,000+ levels in the bulk routes, a NUL (or raw non-ASCII) byte in the request line.
The requests go over real TLS to the listeners `tether run` starts, byte for byte as a hostile client
sends them; `caplog` must not hold a single traceback afterwards. No response carries a version
banner."""

from __future__ import annotations

import json
import logging

import pytest

from hardening.helpers import Served

API = "?api-version=2021-04-12"


def request(method: str, path: str, headers: dict[str, bytes | str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: localhost", b"Connection: close"]
    for name, value in {**headers, "Content-Length": str(len(body))}.items():
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def debug(caplog: pytest.LogCaptureFixture) -> None:
    """Everything Tether and aiohttp log (errors of every other logger are captured anyway)."""
    for name in ("tether", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not logged, [r.getMessage() for r in logged]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def assert_4xx(raw: bytes, status: int = 400) -> dict[str, object]:
    code, headers, body = parse(raw)
    assert code == status, raw[:400]
    assert headers["server"] == "Tether" and "aiohttp" not in raw.decode("latin-1").lower()
    document = json.loads(body)
    assert document["errorCode"] and document["message"]
    return dict(document)


BAD_UTF8 = [b"\xff", b"\xc3(", b"ok\xed\xa0\x80", b"\xe2\x82"]
DEVICE_HEADERS = ["iothub-messageid", "iothub-correlationid", "Content-Type", "iothub-contenttype",
                  "Content-Encoding", "iothub-contentencoding", "iothub-creationtimeutc", "iothub-app-temp",
                  "iothub-userid", "iothub-interface-id", "iothub-to", "iothub-expiry"]


@pytest.mark.parametrize("header", DEVICE_HEADERS)
async def test_invalid_utf8_in_a_device_https_header_is_a_400(served: Served, header: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    debug(caplog)
    token = await served.device("meter")
    for value in BAD_UTF8:
        raw = await served.raw_https(request("POST", f"/devices/meter/messages/events{API}",
                                             {"Authorization": token, header: value}, b"{}"))
        document = assert_4xx(raw)
        assert document["field"] == header
    good = await served.raw_https(request("POST", f"/devices/meter/messages/events{API}",
                                          {"Authorization": token, header: "fine-ü".encode()}, b"{}"))
    assert parse(good)[0] in (204, 400)  # valid UTF-8 is never refused for its encoding
    assert b"not valid UTF-8" not in good
    no_tracebacks(caplog)


async def test_invalid_utf8_in_an_app_property_on_c2d_send_is_a_400(served: Served,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    debug(caplog)
    await served.device("meter")
    owner = await served.owner()
    for name in ("iothub-app-unit", "iothub-messageid", "iothub-correlationid", "Content-Type"):
        raw = await served.raw_https(request("POST", f"/devices/meter/messages/deviceBound{API}",
                                             {"Authorization": owner, name: b"\xff\xfe"}, b"x"))
        assert assert_4xx(raw)["field"] == name
    assert await served.hub.c2d.queue_depth("meter") == 0
    raw = await served.raw_https(request("POST", f"/devices/meter/messages/deviceBound{API}",
                                         {"Authorization": owner, "iothub-app-unit": "°C".encode()}, b"x"))
    assert parse(raw)[0] == 201 and await served.hub.c2d.queue_depth("meter") == 1
    no_tracebacks(caplog)


@pytest.mark.parametrize("depth", [1_000, 1_100, 100_000])
async def test_json_nested_beyond_the_decoder_is_a_400_on_every_bulk_route(
        served: Served, depth: int, caplog: pytest.LogCaptureFixture) -> None:
    debug(caplog)
    owner = await served.owner()
    deep_list = ("[" * depth + "]" * depth).encode()
    deep_object = ('{"a":' * depth + "1" + "}" * depth).encode()
    cases = [
        ("POST", "/devices", deep_list),  # the bulk registry operation: was a RecursionError (500)
        ("POST", "/devices", b"[" + deep_object + b"]"),
        ("POST", "/tether/devices/import", deep_object),
        ("POST", "/tether/devices/import", b'{"deviceId":"x","tags":' + deep_list + b"}"),
        ("PUT", "/devices/deep", b'{"deviceId":"deep","tags":' + deep_object + b"}"),
        ("POST", "/devices/query", b'{"query":"SELECT * FROM devices","x":' + deep_list + b"}"),
    ]
    for method, path, body in cases:
        raw = await served.raw_https(request(method, path + API, {"Authorization": owner,
                                                                  "Content-Type": "application/json"}, body))
        assert_4xx(raw)
    assert await served.hub.registry.find("deep") is None and await served.hub.registry.find("x") is None
    no_tracebacks(caplog)


MALFORMED = [
    b"GET /he\x00lthz HTTP/1.1\r\nHost: localhost\r\n\r\n",  # NUL in the request line
    b"GET /devices/\xff HTTP/1.1\r\nHost: localhost\r\n\r\n",  # raw non-ASCII in the path
    b"GET /healthz?x=\x00 HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-\xff: 1\r\n\r\n",  # not a header token
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n",  # NUL in a header value
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",  # over-long request line
    b"POST /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: x\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a second TLS ClientHello inside TLS
    b"GET /healthz HTTP/9.9\r\n\r\n",
]


@pytest.mark.parametrize("raw", MALFORMED, ids=range(len(MALFORMED)))
async def test_a_malformed_request_is_a_400_without_a_traceback(served: Served, raw: bytes,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    debug(caplog)
    answer = await served.raw_https(raw)
    code, headers, body = parse(answer)
    assert 400 <= code < 500, answer[:300]
    assert headers["server"] == "Tether" and b"aiohttp" not in answer and b"Python/" not in answer
    assert json.loads(body)["errorCode"] == "BadRequest"
    no_tracebacks(caplog)
    await served.hub.audit.flush()
    records = await served.hub.audit.query(limit=10, action_prefix="https.request")
    assert records and records[0].reason == "malformed-request" and records[0].peer


async def test_no_response_carries_a_version_banner(served: Served) -> None:
    owner = await served.owner()
    for raw in (request("GET", "/healthz", {}), request("GET", f"/devices{API}", {}),
                request("GET", f"/devices{API}", {"Authorization": owner}), request("GET", "/nowhere", {}),
                request("GET", "/metrics", {}), request("DELETE", "/healthz", {}),
                b"GET /\x00 HTTP/1.1\r\n\r\n"):
        answer = await served.raw_https(raw)
        _, headers, _ = parse(answer)
        assert headers.get("server") == "Tether", answer[:300]
        assert b"aiohttp" not in answer.lower() and b"python/" not in answer.lower()
