"""`ClusterBus`: cross-node signalling for several `tether run` processes over NATS core subjects.

Each service keeps its process-local hooks; the bus listens to them as a *relay* (registry status,
C2D enqueue, twin desired, presence connect/disconnect), forwards what happened to the node that needs
it, and re-fires the same hooks there through the services' `*_from_peer`/`*_elsewhere` entry points,
which never call relays: an event crosses the bus once. Every message also carries its origin node id
and a node ignores its own (the connection is `no_echo` as well).

- disable/delete → broadcast `{p}.ctl.device.{id}.drop` → every node drops the device's connections
  (and bumps its presence epoch, so a connect that is authenticating right now is refused); a module
  delete is the same broadcast with `"module"` → every node runs its module listeners (closes the
  module's connection, forgets its session);
- C2D enqueue / desired patch for a device not connected here → look it up in the presence map →
  `{p}.node.{holder}.c2d|desired` → the holder wakes the device's pump / pushes the patch;
- direct method for an identity not online here → `{p}.rpc.{holder}.method` (request/reply) → the
  holder invokes it locally and answers `{status, payload}`, `{offline}` or `{error}`;
- a registry (device or module) or policy write here → broadcast `{p}.ctl.registry.changed` /
  `{p}.ctl.policies.changed` → the other nodes drop those entries from their authentication caches;
- a connect here → claim the identity in the presence map; the previous holder gets
  `{p}.node.{holder}.takeover` and closes its connection (the newest connection wins).

Presence work runs off the connect path, in `SHARDS` ordered queues keyed by identity, so per-identity
order is kept (claim before release, patches in `$version` order) without one slow KV call holding up
every other device. See docs/decisions/0007-cluster-signalling.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import nats.errors
from nats.aio.client import Client as NATS

from tether.cluster.node import Names, identity_key, resolve_node_id
from tether.cluster.presence import (
    PRESENCE_REFRESH_S,
    PRESENCE_TTL_S,
    Held,
    PresenceMap,
    SessionKV,
    now_ms,
    open_bucket,
)
from tether.config import ConfigError
from tether.errors import GatewayTimeout, NotFound, TetherError
from tether.messaging.methods import MethodResult
from tether.registry.models import Device, DeviceStatus

if TYPE_CHECKING:
    from tether.config import ClusterSettings
    from tether.messaging.c2d import C2DService
    from tether.messaging.device_sessions import DeviceSessions
    from tether.messaging.methods import MethodService
    from tether.messaging.presence import ConnectionRegistry
    from tether.messaging.twins import TwinService
    from tether.registry.modules import ModuleService
    from tether.registry.service import RegistryService
    from tether.security.policies import PolicyService
    from tether.storage.base import ModuleKey

__all__ = ["SHARDS", "ClusterBus"]

log = logging.getLogger("tether.cluster")

SHARDS: Final = 16
MAX_BACKLOG: Final = 50_000  # per shard; beyond it presence work is dropped (the refresher repairs it)
RPC_MARGIN_S: Final = 5.0  # a method request waits the device's response timeout plus this
CLOSE_DRAIN_S: Final = 3.0
CONNECT_DEADLINE_S: Final = 10.0
Key = tuple[str, str | None]
Op = Callable[[], Awaitable[None]]


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _error_from(doc: dict[str, Any]) -> TetherError:
    """The holder node's error, as the same exception class a local call raises."""
    message = str(doc.get("message", "remote method call failed"))
    code = doc.get("code") if isinstance(doc.get("code"), str) else None
    status = doc.get("status")
    if status == 404:
        return NotFound(message, code=code)
    if status == 504:
        return GatewayTimeout(message, code=code)
    error = TetherError(message, code=code)
    if isinstance(status, int):
        error.http_status = status
    return error


