"""The hub's real `TwinMethodHooks`: what an MQTT session's twin, method and subscription traffic does.

- twin GET → `TwinService.get_for_device`; reported patch → `TwinService.update_reported` (204 with
  the new reported `$version`; refusals keep their HTTP status and carry `{"errorCode","message"}`);
- method responses → `MethodService.response` (the pending service call with that rid, if any);
- subscriptions: methods and desired patches are remembered per identity (Azure keeps an MQTT
  session's subscriptions across reconnects with `clean_session=0`, and the SDK does not subscribe
  again after it reconnects to renew its token); a C2D subscription starts the device's C2D pump.
  `connected(principal, handle, clean_session=…)` is the session's cue after CONNACK (not yet part
  of `TwinMethodHooks`): a clean session forgets the subscriptions, a persistent one restarts C2D;
- desired changes: one `TwinService` desired listener pushes each patch, QoS 0 as Azure does, to the
  device's live MQTT connection when the device subscribed to `$iothub/twin/PATCH/properties/desired/#`;
- with several hub nodes (`sessions`, a `SessionStore` set by the cluster bus) the subscriptions of a
  persistent session are shared, so a device that reconnects to another node (its node died, the load
  balancer moved it) keeps receiving methods, desired patches and C2D without subscribing again.

Module twins are not stored by `TwinService` yet, so modules get the answers of a hub without twins
(`NullTwinMethodHooks`): the empty twin, and 503 for reported patches.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tether.messaging.methods import MethodService
from tether.messaging.presence import ConnectionHandle, ConnectionRegistry
from tether.messaging.twins import TwinService
from tether.protocols.mqtt.c2d_pump import C2DPumps
from tether.protocols.mqtt.context import NullTwinMethodHooks
from tether.protocols.mqtt.session import MqttSession
from tether.protocols.mqtt.topics import SubscriptionKind, desired_patch_topic, method_request_topic
from tether.registry.models import Device
from tether.security.principal import Principal

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["MQTT_METHODS", "HubDeviceHooks", "SessionStore"]

log = logging.getLogger("tether.mqtt.hooks")

Key = tuple[str, str | None]
_KIND_ORDER: tuple[SubscriptionKind, ...] = ("methods", "desired-patches", "c2d")
SESSION_KINDS = frozenset(_KIND_ORDER)


class SessionStore(Protocol):
    """Persistent-session subscriptions shared by the hub nodes (implemented by the cluster bus)."""

    def remember(self, device_id: str, module_id: str | None, kinds: frozenset[str]) -> None:
        """Store the identity's subscription kinds (empty: forget them); fire-and-forget, in order."""
        ...

    async def recall(self, device_id: str, module_id: str | None) -> frozenset[str]:
        """The kinds stored by any node (empty when none or the store is unreachable)."""
        ...


class _MqttMethodChannel:
    """Direct-method requests over MQTT: `$iothub/methods/POST/{name}/?$rid={rid}` on a session."""

    def request_topic(self, method_name: str, rid: str) -> str:
        return method_request_topic(method_name, rid)

    def serves(self, handle: ConnectionHandle) -> bool:
        return isinstance(handle, MqttSession)


MQTT_METHODS = _MqttMethodChannel()


