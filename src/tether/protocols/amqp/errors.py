"""The one exception of the AMQP core and the error conditions it (and the hub above it) uses.

`ProtocolError` carries the AMQP error condition the connection is closed with (`amqp:decode-error`
for bytes that are not AMQP, `amqp:connection:framing-error` for a broken frame, …) and a short
`reason` slug for audit records and metrics. After one, the connection is broken for good: the
engine only lets the caller send the final `close`.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "DECODE_ERROR",
    "DETACH_FORCED",
    "ERRANT_LINK",
    "FRAME_SIZE_TOO_SMALL",
    "FRAMING_ERROR",
    "HANDLE_IN_USE",
    "ILLEGAL_STATE",
    "INTERNAL_ERROR",
    "INVALID_FIELD",
    "LINK_STOLEN",
    "MESSAGE_SIZE_EXCEEDED",
    "NOT_ALLOWED",
    "NOT_FOUND",
    "NOT_IMPLEMENTED",
    "PRECONDITION_FAILED",
    "RESOURCE_LIMIT_EXCEEDED",
    "THROTTLED",
    "TRANSFER_LIMIT_EXCEEDED",
    "UNATTACHED_HANDLE",
    "UNAUTHORIZED_ACCESS",
    "WINDOW_VIOLATION",
    "ProtocolError",
]

# amqp-error (spec 2.8.15)
INTERNAL_ERROR: Final = "amqp:internal-error"
NOT_FOUND: Final = "amqp:not-found"
UNAUTHORIZED_ACCESS: Final = "amqp:unauthorized-access"
DECODE_ERROR: Final = "amqp:decode-error"
RESOURCE_LIMIT_EXCEEDED: Final = "amqp:resource-limit-exceeded"
NOT_ALLOWED: Final = "amqp:not-allowed"
INVALID_FIELD: Final = "amqp:invalid-field"
NOT_IMPLEMENTED: Final = "amqp:not-implemented"
ILLEGAL_STATE: Final = "amqp:illegal-state"
FRAME_SIZE_TOO_SMALL: Final = "amqp:frame-size-too-small"
PRECONDITION_FAILED: Final = "amqp:precondition-failed"
# connection-error, session-error, link-error
FRAMING_ERROR: Final = "amqp:connection:framing-error"
WINDOW_VIOLATION: Final = "amqp:session:window-violation"
ERRANT_LINK: Final = "amqp:session:errant-link"
HANDLE_IN_USE: Final = "amqp:session:handle-in-use"
UNATTACHED_HANDLE: Final = "amqp:session:unattached-handle"
DETACH_FORCED: Final = "amqp:link:detach-forced"
TRANSFER_LIMIT_EXCEEDED: Final = "amqp:link:transfer-limit-exceeded"
MESSAGE_SIZE_EXCEEDED: Final = "amqp:link:message-size-exceeded"
LINK_STOLEN: Final = "amqp:link:stolen"
# Azure's own (mapped by the Node IoT SDKs' amqp_common_errors.js)
THROTTLED: Final = "com.microsoft:device-container-throttled"


class ProtocolError(Exception):
    """The peer broke AMQP 1.0 (or a limit): close the connection with `condition`.

    `reason` is a slug for audit and metrics (defaults to the condition's last part)."""

    def __init__(self, condition: str, description: str = "", *, reason: str | None = None) -> None:
        super().__init__(f"{condition}: {description}" if description else condition)
        self.condition = condition
        self.description = description
        self.reason = reason or condition.rsplit(":", 1)[-1]
