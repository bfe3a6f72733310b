"""What an AMQP endpoint plugs into: its byte transport and the hub's shared services."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tether.config import LimitSettings
from tether.messaging.device_sessions import DeviceHooks
from tether.messaging.presence import ConnectionRegistry
from tether.messaging.telemetry import TelemetryPipeline
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.security.authenticator import Authenticator

from .routes import LinkTable

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["AmqpContext", "Transport"]


class Transport(Protocol):
    """The byte stream under an endpoint (a TLS socket or a WebSocket)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...  # flush what was written, then close

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


@dataclass(slots=True)
class AmqpContext:
    """Everything an endpoint needs from the hub, shared by all AMQP connections of a hub."""

    hostname: str
    authenticator: Authenticator
    audit: AuditLog
    activity: RegistryService  # touch(): connection state and last activity
    connections: ConnectionRegistry
    telemetry: TelemetryPipeline
    limits: LimitSettings
    routes: LinkTable
    hooks: DeviceHooks  # twin, method and subscription traffic (hub.device_sessions)
    hub: Hub
    container_id: str = "tether"
    clock: Callable[[], float] = time.time
    activity_interval_s: float = 30.0
    live: set[Any] = field(default_factory=set)  # open endpoints (closed when the hub stops)