class HubDeviceHooks:
    """`TwinMethodHooks` over the hub's twin, method and C2D services: set `hub.twin_hooks` to one
    before the first MQTT listener starts, and `await close()` when the hub stops."""

    def __init__(
        self,
        hub: Hub,
        *,
        twins: TwinService | None = None,
        methods: MethodService | None = None,
        c2d_pumps: C2DPumps | None = None,
        connections: ConnectionRegistry | None = None,
    ) -> None:
        self.connections = connections or hub.connections
        self.twins = twins or hub.twins
        self.methods = methods or hub.methods
        self.c2d_pumps = c2d_pumps or hub.c2d_pumps
        self._null = NullTwinMethodHooks()
        self._desired: set[Key] = set()  # identities subscribed to desired patches
        self.sessions: SessionStore | None = None  # set by the cluster bus (several hub nodes)
        self._kinds: dict[Key, frozenset[str]] = {}  # what `sessions` holds, for identities seen here
        self.twins.add_desired_listener(self._on_desired)
        hub.registry.add_status_listener(self._on_status)

    # --- TwinMethodHooks ----------------------------------------------------------------------
    async def twin_get(self, principal: Principal) -> tuple[int, bytes]:
        device_id = principal.device_id
        if device_id is None or principal.module_id:
            return await self._null.twin_get(principal)
        return await self.twins.device_get(device_id)

    async def twin_patch_reported(self, principal: Principal, body: bytes) -> tuple[int, bytes, int | None]:
        device_id = principal.device_id
        if device_id is None or principal.module_id:
            return await self._null.twin_patch_reported(principal, body)
        return await self.twins.device_patch_reported(device_id, body)

    async def method_response(self, principal: Principal, rid: str, status: int, body: bytes) -> None:
        if principal.device_id is not None:
            self.methods.response(principal.device_id, principal.module_id, rid, status, body)

    async def subscribed(
        self, principal: Principal, handle: ConnectionHandle, kinds: Sequence[SubscriptionKind]
    ) -> None:
        device_id = principal.device_id
        if device_id is None:
            return
        key = (device_id, principal.module_id)
        if "methods" in kinds:
            self.methods.subscribed(device_id, principal.module_id, MQTT_METHODS)
        if "desired-patches" in kinds:
            self._desired.add(key)
        if "c2d" in kinds:
            await self.c2d_pumps.subscribed(principal, handle, kinds)
        if self.sessions is not None:
            known = self._kinds.get(key, frozenset())
            merged = known | (SESSION_KINDS & set(kinds))
            if merged != known:
                self._kinds[key] = merged
                self.sessions.remember(device_id, principal.module_id, merged)

    async def connected(self, principal: Principal, handle: ConnectionHandle, *, clean_session: bool) -> None:
        """After CONNACK (needs the session to call it; see the module docstring): a clean session
        forgets the identity's subscriptions, a persistent one resumes them (C2D delivery restarts;
        methods and desired patches need nothing, they are looked up per identity)."""
        device_id = principal.device_id
        if device_id is None:
            return
        key = (device_id, principal.module_id)
        if clean_session:
            self.methods.unsubscribed(device_id, principal.module_id)
            self._desired.discard(key)
        await self.c2d_pumps.connected(principal, handle, clean_session=clean_session)
        if self.sessions is None:
            return
        if clean_session:
            self._kinds.pop(key, None)
            self.sessions.remember(device_id, principal.module_id, frozenset())
            return
        stored = await self.sessions.recall(device_id, principal.module_id)
        self._kinds[key] = self._kinds.get(key, frozenset()) | stored
        if stored:  # subscriptions made on another node: resume them on this connection
            await self.subscribed(principal, handle, [k for k in _KIND_ORDER if k in stored])

    # --- desired patches ----------------------------------------------------------------------
    def desired_subscribed(self, device_id: str, module_id: str | None = None) -> bool:
        """Whether the identity subscribed to desired-property patches (diagnostics, tests)."""
        return (device_id, module_id) in self._desired

    async def _on_desired(self, device_id: str, patch: dict[str, Any]) -> None:
        """TwinService listener (runs under the twin's write lock: only a QoS 0 write, no waiting)."""
        if (device_id, None) not in self._desired:
            return
        handle = self.connections.get(device_id)
        if not isinstance(handle, MqttSession) or handle.closed:
            return  # offline: the device reads the whole twin when it connects again
        version = patch.get("$version")
        if not isinstance(version, int):
            log.error("desired patch for %s without $version", device_id)
            return
        body = json.dumps(patch, separators=(",", ":")).encode()
        sent = handle.deliver(desired_patch_topic(version), body, qos=0)
        sent.add_done_callback(_ignore_result)

    # --- lifecycle ----------------------------------------------------------------------------
    async def _on_status(self, device: Device) -> None:
        """A deleted device's session state goes with it (a deleted device is reported enabled;
        a disabled one keeps its subscriptions, as an Azure session survives a disable)."""
        if device.enabled:
            self._desired = {key for key in self._desired if key[0] != device.device_id}
            self.c2d_pumps.forget(device.device_id)
            for key in [key for key in self._kinds if key[0] == device.device_id]:
                del self._kinds[key]
                if self.sessions is not None:
                    self.sessions.remember(key[0], key[1], frozenset())

    async def close(self) -> None:
        """Stop the C2D pumps and fail pending method calls (call when the hub stops)."""
        await asyncio.gather(self.c2d_pumps.close(), self.methods.close(), return_exceptions=True)


def _ignore_result(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()  # a dropped connection is not an error here: mark it retrieved
