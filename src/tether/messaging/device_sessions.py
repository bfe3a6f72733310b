"""Device sessions: what a device connection's twin, method and subscription traffic does, whatever
protocol carries it.

A device protocol (MQTT today, AMQP next) authenticates a connection, registers its
`ConnectionHandle` in the `ConnectionRegistry` and from then on reports to the hub's `DeviceHooks`
(`hub.device_sessions`, a `DeviceSessions`); the hub pushes back through the handle's `send_*` calls:

- `connected(principal, handle, persistent=…)` right after the connection is accepted: a persistent
  session (MQTT `clean_session=0`, what every Azure SDK uses) resumes the identity's subscriptions
  when the previous session was persistent too and on the same protocol family — Azure keeps them,
  and the SDK does not subscribe again after it reconnects to renew its token; a non-persistent one
  (MQTT `clean_session=1`, every AMQP connection) starts empty, and its subscriptions are not resumed
  by a later connection nor shared with other hub nodes;
- `subscribed(principal, handle, kinds)` / `unsubscribed(…)`: "methods" makes the identity online for
  `MethodService` (requests go out through `send_method_request`), "desired-patches" has every
  committed desired change pushed (`send_desired_patch`, from one `TwinService` desired listener),
  "c2d" starts the device's `C2DPump` on that connection (`send_c2d`). Other kinds (MQTT's
  "twin-responses", "inputs") need nothing here;
- `twin_get`, `twin_patch_reported` → `TwinService.device_get` / `device_patch_reported` (refusals
  keep their HTTP status and carry `{"errorCode","message"}`); `method_response` →
  `MethodService.response` (the pending service call with that rid, if any);
- with several hub nodes (`set_store`, the cluster bus) the subscriptions of persistent sessions are
  shared, so a device that reconnects to another node (its node died, the load balancer moved it)
  keeps receiving methods, desired patches and C2D without subscribing again.

Module identities are sessions of their own, keyed (device id, module id): their twin traffic goes to
the module twin, desired patches of the module twin go to the module's connection, and methods are
the module's; modules get no C2D (a module's "c2d" subscription starts nothing). Deleting a module (or
its device) ends its sessions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from tether.messaging.c2d_delivery import C2DPumps
from tether.messaging.methods import MethodService
from tether.messaging.presence import ConnectionHandle, ConnectionRegistry
from tether.messaging.twins import TwinService
from tether.registry.models import Device
from tether.registry.modules import ModuleService
from tether.registry.service import RegistryService
from tether.security.principal import Principal

__all__ = [
    "EMPTY_TWIN",
    "SESSION_KINDS",
    "DeviceHooks",
    "DeviceSessions",
    "NullDeviceHooks",
    "SessionKind",
    "SessionStore",
]

log = logging.getLogger("tether.device_sessions")

Key = tuple[str, str | None]
SessionKind = Literal["methods", "desired-patches", "c2d"]
SESSION_KINDS: Final[tuple[SessionKind, ...]] = ("methods", "desired-patches", "c2d")
"""The subscription kinds a session keeps, in the order a resumed session restarts them."""

EMPTY_TWIN: Final = b'{"desired":{"$version":1},"reported":{"$version":1}}'


class SessionStore(Protocol):
    """Persistent-session subscriptions shared by the hub nodes (implemented by the cluster bus)."""

    def remember(self, device_id: str, module_id: str | None, kinds: frozenset[str]) -> None:
        """Store the identity's subscription kinds (empty: forget them); fire-and-forget, in order."""
        ...

    async def recall(self, device_id: str, module_id: str | None) -> frozenset[str]:
        """The kinds stored by any node (empty when none or the store is unreachable)."""
        ...


