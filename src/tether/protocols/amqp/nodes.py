"""The hub's AMQP nodes: every address a client may attach to, and the handler serving it.

Device addresses (`/devices/{id}/…`) serve only identities the connection holds a credential for;
service addresses (`/messages/…`) need a hub-level token with ServiceConnect; `$cbs` is open to every
connection (it is how a connection gets a credential). The Event Hub-compatible endpoint builds its
table from `DEFAULT_ROUTES` plus its own.
"""

from __future__ import annotations

from typing import Final

from .cbs import CbsReplies, CbsRequests
from .device_links import (
    C2DSender,
    MethodRequestSender,
    MethodResponseReceiver,
    TwinRequestReceiver,
    TwinResponseSender,
)
from .performatives import Role
from .routes import LinkRoute, LinkTable
from .service_links import C2DSendReceiver, FeedbackSender, FileNotificationSender
from .telemetry import TelemetryReceiver

__all__ = ["CBS_ROUTES", "DEFAULT_ROUTES", "DEVICE_ROUTES", "SERVICE_ROUTES", "default_table"]

CBS_ROUTES: Final = (
    LinkRoute(r"\$cbs", Role.RECEIVER, CbsRequests, "cbs"),
    LinkRoute(r"\$cbs", Role.SENDER, CbsReplies, "cbs"),
)

_DEVICE = r"/devices/(?P<device>[^/]+)(?:/modules/(?P<module>[^/]+))?"

DEVICE_ROUTES: Final = (
    LinkRoute(_DEVICE + r"/messages/events", Role.RECEIVER, TelemetryReceiver, "telemetry"),
    LinkRoute(r"/devices/(?P<device>[^/]+)/messages/devicebound", Role.SENDER, C2DSender, "c2d"),
    LinkRoute(_DEVICE + r"/methods/devicebound", Role.SENDER, MethodRequestSender, "method-requests"),
    LinkRoute(_DEVICE + r"/methods/devicebound", Role.RECEIVER, MethodResponseReceiver, "method-responses"),
    LinkRoute(_DEVICE + r"/twin", Role.SENDER, TwinResponseSender, "twin-responses"),
    LinkRoute(_DEVICE + r"/twin", Role.RECEIVER, TwinRequestReceiver, "twin-requests"),
)

SERVICE_ROUTES: Final = (
    LinkRoute(r"/messages/devicebound", Role.RECEIVER, C2DSendReceiver, "c2d-send"),
    LinkRoute(r"/messages/servicebound/feedback", Role.SENDER, FeedbackSender, "feedback"),
    LinkRoute(r"/messages/servicebound/filenotifications", Role.SENDER, FileNotificationSender,
              "file-notifications"),
)

DEFAULT_ROUTES: Final = (*CBS_ROUTES, *DEVICE_ROUTES, *SERVICE_ROUTES)


def default_table() -> LinkTable:
    return LinkTable(DEFAULT_ROUTES)
