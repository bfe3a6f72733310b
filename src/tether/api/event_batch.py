"""Azure's HTTPS batch telemetry: `POST /devices/{id}/messages/events` with
`Content-Type: application/vnd.microsoft.iothub.json` carries a JSON array of messages, each
`{"body": base64, "properties": {…}}`, and is stored as one event per element.

That is what the device SDKs' `sendEventBatch` over HTTP sends (Node: `iothub-app-`-prefixed property
names, older releases unprefixed; the C SDK adds `"base64Encoded": true` and system properties such as
`iothub-messageid`). Each element's properties come back as header-like pairs, so the device HTTPS
surface maps them exactly as it maps a single message's headers; unprefixed names are application
properties. The whole array is checked before anything is appended: one bad element refuses the batch.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict

from tether.api.bodies import loads
from tether.errors import BadRequest

__all__ = ["BATCH_CONTENT_TYPE", "BatchMessage", "is_batch", "parse_batch"]

BATCH_CONTENT_TYPE: Final = "application/vnd.microsoft.iothub.json"
MAX_PROPERTIES: Final = 100
_HEADER_NAMES: Final = frozenset({"content-type", "content-encoding"})


@dataclass(frozen=True, slots=True)
class BatchMessage:
    body: bytes
    headers: CIMultiDict[str]  # the element's properties as the single-message headers would be


def is_batch(content_type: str | None) -> bool:
    return (content_type or "").split(";", 1)[0].strip().lower() == BATCH_CONTENT_TYPE


def _element(index: int, item: object) -> BatchMessage:
    where = f"body[{index}]"
    if not isinstance(item, dict):
        raise BadRequest(f"{where}: each message must be a JSON object", field=where)
    raw = item.get("body")
    if not isinstance(raw, str):
        raise BadRequest(f"{where}.body: a base64 string is required", field=f"{where}.body")
    if item.get("base64Encoded", True) is False:
        body = raw.encode()
    else:
        try:
            body = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}.body: not base64", field=f"{where}.body") from None
    properties = item.get("properties") or {}
    if not isinstance(properties, dict) or len(properties) > MAX_PROPERTIES:
        raise BadRequest(f"{where}.properties: an object of at most {MAX_PROPERTIES} string values",
                         field=f"{where}.properties")
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in properties.items():
        if not isinstance(value, str) or not name:
            raise BadRequest(f"{where}.properties.{name}: values must be strings",
                             field=f"{where}.properties")
        lowered = name.lower()
        if not lowered.startswith("iothub-") and lowered not in _HEADER_NAMES:
            name = "iothub-app-" + name  # older SDKs send application properties unprefixed
        headers[name] = value
    return BatchMessage(body, headers)


def parse_batch(raw: bytes) -> list[BatchMessage]:
    """The messages of a batch body; 400 naming the element for anything malformed."""
    try:
        value = loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}", field="body") from None
    if not isinstance(value, list) or not value:
        raise BadRequest("a batch is a non-empty JSON array of {body, properties} objects", field="body")
    return [_element(i, item) for i, item in enumerate(value)]
