"""The one place that renders a REST error, in Azure IoT Hub's shape.

Every error answer — a `TetherError` from a handler, aiohttp's own 404/405/413, an unexpected
exception (500) — carries Azure's body and header:

    iothub-errorcode: DeviceNotFound
    {"Message": "ErrorCode:DeviceNotFound;device 'x' not found",
     "ExceptionMessage": "Tracking ID:3f2a…-TimeStamp:2026-12-01T10:15:00Z",
     "errorCode": "DeviceNotFound", "field": "…"}

What the SDKs read (checked in their sources): Node's `azure-iothub` splits `Message` at `;` and at
`:` (`ErrorCode:{code};{text}`) and maps `DeviceNotFound` to `DeviceNotFoundError`; .NET reads the
code from `Message` (the `ErrorCode:` field, taking the first six characters when numeric, so every
code here is at least six characters) and cross-checks the `iothub-errorcode` header; Python's
`azure-iot-hub` (msrest) keeps the response and maps by status. So the text never contains `;`.
`errorCode` (the code alone) and `field` (the offending input, when known) are Tether additions; a
lower-case `message` is deliberately absent: case-insensitive JSON binders (.NET) would read it into
`Message`.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler

from tether.api.bodies import check_api_version
from tether.errors import TetherError

__all__ = ["ERROR_CODE_HEADER", "error_body", "error_middleware", "error_response"]

log = logging.getLogger("tether.api")

ERROR_CODE_HEADER: Final = "iothub-errorcode"

_HTTP_CODES = {
    400: "ArgumentInvalid",
    401: "IotHubUnauthorizedAccess",
    403: "IotHubUnauthorizedAccess",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    411: "LengthRequired",
    413: "MessageTooLarge",
    415: "UnsupportedMediaType",
    431: "RequestHeaderFieldsTooLarge",
    501: "NotImplemented",
    503: "ServiceUnavailable",
}


def error_body(code: str, text: str, *, field: str | None = None, ref: str | None = None) -> dict[str, Any]:
    """Azure's error document for `code` and a human-readable `text`."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body: dict[str, Any] = {
        "Message": f"ErrorCode:{code};{text.replace(';', ',') or code}",
        "ExceptionMessage": f"Tracking ID:{ref or uuid.uuid4().hex}-TimeStamp:{stamp}",
        "errorCode": code,
    }
    if field is not None:
        body["field"] = field
    return body


def error_response(status: int, code: str, text: str, *, field: str | None = None,
                   headers: dict[str, str] | None = None, ref: str | None = None) -> web.Response:
    return web.json_response(error_body(code, text, field=field, ref=ref), status=status,
                             headers={**(headers or {}), ERROR_CODE_HEADER: code})


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> web.Response:
    status = exc.status
    headers: dict[str, str] = {}
    if status == 404:
        message = f"no route for {request.method} {request.path}"
    elif status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        headers["Allow"] = allowed
        message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
    elif status == 413:
        message = "request body too large"
    else:
        text = exc.text or ""
        message = text if text and not text.startswith(f"{status}:") else exc.reason
    code = _HTTP_CODES.get(status, "ServerError" if status >= 500 else "BadRequest")
    return error_response(status, code, message, field="body" if status == 413 else None, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: validates `api-version`, then renders every failure as above."""
    try:
        check_api_version(request)
        return await handler(request)
    except TetherError as exc:
        return error_response(exc.http_status, exc.code, exc.message, field=exc.field, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            raise
        return _from_http_exception(exc, request)
    except Exception:
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error on %s %s (ref %s)", request.method, request.path, ref)
        return error_response(500, "ServerError", f"internal server error (ref {ref})", ref=ref)
