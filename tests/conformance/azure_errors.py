"""What an SDK reads from a Tether error, checked the way the SDKs parse it (see their sources):

- Node (`azure-iot-http-base` `parseErrorBody`): `JSON.parse(body).Message.split(';')`; the code is
  after `ErrorCode:` in the first part, the message is the second part; both must be non-empty, and a
  `DeviceNotFound` code on a 404 becomes `DeviceNotFoundError`.
- .NET (`ExceptionHandlingHelper`): the `ErrorCode:` field of `Message` (its first six characters when
  numeric: every code must have at least six) cross-checked with the `iothub-errorcode` header.
- Python `azure-iot-hub` (msrest): the HTTP status; the response is kept on the exception.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


def node_parse(body: str) -> tuple[str, str] | None:
    """Node's parseErrorBody, transcribed: (code, message) or None."""
    try:
        parts = json.loads(body)["Message"].split(";")
        code, message = parts[0].split(":")[1], parts[1]
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        return None
    return (code, message) if code and message else None


def assert_azure_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body: dict[str, Any] = r.json()
    header = r.headers.get("iothub-errorcode")
    parsed = node_parse(r.text)
    assert parsed is not None, f"Node's parser cannot read {r.text}"
    assert header == parsed[0] == body["errorCode"], (header, parsed, body)
    assert len(header) >= 6, f".NET reads the first six characters of {header!r}"
    assert isinstance(body.get("ExceptionMessage"), str) and body["ExceptionMessage"]
    assert "message" not in body, "a lower-case `message` would shadow `Message` in case-insensitive binders"
    if code is not None:
        assert header == code, (header, code, r.text)
    return body
