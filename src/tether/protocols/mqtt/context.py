"""What an MQTT session plugs into: its byte transport (`Link`) and the hub's shared services
(`MqttContext`, including the protocol-neutral `DeviceHooks`). Split from `session.py`, which keeps
the per-connection state machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tether.config import LimitSettings
from tether.messaging.device_sessions import DeviceHooks, NullDeviceHooks
from tether.messaging.presence import ConnectionRegistry
from tether.messaging.telemetry import TelemetryPipeline
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.security.authenticator import Authenticator

__all__ = ["Link", "MqttContext"]


class Link(Protocol):
    """The byte transport under a session (a TCP/TLS socket or a WebSocket)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...  # flush what was written, then close

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


@dataclass(slots=True)
class MqttContext:
    """Everything a session needs from the hub, shared by all sessions of a hub."""

    hostname: str
    authenticator: Authenticator
    audit: AuditLog
    activity: RegistryService  # touch(): buffered connection state and last activity
    connections: ConnectionRegistry
    telemetry: TelemetryPipeline
    limits: LimitSettings
    hooks: DeviceHooks = field(default_factory=NullDeviceHooks)  # twin, method, subscription traffic
    clock: Callable[[], float] = time.time
    activity_interval_s: float = 30.0  # at most one registry.touch() per device per interval
