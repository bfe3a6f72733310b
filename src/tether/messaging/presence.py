"""Which device is connected where in this process, and how many sockets are open.

Azure allows one connection per device (or module) identity: a new connection replaces the old one.
Protocol sessions register here after authentication; the registry closes the replaced connection,
and `drop()` closes a device's connections when it is disabled or deleted. C2D delivery, desired
patches and direct methods find a connected device here and push through its `ConnectionHandle`.
Presence listeners (`add_presence_listener`) let the cluster bus publish this process's part of the
cluster-wide presence map; `close_identity` is how another node's takeover closes a connection here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from tether.messaging.c2d import C2DMessage, C2DOutcome
from tether.registry.models import Device

__all__ = ["ConnectionHandle", "ConnectionRegistry"]

log = logging.getLogger("tether.presence")


class ConnectionHandle(Protocol):
    """One live device connection, whatever the protocol: what the hub's services push through.

    The three `send_*` calls are the device-bound traffic (`messaging.device_sessions` and
    `messaging.c2d_delivery` call them); each protocol renders them its own way — MQTT as PUBLISHes
    on `$iothub/…` and `devices/{id}/messages/devicebound/…` topics, AMQP as transfers on the
    identity's twin, methods and devicebound links. A connection that has no way to carry a kind
    (an AMQP link that is not attached) fails that call with `ConnectionError`."""

    @property
    def protocol(self) -> str:
        """"mqtt", "mqtt-ws", "amqp", "amqp-ws", … (metrics, diagnostics)."""
        ...

    @property
    def family(self) -> str:
        """The protocol whose session state this connection shares: "mqtt" for MQTT over TCP and
        over WebSockets, "amqp" for both AMQP transports. Subscriptions made on one family never
        route traffic to a connection of another (a device that switched protocols subscribes again)."""
        ...

    @property
    def closed(self) -> bool: ...

    async def close(self, reason: str) -> None:
        """Close the connection now (idempotent); `reason` is an audit/metrics slug."""
        ...

    async def wait_closed(self) -> None:
        """Return once the connection has ended (at once if it has)."""
        ...

    def send_desired_patch(self, patch: bytes, version: int) -> None:
        """Push a desired-properties patch (`patch`: its compact JSON, `$version` included; `version`:
        that `$version`). Fire and forget, as Azure sends it (MQTT QoS 0; AMQP: a message without
        correlation id on the twin receiver link). Called under the twin's write lock: never waits,
        never raises; nothing happens on a closed connection."""
        ...

    async def send_method_request(self, method_name: str, rid: str, payload: bytes) -> None:
        """Send a direct-method request; return once written (MQTT QoS 0, as Azure). `rid` is the
        hub's request id the device must echo back (MQTT `$rid`, AMQP `correlation-id`); its answer
        comes back as `DeviceHooks.method_response(principal, rid, status, body)`. Raises
        `ConnectionError` when the connection ended (or cannot carry method requests)."""
        ...

    async def send_c2d(self, message: C2DMessage) -> C2DOutcome:
        """Deliver a locked cloud-to-device message and return how the device settled it (MQTT:
        COMPLETE on PUBACK, or REJECT at once for a message MQTT cannot carry; AMQP: the disposition).
        Raises `ConnectionError` when the connection ends first (the message is then abandoned)."""
        ...


Key = tuple[str, str | None]
IdentityCallback = Callable[[str, str | None], None]


class ConnectionRegistry:
    """Process-local presence: (device id, module id) → the one live connection handle.

    Also admits sockets against `limits.max_connections`, counted across every protocol listener.
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open_sockets = 0
        self._by_device: dict[str, dict[str | None, ConnectionHandle]] = {}
        self._count = 0
        self._epochs: dict[str, int] = {}
        self._module_epochs: dict[Key, int] = {}
        self._on_connect: list[IdentityCallback] = []
        self._on_disconnect: list[IdentityCallback] = []

    # --- socket admission ---------------------------------------------------------------------------
    def admit(self) -> bool:
        """Reserve a socket slot; False when the process is at `max_connections`."""
        if self.open_sockets >= self.max_connections:
            return False
        self.open_sockets += 1
        return True

    def release(self) -> None:
        self.open_sockets = max(0, self.open_sockets - 1)

    # --- presence ----------------------------------------------------------------------------------
    def add_presence_listener(self, on_connect: IdentityCallback, on_disconnect: IdentityCallback) -> None:
        """`on_connect(device_id, module_id)` after an identity registered (also when it replaced its
        own previous connection), `on_disconnect(...)` once it has no connection left in this process.
        Synchronous and called on the connect path: only note or enqueue (the cluster bus does)."""
        self._on_connect.append(on_connect)
        self._on_disconnect.append(on_disconnect)

    def __len__(self) -> int:
        return self._count

    def get(self, device_id: str, module_id: str | None = None) -> ConnectionHandle | None:
        per_device = self._by_device.get(device_id)
        return None if per_device is None else per_device.get(module_id)

    def connected(self) -> list[Key]:
        return [(d, m) for d, mods in self._by_device.items() for m in mods]

    async def register(
        self, device_id: str, module_id: str | None, handle: ConnectionHandle
    ) -> ConnectionHandle | None:
        """Make `handle` the identity's connection; the previous one (returned) is closed first."""
        per_device = self._by_device.setdefault(device_id, {})
        previous = per_device.get(module_id)
        per_device[module_id] = handle
        if previous is None:
            self._count += 1
        elif previous is not handle:
            await _close_quietly(previous, "connection-replaced")
        if self._on_connect:
            _call_each(self._on_connect, device_id, module_id)
        return previous

    def unregister(self, device_id: str, module_id: str | None, handle: ConnectionHandle) -> bool:
        """Forget `handle` if it is still the identity's connection (a replaced one is not);
        True when it was, i.e. the identity is now disconnected."""
        per_device = self._by_device.get(device_id)
        if per_device is None or per_device.get(module_id) is not handle:
            return False
        del per_device[module_id]
        self._count -= 1
        if not per_device:
            del self._by_device[device_id]
        if self._on_disconnect:
            _call_each(self._on_disconnect, device_id, module_id)
        return True

    def epoch(self, device_id: str, module_id: str | None = None) -> int:
        """Bumped by every `drop()` (and, for a module, by `module_deleted`): a session that
        authenticated while its device was being disabled (or its module deleted) sees a changed
        epoch after registering and closes itself."""
        epoch = self._epochs.get(device_id, 0)
        return epoch if module_id is None else epoch + self._module_epochs.get((device_id, module_id), 0)

    async def drop(self, device_id: str, reason: str) -> int:
        """Close every connection of the device and its modules; returns how many were closed."""
        self._epochs[device_id] = self._epochs.get(device_id, 0) + 1
        per_device = self._by_device.get(device_id)
        if not per_device:
            return 0
        handles = list(per_device.values())
        await asyncio.gather(*(_close_quietly(h, reason) for h in handles))
        return len(handles)

    async def close_identity(self, device_id: str, module_id: str | None, reason: str) -> bool:
        """Close the identity's connection in this process (another hub node took it over);
        False when it had none."""
        handle = self.get(device_id, module_id)
        if handle is None:
            return False
        await _close_quietly(handle, reason)
        return True

    async def module_deleted(self, device_id: str, module_id: str) -> None:
        """For `ModuleService.add_listener`: a deleted module's connection is closed at once (and
        one authenticating right now is refused, see `epoch`)."""
        key = (device_id, module_id)
        self._module_epochs[key] = self._module_epochs.get(key, 0) + 1
        await self.close_identity(device_id, module_id, "module-deleted")

    async def close_all(self, reason: str = "hub-stopping") -> None:
        handles = [h for mods in self._by_device.values() for h in mods.values()]
        await asyncio.gather(*(_close_quietly(h, reason) for h in handles))

    def status_listener(self) -> Callable[[Device], Awaitable[None]]:
        """Callback for `RegistryService.add_status_listener`: disabling or deleting a device
        closes its connections at once (a deleted device is still reported as enabled)."""

        async def on_status(device: Device) -> None:
            reason = "device-deleted" if device.enabled else "device-disabled"
            await self.drop(device.device_id, reason)

        return on_status


async def _close_quietly(handle: ConnectionHandle, reason: str) -> None:
    try:
        await handle.close(reason)
    except Exception:  # a broken transport must not stop the others from closing
        log.exception("closing a %s connection failed", handle.protocol)


def _call_each(callbacks: list[IdentityCallback], device_id: str, module_id: str | None) -> None:
    for cb in callbacks:
        try:
            cb(device_id, module_id)
        except Exception:  # a listener's bug must not fail the device's connect or disconnect
            log.exception("presence listener failed for %s", device_id)