class ClusterBus:
    """One per hub process when `cluster.nats_url` is set; see the module docstring."""

    def __init__(self, settings: ClusterSettings, *, node_id: str | None = None) -> None:
        if settings.nats_url is None:
            raise ValueError("cluster.nats_url is not set")
        self.url = settings.nats_url
        self.node_id = node_id or resolve_node_id(settings.node_id)
        self.names = Names(settings.subject_prefix)
        self.stats: dict[str, int] = {"published": 0, "received": 0, "ignored_own": 0, "dropped_ops": 0,
                                      "failed_ops": 0, "rpc_in": 0, "rpc_out": 0}
        self._nc: Any = None
        self._presence: PresenceMap | None = None
        self._sessions: SessionKV | None = None
        self._held: dict[Key, Held] = {}
        self._queues: list[asyncio.Queue[Op]] = []
        self._workers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subs: list[Any] = []
        self._closing = False
        self._connect_error: Exception | None = None
        self._last_drop_warning = 0.0
        self._registry: RegistryService | None = None
        self._modules: ModuleService | None = None
        self._policies: PolicyService | None = None
        self._background: set[asyncio.Task[None]] = set()  # fire-and-forget publications
        self._connections: ConnectionRegistry | None = None
        self._c2d: C2DService | None = None
        self._twins: TwinService | None = None
        self._methods: MethodService | None = None

    # --- wiring ---------------------------------------------------------------------------------
    def attach(self, *, registry: RegistryService, policies: PolicyService, connections: ConnectionRegistry,
               c2d: C2DService, twins: TwinService, methods: MethodService, sessions: DeviceSessions,
               modules: ModuleService | None = None) -> None:
        """Relay the hub's local hooks to the other nodes (called once, by `Hub`)."""
        self._registry, self._connections, self._c2d = registry, connections, c2d
        self._twins, self._methods, self._policies = twins, methods, policies
        registry.add_status_relay(self._on_status)
        registry.add_write_relay(self._on_devices_written)
        if modules is not None:
            self._modules = modules
            modules.add_relay(self._on_module_deleted)
            modules.add_write_relay(self._on_modules_written)
        policies.add_write_relay(self._on_policies_written)
        c2d.add_enqueue_relay(self._on_enqueue)
        twins.add_desired_relay(self._on_desired)
        connections.add_presence_listener(self._on_connect, self._on_disconnect)
        methods.set_remote(self)
        sessions.set_store(self)

    @property
    def started(self) -> bool:
        return self._nc is not None and not self._closing

    async def start(self) -> None:
        """Connect to NATS, open the KV buckets, subscribe this node's subjects, start the workers."""
        nc = NATS()
        try:  # reconnects are retried forever once joined; the first connect has a deadline
            await asyncio.wait_for(nc.connect(
                servers=[self.url], name=f"tether:{self.node_id}", no_echo=True, connect_timeout=5,
                allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=1,
                reconnected_cb=self._on_reconnected, disconnected_cb=self._on_nats_disconnected,
                error_cb=self._on_nats_error,
            ), CONNECT_DEADLINE_S)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            why = self._connect_error or exc
            raise ConfigError(f"invalid setting cluster.nats_url: cannot connect to {_redact(self.url)} "
                              f"within {CONNECT_DEADLINE_S:.0f} s ({why!r})") from None
        self._nc = nc
        try:
            await self._check_unique()
            await self._open_buckets()
            self._subs = [
                await nc.subscribe(self.names.node_wildcard(self.node_id), cb=self._on_notice),
                await nc.subscribe(self.names.method(self.node_id), cb=self._on_method_request),
                await nc.subscribe(self.names.drop_wildcard, cb=self._on_drop),
                await nc.subscribe(self.names.registry_changed, cb=self._on_registry_changed),
                await nc.subscribe(self.names.policies_changed, cb=self._on_policies_changed),
            ]
            await nc.flush()
        except BaseException:
            self._nc = None
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._queues = [asyncio.Queue() for _ in range(SHARDS)]
        self._workers = [asyncio.create_task(self._work(q), name=f"cluster-shard-{i}")
                         for i, q in enumerate(self._queues)]
        self._spawn(self._refresh_forever())
        log.info("cluster node %s joined via %s (subjects %s.*)", self.node_id, _redact(self.url),
                 self.names.prefix)

    async def _check_unique(self) -> None:
        """Refuse to join when a live node already answers for this node id (two processes with the
        same `cluster.node_id` would take each other's traffic)."""
        try:
            await self._nc_or_raise().request(self.names.method(self.node_id),
                                              _dumps({"origin": "", "ping": True}), timeout=2.0)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return
        raise ConfigError(f"invalid setting cluster.node_id: node {self.node_id!r} is already running "
                          "in this cluster; every node needs its own id")

    async def _open_buckets(self) -> None:
        js = self._nc_or_raise().jetstream(timeout=5)
        presence = await open_bucket(js, self.names.presence_bucket, ttl=PRESENCE_TTL_S)
        sessions = await open_bucket(js, self.names.sessions_bucket, ttl=None)
        self._presence = PresenceMap(presence, self.node_id)
        self._sessions = SessionKV(sessions)

    async def close(self) -> None:
        """Finish queued presence work (bounded), then leave NATS."""
        if self._nc is None or self._closing:
            return
        if self._queues:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(q.join() for q in self._queues)), CLOSE_DRAIN_S)
        self._closing = True
        for task in [*self._workers, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._tasks, return_exceptions=True)
        nc, self._nc = self._nc, None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)

    async def delete_storage(self) -> None:
        """Delete this cluster's KV buckets (tests; a cluster that is being taken down for good)."""
        js = self._nc_or_raise().jetstream(timeout=5)
        for bucket in (self.names.presence_bucket, self.names.sessions_bucket):
            with contextlib.suppress(Exception):
                await js.delete_key_value(bucket)

    # --- ordered background work ------------------------------------------------------------------
    def _submit(self, key: str, op: Op) -> None:
        if not self._queues or self._closing:
            return
        queue = self._queues[hash(key) % SHARDS]
        if queue.qsize() >= MAX_BACKLOG:
            self.stats["dropped_ops"] += 1
            now = time.monotonic()
            if now - self._last_drop_warning > 10:
                self._last_drop_warning = now
                log.warning("cluster work backlog full (NATS slow or down?); dropping presence work")
            return
        queue.put_nowait(op)

    async def _work(self, queue: asyncio.Queue[Op]) -> None:
        while True:
            op = await queue.get()
            try:
                await op()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats["failed_ops"] += 1
                log.warning("cluster operation failed: %r", exc)
            finally:
                queue.task_done()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, subject: str, doc: dict[str, Any]) -> None:
        doc["origin"] = self.node_id
        await self._nc_or_raise().publish(subject, _dumps(doc))
        self.stats["published"] += 1

    def _nc_or_raise(self) -> Any:
        if self._nc is None:
            raise RuntimeError("cluster bus not started")
        return self._nc

    def _accept(self, msg: Any) -> dict[str, Any] | None:
        """The message's document, or None for our own echo or a malformed message."""
        try:
            doc = json.loads(msg.data)
        except ValueError:
            log.warning("malformed cluster message on %s", msg.subject)
            return None
        if not isinstance(doc, dict):
            return None
        if doc.get("origin") == self.node_id:
            self.stats["ignored_own"] += 1
            return None
        self.stats["received"] += 1
        return doc

    # --- presence: local connects and disconnects --------------------------------------------------
    def _on_connect(self, device_id: str, module_id: str | None) -> None:
        key = (device_id, module_id)
        previous = self._held.get(key)
        at = now_ms() if previous is None else max(now_ms(), previous.at + 1)
        if previous is not None:
            previous.released = True  # replaced by a newer connection here: its claim is moot
        held = Held(at)
        self._held[key] = held
        self._submit(identity_key(device_id, module_id), lambda: self._claim(key, held, first=True))

    def _on_disconnect(self, device_id: str, module_id: str | None) -> None:
        key = (device_id, module_id)
        held = self._held.pop(key, None)
        if held is None:
            return
        held.released = True
        presence = self._presence
        if presence is not None:
            ikey = identity_key(device_id, module_id)
            self._submit(ikey, lambda: presence.release(ikey, held))

    async def _claim(self, key: Key, held: Held, *, first: bool) -> None:
        presence = self._presence
        if held.released or presence is None:
            return
        device_id, module_id = key
        claim = await presence.claim(identity_key(device_id, module_id), held, first=first)
        if claim.superseded:  # the device connected to another node after connecting here
            if self._held.get(key) is held and self._connections is not None:
                log.info("%s connected to another node meanwhile; closing it here", device_id)
                await self._connections.close_identity(device_id, module_id, "connection-replaced")
            return
        if claim.previous is not None:
            await self._publish(self.names.node(claim.previous, "takeover"),
                                {"device": device_id, "module": module_id, "at": held.at})
        if first and module_id is None and self._c2d is not None:
            # A message queued on another node before this claim was visible may have found no
            # holder to wake: look at the queue once more now that the claim is.
            self._c2d.fire_from_peer(device_id)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_REFRESH_S)
            self.refresh()

    def refresh(self) -> None:
        """Re-claim every identity connected here (keeps entries from expiring; repairs lost work)."""
        for key, held in list(self._held.items()):
            self._submit(identity_key(*key), self._reclaim(key, held))

    def _reclaim(self, key: Key, held: Held) -> Op:
        return lambda: self._claim(key, held, first=False)

    async def _on_reconnected(self) -> None:
        log.info("cluster node %s reconnected to NATS", self.node_id)
        self._spawn(self._rejoin())

    async def _rejoin(self) -> None:
        """After a NATS outage: the buckets may be gone (a NATS without persistent storage), and
        presence work was lost meanwhile; open them again and re-claim every local identity."""
        try:
            await self._open_buckets()
        except Exception as exc:
            log.warning("reopening the cluster buckets failed: %r", exc)
        self.refresh()

    async def _on_nats_disconnected(self) -> None:
        if self._nc is not None and not self._closing:
            log.warning("cluster node %s lost its NATS connection; reconnecting", self.node_id)

    async def _on_nats_error(self, exc: Exception) -> None:
        if self._nc is None:  # still joining: reported once by start()
            self._connect_error = exc
            return
        log.warning("cluster NATS error: %r", exc)

    async def locate(self, device_id: str, module_id: str | None = None) -> str | None:
        """The node holding the identity's connection, None when none does."""
        if self._connections is not None and self._connections.get(device_id, module_id) is not None:
            return self.node_id
        if self._presence is None:
            return None
        return await self._presence.lookup(identity_key(device_id, module_id))

    # --- relays of local events ------------------------------------------------------------------
    async def _on_status(self, device: Device) -> None:
        """Registry relay: a device was disabled or deleted through this node → tell every node."""
        if not self.started:
            return
        try:
            await self._publish(self.names.drop(device.device_id),
                                {"device": device.device_id, "deleted": device.enabled})
        except Exception as exc:
            log.warning("could not broadcast the drop of %s: %r", device.device_id, exc)

    def _on_devices_written(self, device_ids: list[str]) -> None:
        """Registry write relay: other nodes forget their cached copies of these devices."""
        if self.started and device_ids:
            self._spawn_publish(self.names.registry_changed, {"devices": device_ids})

    async def _on_module_deleted(self, device_id: str, module_id: str) -> None:
        """Module relay: a module was deleted through this node → every node closes its connection."""
        if not self.started:
            return
        try:
            await self._publish(self.names.drop(device_id),
                                {"device": device_id, "module": module_id, "deleted": True})
        except Exception as exc:
            log.warning("could not broadcast the delete of module %s/%s: %r", device_id, module_id, exc)

    def _on_modules_written(self, keys: list[ModuleKey]) -> None:
        """Module write relay: other nodes forget their cached copies of these modules."""
        if self.started and keys:
            self._spawn_publish(self.names.registry_changed, {"modules": [list(k) for k in keys]})

    def _on_policies_written(self) -> None:
        """Policy write relay: other nodes forget their cached policies."""
        if self.started:
            self._spawn_publish(self.names.policies_changed, {})

    def _spawn_publish(self, subject: str, doc: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._publish_quietly(subject, doc))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_quietly(self, subject: str, doc: dict[str, Any]) -> None:
        try:
            await self._publish(subject, doc)
        except Exception as exc:  # the other nodes' caches then expire by their TTL instead
            log.warning("could not broadcast a change on %s: %r", subject, exc)

    def _on_enqueue(self, device_id: str) -> None:
        """C2D relay: wake the device's pump on the node holding it (nothing to do if it is here)."""
        if self._connections is not None and self._connections.get(device_id) is not None:
            return
        self._submit(identity_key(device_id, None), lambda: self._forward(device_id, "c2d", {}))

    async def _on_desired(self, device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        """Twin relay (called in `$version` order): push the patch through the identity's node."""
        if self._connections is not None and self._connections.get(device_id, module_id) is not None:
            return
        doc: dict[str, Any] = {"patch": patch} if module_id is None else {"patch": patch, "module": module_id}
        self._submit(identity_key(device_id, module_id),
                     lambda: self._forward(device_id, "desired", doc, module_id))

    async def _forward(self, device_id: str, kind: str, doc: dict[str, Any],
                       module_id: str | None = None) -> None:
        node = await self.locate(device_id, module_id)
        if node is not None and node != self.node_id:
            await self._publish(self.names.node(node, kind), {"device": device_id, **doc})

    # --- what other nodes send -------------------------------------------------------------------
    async def _on_drop(self, msg: Any) -> None:
        doc = self._accept(msg)
        if doc is None or self._registry is None or not isinstance(doc.get("device"), str):
            return
        module_id = doc.get("module")
        if module_id is not None:
            if isinstance(module_id, str) and self._modules is not None:
                await self._modules.deleted_elsewhere(doc["device"], module_id)
            return
        status = DeviceStatus.enabled if doc.get("deleted") else DeviceStatus.disabled
        try:
            device = Device(device_id=doc["device"], status=status)
        except ValueError:
            return
        await self._registry.status_changed_elsewhere(device)

    async def _on_registry_changed(self, msg: Any) -> None:
        doc = self._accept(msg)
        if doc is None:
            return
        devices, modules = doc.get("devices"), doc.get("modules")
        if self._registry is not None and isinstance(devices, list):
            for device_id in devices:
                if isinstance(device_id, str):
                    self._registry.invalidate(device_id)
        if self._modules is not None and isinstance(modules, list):
            for key in modules:
                if isinstance(key, list) and len(key) == 2 and all(isinstance(k, str) for k in key):
                    self._modules.invalidate(key[0], key[1])

    async def _on_policies_changed(self, msg: Any) -> None:
        if self._accept(msg) is not None and self._policies is not None:
            self._policies.invalidate()

    async def _on_notice(self, msg: Any) -> None:
        doc = self._accept(msg)
        device_id = None if doc is None else doc.get("device")
        if doc is None or not isinstance(device_id, str):
            return
        kind = msg.subject.rsplit(".", 1)[-1]
        module_id = doc.get("module") if isinstance(doc.get("module"), str) else None
        if kind == "c2d" and self._c2d is not None:
            self._c2d.fire_from_peer(device_id)
        elif kind == "desired" and self._twins is not None and isinstance(doc.get("patch"), dict):
            await self._twins.notify_from_peer(device_id, module_id, doc["patch"])
        elif kind == "takeover" and self._connections is not None:
            held = self._held.get((device_id, module_id))
            at = doc.get("at")
            if held is not None and isinstance(at, int) and held.at < at:
                await self._connections.close_identity(device_id, module_id, "connection-replaced")

    # --- direct methods (RemoteMethods) -----------------------------------------------------------
    async def invoke(self, device_id: str, module_id: str | None, method_name: str, body: bytes,
                     response_timeout_s: int) -> MethodResult | None:
        """Call the method through the node holding the identity; None when no node has it."""
        try:
            node = await self.locate(device_id, module_id)
        except Exception as exc:  # presence map unreachable: as if the device were offline
            log.warning("presence lookup of %s failed: %r", device_id, exc)
            return None
        if node is None or node == self.node_id:
            return None
        request = _dumps({"origin": self.node_id, "device": device_id, "module": module_id,
                          "method": method_name, "body": body.decode("utf-8"),
                          "timeout": response_timeout_s})
        self.stats["rpc_out"] += 1
        try:
            reply = await self._nc_or_raise().request(self.names.method(node), request,
                                                      timeout=response_timeout_s + RPC_MARGIN_S)
        except nats.errors.NoRespondersError:
            return None  # the holder is gone (its entry is stale): the device is not online
        except nats.errors.TimeoutError:
            raise GatewayTimeout(f"device {device_id} did not answer method {method_name!r} within "
                                 f"{response_timeout_s} s (node {node})", code="GatewayTimeout") from None
        doc = json.loads(reply.data)
        if "status" in doc:
            return MethodResult(int(doc["status"]), doc.get("payload"))
        if doc.get("offline"):
            return None
        raise _error_from(doc.get("error") or {})

    async def _on_method_request(self, msg: Any) -> None:
        doc = self._accept(msg)
        if doc is None or not msg.reply:
            return
        if doc.get("ping"):  # another process checking that this node id is free
            await msg.respond(_dumps({"node": self.node_id}))
            return
        self.stats["rpc_in"] += 1
        self._spawn(self._answer_method(msg, doc))

    async def _answer_method(self, msg: Any, doc: dict[str, Any]) -> None:
        answer: dict[str, Any]
        try:
            if self._methods is None:
                raise RuntimeError("no method service attached")
            result = await self._methods.invoke_local(
                str(doc["device"]), doc.get("module"), str(doc["method"]),
                str(doc.get("body", "null")).encode("utf-8"), int(doc.get("timeout", 30)))
            answer = {"offline": True} if result is None else {"status": result.status,
                                                                 "payload": result.payload}
        except TetherError as exc:
            answer = {"error": {"status": exc.http_status, "code": exc.code, "message": exc.message}}
        except Exception as exc:
            log.exception("remote method call failed")
            answer = {"error": {"status": 500, "code": "InternalError", "message": repr(exc)}}
        with contextlib.suppress(Exception):
            await msg.respond(_dumps(answer))

    # --- shared persistent sessions (SessionStore) -----------------------------------------------
    def remember(self, device_id: str, module_id: str | None, kinds: frozenset[str]) -> None:
        sessions = self._sessions
        if sessions is not None:
            ikey = identity_key(device_id, module_id)
            self._submit(ikey, lambda: sessions.store(ikey, kinds))

    async def recall(self, device_id: str, module_id: str | None) -> frozenset[str]:
        if self._sessions is None:
            return frozenset()
        try:
            return await self._sessions.load(identity_key(device_id, module_id))
        except Exception as exc:
            log.warning("session lookup of %s failed: %r", device_id, exc)
            return frozenset()


def _redact(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}"
