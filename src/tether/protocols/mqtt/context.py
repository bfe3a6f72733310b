"""What an MQTT session plugs into: its byte transport (`Link`), the twin and method features
(`TwinMethodHooks`) and the hub's shared services (`MqttContext`). Split from `session.py`, which keeps
the per-connection state machine."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tether.config import LimitSettings
from tether.messaging.presence import ConnectionHandle, ConnectionRegistry
from tether.messaging.telemetry import TelemetryPipeline
from tether.protocols.mqtt.topics import SubscriptionKind
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.security.authenticator import Authenticator
from tether.security.principal import Principal

__all__ = ["EMPTY_TWIN", "Link", "MqttContext", "NullTwinMethodHooks", "TwinMethodHooks"]

EMPTY_TWIN = b'{"desired":{"$version":1},"reported":{"$version":1}}'


class Link(Protocol):
    """The byte transport under a session (a TCP/TLS socket or a WebSocket)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...  # flush what was written, then close

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class TwinMethodHooks(Protocol):
    """What the twin and direct-method features plug into every MQTT session."""

    async def twin_get(self, principal: Principal) -> tuple[int, bytes]:
        """(status, body) answering `$iothub/twin/GET`."""
        ...

    async def twin_patch_reported(self, principal: Principal, body: bytes) -> tuple[int, bytes, int | None]:
        """(status, body, new reported version) answering a reported-properties patch."""
        ...

    async def method_response(self, principal: Principal, rid: str, status: int, body: bytes) -> None:
        """A device answered the direct method invocation `rid`."""
        ...

    async def subscribed(
        self, principal: Principal, handle: ConnectionHandle, kinds: Sequence[SubscriptionKind]
    ) -> None:
        """The device subscribed (C2D, desired patches, methods, …): start delivering."""
        ...

    # Optional, looked up with getattr: `async def connected(principal, handle, *, clean_session)`
    # runs after CONNACK so a persistent session (clean_session=0) resumes its subscriptions.


class NullTwinMethodHooks:
    """Behaviour of a hub without twin/method services: nothing stored, nothing invoked."""

    async def twin_get(self, principal: Principal) -> tuple[int, bytes]:
        return 200, EMPTY_TWIN

    async def twin_patch_reported(self, principal: Principal, body: bytes) -> tuple[int, bytes, int | None]:
        return 503, b'{"message":"this hub does not store twins"}', None

    async def method_response(self, principal: Principal, rid: str, status: int, body: bytes) -> None:
        return None  # no invocation can be pending

    async def subscribed(
        self, principal: Principal, handle: ConnectionHandle, kinds: Sequence[SubscriptionKind]
    ) -> None:
        return None


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
    hooks: TwinMethodHooks = field(default_factory=NullTwinMethodHooks)
    clock: Callable[[], float] = time.time
    activity_interval_s: float = 30.0  # at most one registry.touch() per device per interval
