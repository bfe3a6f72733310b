"""One error type for every layer, carrying Azure's error code and the HTTP status it maps to.

Protocol adapters translate it: REST answers `{"errorCode", "message"}` with `http_status`,
MQTT maps it to a CONNACK code or a disconnect, the CLI prints `message`.
"""

from __future__ import annotations


class TetherError(Exception):
    """Base error: `code` is Azure's error code string, `http_status` the REST status."""

    http_status = 500
    default_code = "ServerError"
    headers: dict[str, str] | None = None  # extra response headers, e.g. Retry-After on 429

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.field = field

    def to_json(self) -> dict[str, str]:
        body = {"errorCode": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class BadRequest(TetherError):
    http_status = 400
    default_code = "ArgumentInvalid"


class Unauthorized(TetherError):
    http_status = 401
    default_code = "IotHubUnauthorizedAccess"


class Forbidden(TetherError):
    http_status = 403
    default_code = "IotHubUnauthorizedAccess"


class NotFound(TetherError):
    http_status = 404
    default_code = "DeviceNotFound"


class Conflict(TetherError):
    http_status = 409
    default_code = "DeviceAlreadyExists"


class PreconditionFailed(TetherError):
    http_status = 412
    default_code = "PreconditionFailed"


class RequestTimeout(TetherError):
    """The client stopped sending its request (body) before it was complete."""

    http_status = 408
    default_code = "RequestTimeout"


class PayloadTooLarge(TetherError):
    http_status = 413
    default_code = "MessageTooLarge"


class Throttled(TetherError):
    http_status = 429
    default_code = "ThrottlingException"


class QuotaExceeded(TetherError):
    http_status = 403
    default_code = "DeviceMaximumQueueDepthExceeded"


class GatewayTimeout(TetherError):
    http_status = 504
    default_code = "GatewayTimeout"
