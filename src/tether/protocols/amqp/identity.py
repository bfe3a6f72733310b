"""One device identity served by an AMQP connection, as the hub's services see it: its
`ConnectionHandle`.

AMQP carries device-bound traffic on links the device attached, so the handle routes each `send_*`
to the identity's link for it (`devices/{id}/messages/devicebound` for C2D, `…/methods/devicebound`
for method requests, `…/twin` for desired patches); a kind whose link is not attached fails with
`ConnectionError` (or, for a desired patch, is dropped, as Azure does for an offline device).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from tether.messaging.c2d import C2DMessage, C2DOutcome
from tether.security.principal import Principal

__all__ = ["C2DLink", "IdentityHandle", "MethodLink", "TwinLink"]


class Owner(Protocol):
    """The connection serving the identity (`endpoint.AmqpEndpoint`)."""

    protocol: str

    def drop_identity(self, identity: tuple[str, str | None], reason: str) -> None: ...


class C2DLink(Protocol):
    async def deliver(self, message: C2DMessage) -> C2DOutcome: ...


class MethodLink(Protocol):
    def request(self, method_name: str, rid: str, payload: bytes) -> None: ...


class TwinLink(Protocol):
    def push_desired(self, patch: bytes) -> None: ...


class IdentityHandle:
    """The `ConnectionHandle` of one identity on one AMQP connection (see the module docstring)."""

    def __init__(self, endpoint: Owner, principal: Principal) -> None:
        assert principal.device_id is not None
        self.endpoint = endpoint
        self.principal = principal
        self.device_id: str = principal.device_id
        self.module_id = principal.module_id
        self.c2d: C2DLink | None = None
        self.methods: MethodLink | None = None
        self.twin: TwinLink | None = None
        self._closed = asyncio.Event()

    @property
    def protocol(self) -> str:
        return self.endpoint.protocol

    @property
    def family(self) -> str:
        return "amqp"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def close(self, reason: str) -> None:
        self.endpoint.drop_identity((self.device_id, self.module_id), reason)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def mark_closed(self) -> None:
        self._closed.set()

    def send_desired_patch(self, patch: bytes, version: int) -> None:
        if self.twin is not None and not self.closed:
            self.twin.push_desired(patch)

    async def send_method_request(self, method_name: str, rid: str, payload: bytes) -> None:
        if self.methods is None or self.closed:
            raise ConnectionError("no method link is attached")
        self.methods.request(method_name, rid, payload)

    async def send_c2d(self, message: C2DMessage) -> C2DOutcome:
        if self.c2d is None or self.closed:
            raise ConnectionError("no C2D link is attached")
        return await self.c2d.deliver(message)