class DeviceHooks(Protocol):
    """What every device protocol reports about an authenticated connection (see the module
    docstring); `hub.device_sessions` is the hub's implementation."""

    async def twin_get(self, principal: Principal) -> tuple[int, bytes]:
        """(status, body) answering a twin GET."""
        ...

    async def twin_patch_reported(
        self, principal: Principal, body: bytes
    ) -> tuple[int, bytes, int | None]:
        """(status, body, new reported version) answering a reported-properties patch."""
        ...

    async def method_response(self, principal: Principal, rid: str, status: int, body: bytes) -> None:
        """The device answered the direct-method request `rid` (`send_method_request`'s rid)."""
        ...

    async def connected(self, principal: Principal, handle: ConnectionHandle, *, persistent: bool) -> None:
        """The connection was accepted (after CONNACK / once authenticated, before its first
        subscription); `persistent`: it continues the identity's session (MQTT clean_session=0)."""
        ...

    async def subscribed(self, principal: Principal, handle: ConnectionHandle,
                         kinds: Collection[str]) -> None:
        """The identity subscribed to `kinds` on `handle` ("methods", "desired-patches", "c2d", …)."""
        ...

    async def unsubscribed(self, principal: Principal, handle: ConnectionHandle,
                           kinds: Collection[str]) -> None:
        """The identity gave up `kinds` on `handle` (an AMQP link detached)."""
        ...


class NullDeviceHooks:
    """Behaviour of a hub without twin/method services: nothing stored, nothing invoked."""

    async def twin_get(self, principal: Principal) -> tuple[int, bytes]:
        return 200, EMPTY_TWIN

    async def twin_patch_reported(
        self, principal: Principal, body: bytes
    ) -> tuple[int, bytes, int | None]:
        return 503, b'{"message":"this hub does not store twins"}', None

    async def method_response(self, principal: Principal, rid: str, status: int, body: bytes) -> None:
        return None  # no invocation can be pending

    async def connected(self, principal: Principal, handle: ConnectionHandle, *, persistent: bool) -> None:
        return None

    async def subscribed(self, principal: Principal, handle: ConnectionHandle,
                         kinds: Collection[str]) -> None:
        return None

    async def unsubscribed(self, principal: Principal, handle: ConnectionHandle,
                           kinds: Collection[str]) -> None:
        return None


def _identity(principal: Principal) -> Key | None:
    return None if principal.device_id is None else (principal.device_id, principal.module_id)


@dataclass(slots=True)
class _Session:
    family: str  # ConnectionHandle.family of the connections it belongs to
    persistent: bool
    kinds: set[str] = field(default_factory=set)  # ⊆ SESSION_KINDS


