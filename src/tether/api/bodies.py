"""Request parsing shared by every handler: bounded body reads, strict JSON, query/header values.

Everything here raises `TetherError` subclasses naming the offending field, and nothing here
touches storage — a request is fully parsed and validated before any handler writes.
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tether.api.context import hub_of
from tether.errors import BadRequest, PayloadTooLarge, RequestTimeout

API_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
BULK_FACTOR = 16  # bulk import bodies may be this many times the normal limit
READ_CHUNK = 65_536


def body_limit(request: web.Request, *, bulk: bool = False) -> int:
    limit = hub_of(request).settings.limits.max_request_body_bytes
    return limit * BULK_FACTOR if bulk else limit


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds {limit} bytes", code="MessageTooLarge", field="body")


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read at most `limit` bytes; refuse early on a declared Content-Length above it. The client must
    keep sending: more than `limits.http_body_timeout_s` without a byte is a 408 (a slow-loris body
    does not hold the connection and the handler forever)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    timeout = hub_of(request).settings.limits.http_body_timeout_s
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await content.read(READ_CHUNK)
        except TimeoutError:
            raise RequestTimeout(f"no request body bytes for {timeout:g} s", field="body") from None
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Strict JSON: no NaN/Infinity; raises ValueError (with a position where there is one) on any bad
    input, absurd nesting included (the decoder's RecursionError would otherwise escape as a 500)."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nests too deeply") from None


def parse_json_object(raw: bytes, *, field: str = "body") -> dict[str, Any]:
    if not raw.strip():
        raise BadRequest("request body must be a JSON object, got an empty body", field=field)
    try:
        value = loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", field=field
        ) from None
    except (ValueError, RecursionError) as exc:  # bad UTF-8, NaN, absurd nesting
        raise BadRequest(f"malformed JSON: {exc}", field=field) from None
    if not isinstance(value, dict):
        raise BadRequest(f"request body must be a JSON object, got {_json_type(value)}", field=field)
    return value


async def read_json_object(request: web.Request) -> dict[str, Any]:
    return parse_json_object(await read_body(request, body_limit(request)))


async def read_optional_json_object(request: web.Request) -> dict[str, Any]:
    """For action endpoints whose body is optional: an empty body means `{}`."""
    raw = await read_body(request, body_limit(request))
    return parse_json_object(raw) if raw.strip() else {}


def parse_ndjson(raw: bytes) -> list[tuple[int, dict[str, Any]]]:
    """JSON lines, one object per line; blank lines are skipped. Returns (line number, object)."""
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            value = loads(line)
        except json.JSONDecodeError as exc:
            raise BadRequest(
                f"line {number}: malformed JSON: {exc.msg} at column {exc.colno}", field=f"line {number}"
            ) from None
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"line {number}: malformed JSON: {exc}", field=f"line {number}") from None
        if not isinstance(value, dict):
            raise BadRequest(
                f"line {number}: expected a JSON object, got {_json_type(value)}", field=f"line {number}"
            )
        records.append((number, value))
    return records


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def check_api_version(request: web.Request) -> None:
    """Azure requires `api-version`; Tether accepts it missing but refuses a malformed one."""
    values = request.query.getall("api-version", [])
    if len(values) > 1:
        raise BadRequest("api-version given more than once", field="api-version")
    if values and not API_VERSION_RE.fullmatch(values[0]):
        raise BadRequest("api-version must look like YYYY-MM-DD or YYYY-MM-DD-preview", field="api-version")


def parse_if_match(value: str | None) -> str | None:
    """`"etag"`, `W/"etag"`, `*` or `"*"` → the bare etag or `*`; absent → None."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not value or '"' in value or "," in value:
        raise BadRequest("If-Match must be one quoted etag or *", field="If-Match")
    return value


def query_int(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", field=name) from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", field=name)
    return value


def query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no", ""):
        return False
    raise BadRequest(f"{name} must be true or false", field=name)


def query_choice(request: web.Request, name: str, choices: tuple[str, ...], *, default: str) -> str:
    value = request.query.get(name, default)
    if value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}", field=name)
    return value


def query_datetime(request: web.Request, name: str) -> datetime | None:
    """ISO 8601; a value without a zone is taken as UTC."""
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 date-time", field=name) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
