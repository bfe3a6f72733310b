"""One middleware turning every failure into Azure-style JSON: `{"errorCode", "message"[, "field"]}`.

`TetherError` carries its own status and code; aiohttp's routing errors (404/405/413) get JSON
bodies too; anything unexpected is logged with a reference and answered 500 without internals.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tether.api.bodies import check_api_version
from tether.errors import TetherError

log = logging.getLogger("tether.api")

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
}


def error_response(status: int, code: str, message: str, *, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"errorCode": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers)


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
        message = exc.reason
    code = _HTTP_CODES.get(status, "ServerError" if status >= 500 else "BadRequest")
    return error_response(status, code, message, field="body" if status == 413 else None,
                          headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: validates `api-version`, then maps every exception to JSON."""
    try:
        check_api_version(request)
        return await handler(request)
    except TetherError as exc:
        return web.json_response(exc.to_json(), status=exc.http_status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through untouched
            raise
        return _from_http_exception(exc, request)
    except Exception:
        ref = uuid.uuid4().hex[:12]
        log.exception("unhandled error on %s %s (ref %s)", request.method, request.path, ref)
        return error_response(500, "ServerError", f"internal server error (ref {ref})")