class DeviceSessions:
    """`DeviceHooks` over the hub's twin, method and C2D delivery services, built by the hub."""

    def __init__(
        self,
        *,
        connections: ConnectionRegistry,
        twins: TwinService,
        methods: MethodService,
        c2d_pumps: C2DPumps,
        registry: RegistryService,
        modules: ModuleService | None = None,
    ) -> None:
        self.connections = connections
        self.twins = twins
        self.methods = methods
        self.c2d_pumps = c2d_pumps
        self._null = NullDeviceHooks()
        self._sessions: dict[Key, _Session] = {}
        self._store: SessionStore | None = None
        self._shared: dict[Key, frozenset[str]] = {}  # what `_store` holds, for identities seen here
        twins.add_desired_listener(self._on_desired)
        registry.add_status_listener(self._on_status)
        if modules is not None:
            modules.add_listener(self._on_module_deleted)

    def set_store(self, store: SessionStore | None) -> None:
        """Share persistent sessions through `store` (the cluster bus, with several hub nodes)."""
        self._store = store

    def subscriptions(self, device_id: str, module_id: str | None = None) -> frozenset[str]:
        """The identity's session kinds known here (diagnostics, tests)."""
        session = self._sessions.get((device_id, module_id))
        return frozenset() if session is None else frozenset(session.kinds)

    # --- twin and method traffic ----------------------------------------------------------------
    async def twin_get(self, principal: Principal) -> tuple[int, bytes]:
        device_id = principal.device_id
        if device_id is None:
            return await self._null.twin_get(principal)
        return await self.twins.device_get(device_id, principal.module_id)

    async def twin_patch_reported(
        self, principal: Principal, body: bytes
    ) -> tuple[int, bytes, int | None]:
        device_id = principal.device_id
        if device_id is None:
            return await self._null.twin_patch_reported(principal, body)
        return await self.twins.device_patch_reported(device_id, body, principal.module_id)

    async def method_response(self, principal: Principal, rid: str, status: int, body: bytes) -> None:
        if principal.device_id is not None:
            self.methods.response(principal.device_id, principal.module_id, rid, status, body)

    # --- sessions and subscriptions --------------------------------------------------------------
    async def connected(self, principal: Principal, handle: ConnectionHandle, *, persistent: bool) -> None:
        key = _identity(principal)
        if key is None:
            return
        device_id, module_id = key
        session = self._sessions.get(key)
        if (session is not None and persistent and session.persistent
                and session.family == handle.family):
            if "c2d" in session.kinds and module_id is None:  # methods and desired need nothing
                await self.c2d_pumps.start(device_id, handle)
        else:  # a fresh session: nothing carries over
            if session is not None or not persistent:
                self.methods.unsubscribed(device_id, module_id)
            self._sessions[key] = _Session(handle.family, persistent)
        store = self._store
        if store is None:
            return
        if not persistent:
            self._shared.pop(key, None)
            store.remember(device_id, module_id, frozenset())
            return
        stored = await store.recall(device_id, module_id)
        self._shared[key] = self._shared.get(key, frozenset()) | stored
        if stored:  # subscriptions made on another node: resume them on this connection
            await self.subscribed(principal, handle, [k for k in SESSION_KINDS if k in stored])

    async def subscribed(self, principal: Principal, handle: ConnectionHandle,
                         kinds: Collection[str]) -> None:
        key = _identity(principal)
        wanted = [k for k in SESSION_KINDS if k in kinds]
        if key is None or not wanted:
            return
        device_id, module_id = key
        session = self._sessions.get(key)
        if session is None or session.family != handle.family:
            session = self._sessions[key] = _Session(handle.family, persistent=True)
        session.kinds.update(wanted)
        if "methods" in wanted:
            self.methods.subscribed(device_id, module_id, handle.family)
        if "c2d" in wanted and module_id is None:
            await self.c2d_pumps.start(device_id, handle)
        store = self._store
        if store is not None and session.persistent:
            known = self._shared.get(key, frozenset())
            merged = known | frozenset(wanted)
            if merged != known:
                self._shared[key] = merged
                store.remember(device_id, module_id, merged)

    async def unsubscribed(self, principal: Principal, handle: ConnectionHandle,
                           kinds: Collection[str]) -> None:
        key = _identity(principal)
        session = None if key is None else self._sessions.get(key)
        if key is None or session is None or session.family != handle.family:
            return
        device_id, module_id = key
        dropped = [k for k in SESSION_KINDS if k in kinds and k in session.kinds]
        session.kinds.difference_update(dropped)
        if "methods" in dropped:
            self.methods.unsubscribed(device_id, module_id)
        if "c2d" in dropped and module_id is None:
            await self.c2d_pumps.stop(device_id, handle=handle)
        known = self._shared.get(key)
        if self._store is not None and known is not None and known & set(dropped):
            self._shared[key] = known - set(dropped)
            self._store.remember(device_id, module_id, self._shared[key])

    # --- desired patches ------------------------------------------------------------------------
    async def _on_desired(self, device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        """TwinService listener (runs under the twin's write lock: one non-blocking send, no waiting)."""
        session = self._sessions.get((device_id, module_id))
        if session is None or "desired-patches" not in session.kinds:
            return
        handle = self.connections.get(device_id, module_id)
        if handle is None or handle.closed or handle.family != session.family:
            return  # offline: the device reads the whole twin when it connects again
        version = patch.get("$version")
        if not isinstance(version, int):
            log.error("desired patch for %s/%s without $version", device_id, module_id)
            return
        handle.send_desired_patch(json.dumps(patch, separators=(",", ":")).encode(), version)

    # --- lifecycle ----------------------------------------------------------------------------
    async def _on_status(self, device: Device) -> None:
        """A deleted device's sessions go with it (a deleted device is reported enabled; a disabled
        one keeps them, as an Azure session survives a disable)."""
        if not device.enabled:
            return
        for key in [key for key in self._sessions if key[0] == device.device_id]:
            del self._sessions[key]
        for key in [key for key in self._shared if key[0] == device.device_id]:
            del self._shared[key]
            if self._store is not None:
                self._store.remember(key[0], key[1], frozenset())

    async def _on_module_deleted(self, device_id: str, module_id: str) -> None:
        """A deleted module's session goes with it (its connection is closed by the presence
        registry; a module re-created with the same id starts a fresh session)."""
        key = (device_id, module_id)
        self._sessions.pop(key, None)
        self.methods.unsubscribed(device_id, module_id)
        if self._shared.pop(key, None) is not None and self._store is not None:
            self._store.remember(device_id, module_id, frozenset())
