"""One AMQP connection's hub behaviour; it owns no socket (the adapters in `server` and `websocket`
feed it bytes and give it a `Transport`).

It drives the sans-I/O `AmqpConnection`: answers SASL through the authenticator, routes every attach
through the link table to a `LinkHandler`, hands messages, credit and dispositions to those handlers,
keeps the connection's grants (`ConnectionAuth`) and detaches the links of a grant that expires, and
registers each device identity it serves in `hub.connections` (one connection per identity, as Azure
does). Timers: the protocol header, SASL and open must be done within `limits.connect_timeout_s`, a
credential must be held within four times that, and `tick()` keeps the idle bookkeeping.

Every refusal is audited (`amqp.connect`, `amqp.attach`, `amqp.cbs`, `amqp.protocol`, `amqp.token`,
`amqp.transfer`; the authenticator writes `auth.amqp` / `auth.amqpws`) and ends only what it refuses:
a link, or for a broken frame the connection. Refusals while the connection holds no credential yet
(bad protocol headers, frames before open, SASL exchanges that fail before any credential check,
wrong CBS audiences, attaches, time-outs) go through `Authenticator.refuse`: counted, charged to the
peer's failure budget and audited in aggregate once the peer floods, like MQTT's before CONNACK.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Final

from cryptography import x509

from tether.observability.metrics import AUTH_FAILURES, CONNECTED_DEVICES, DISCONNECTS
from tether.security.principal import AuthRefused, Permission, Principal
from tether.security.throttle import RATE_LIMITED

from . import errors as e
from .addresses import node_path
from .auth import ConnectionAuth, Grant, Scope
from .connection import AmqpConnection, ConnectionConfig
from .context import AmqpContext, Transport
from .errors import ProtocolError
from .events import (
    NEED_DATA,
    ConnectionClosed,
    CreditChanged,
    DeliveryUpdated,
    Event,
    LinkAttached,
    LinkDetached,
    LinkError,
    MessageReceived,
    Opened,
    SaslInitReceived,
)
from .handler import LinkHandler, LinkRefused
from .identity import IdentityHandle
from .links import Link, LinkState
from .message import Message
from .performatives import Error, SaslCode

__all__ = ["AmqpEndpoint"]

log = logging.getLogger("tether.amqp")

AUTH_TIMEOUT_FACTOR: Final = 4.0
Identity = tuple[str, str | None]


class AmqpEndpoint:
    """One client connection (see the module docstring)."""

    def __init__(
        self,
        ctx: AmqpContext,
        transport: Transport,
        *,
        peer: str | None,
        peer_chain: Callable[[], Sequence[x509.Certificate]] = lambda: (),
        surface: str = "amqp",
    ) -> None:
        self.ctx = ctx
        self.transport = transport
        self.peer = peer
        self.surface = surface
        self.protocol = "amqp" if surface == "amqp" else "amqp-ws"
        self.loop = asyncio.get_running_loop()
        limits = ctx.limits
        self.conn = AmqpConnection(ConnectionConfig(
            container_id=ctx.container_id, max_frame_size=limits.amqp_max_frame_bytes,
            idle_time_out_ms=int(limits.amqp_idle_timeout_s * 1000) or None, max_links=limits.amqp_max_links,
            max_pending_bytes=max(1 << 20, 2 * limits.max_d2c_message_bytes + 65_536),
        ))
        self.auth = ConnectionAuth(ctx.authenticator, hostname=ctx.hostname, surface=surface, peer=peer,
                                   peer_chain=peer_chain, clock_skew_s=limits.sas_clock_skew_s,
                                   epoch=ctx.connections.epoch)
        self.peer_chain = peer_chain
        self.cbs_repliers: list[Any] = []
        self.closed_reason: str | None = None
        self._opened = False
        self._closed = asyncio.Event()
        self._handlers: set[LinkHandler] = set()
        self._identities: dict[Identity, IdentityHandle] = {}
        self._identity_links: dict[Identity, set[LinkHandler]] = {}
        self._expiry: dict[Scope, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_timer: asyncio.TimerHandle | None = None
        self._timers: list[asyncio.TimerHandle] = [
            self.loop.call_later(limits.connect_timeout_s, self._on_connect_timeout)]
        ctx.live.add(self)

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    @property
    def authenticated(self) -> bool:
        """The connection holds a credential (SASL PLAIN, a CBS token or an authorized certificate)."""
        return self.auth.any_identity or bool(self._identities)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # --- bytes in and out -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.conn.receive_data(data)
        self._process()

    def connection_lost(self) -> None:
        self.shutdown("peer-closed")

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)
        if self.conn.closed and not self.closed:
            self.shutdown("closed")

    def _process(self) -> None:
        conn = self.conn
        try:
            while not self.closed:
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                self._on_event(event)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self.flush()

    def _on_event(self, event: Event) -> None:
        kind = type(event)
        if kind is MessageReceived:
            assert isinstance(event, MessageReceived)
            handler = event.link.handler
            if isinstance(handler, LinkHandler):
                handler.on_message(event)
        elif kind is CreditChanged or kind is DeliveryUpdated:
            handler = event.link.handler  # type: ignore[union-attr]
            if isinstance(handler, LinkHandler) and handler in self._handlers:
                if isinstance(event, DeliveryUpdated):
                    handler.on_delivery(event)
                else:
                    handler.on_credit()
        elif kind is LinkAttached:
            assert isinstance(event, LinkAttached)
            self._on_attach(event.link)
        elif kind is LinkDetached or kind is LinkError:
            self._on_link_gone(event)  # type: ignore[arg-type]
        elif kind is SaslInitReceived:
            assert isinstance(event, SaslInitReceived)
            self.transport.pause_reading()
            self.spawn(self._sasl(event))
        elif kind is Opened:
            self._on_opened()
        elif kind is ConnectionClosed:
            self.flush()
            self.shutdown("client-close")

    # --- SASL ---------------------------------------------------------------------------------------
    async def _sasl(self, event: SaslInitReceived) -> None:
        code = await self._sasl_outcome(event)
        if self.closed:
            return
        self.conn.sasl_outcome(code)
        self.flush()
        if code != SaslCode.OK:
            self.shutdown("sasl-refused")
            return
        self.transport.resume_reading()
        self._process()

    async def _sasl_outcome(self, event: SaslInitReceived) -> SaslCode:
        mechanism = event.mechanism.upper()
        if mechanism in ("ANONYMOUS", "MSSBCBS"):
            return SaslCode.OK
        if mechanism == "EXTERNAL":
            if self.peer_chain():
                self.auth.sasl_external = True
                return SaslCode.OK
            self._pre_auth_refusal("no-client-certificate")
            return SaslCode.AUTH
        if mechanism != "PLAIN":
            self._pre_auth_refusal("unsupported-mechanism", mechanism=mechanism[:32])
            return SaslCode.AUTH
        parts = (event.initial_response or b"").split(b"\x00")
        if len(parts) != 3:
            self._pre_auth_refusal("bad-sasl-plain")
            return SaslCode.AUTH
        user, password = parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")
        try:
            grant = await self.auth.sasl_plain(user, password)
        except AuthRefused as exc:
            if exc.reason in ("bad-username", "wrong-hub"):
                self._pre_auth_refusal(exc.reason, username=user[:128])
            return SaslCode.SYS_TEMP if exc.reason == RATE_LIMITED else SaslCode.AUTH
        except Exception:
            log.exception("SASL PLAIN authentication failed")
            return SaslCode.SYS
        self._arm_expiry(grant)
        return SaslCode.OK

    def _pre_auth_refusal(self, reason: str, **details: Any) -> None:
        self.audit("amqp.connect", reason, **details)

    # --- open, timers -------------------------------------------------------------------------------
    def _on_opened(self) -> None:
        self._opened = True
        self._cancel_timers()
        deadline = self.ctx.limits.connect_timeout_s * AUTH_TIMEOUT_FACTOR
        self._timers.append(self.loop.call_later(deadline, self._on_auth_timeout))
        self._tick()

    def _on_connect_timeout(self) -> None:
        if not self.closed:
            self._pre_auth_refusal("connect-timeout")
            self.shutdown("connect-timeout")

    def _on_auth_timeout(self) -> None:
        if self.closed or self.auth.any_identity or self._identities:
            return
        self._pre_auth_refusal("auth-timeout")
        self.force_close(e.UNAUTHORIZED_ACCESS, "no credential was presented in time", "auth-timeout")

    def _tick(self) -> None:
        self._tick_timer = None
        if self.closed:
            return
        try:
            due = self.conn.tick(self.loop.time())
        except ProtocolError as exc:
            log.debug("AMQP connection from %s: %s", self.peer, exc)
            self.force_close(exc.condition, exc.description, exc.reason)
            return
        self.flush()
        if due is not None:
            delay = max(0.05, due - self.loop.time())
            self._tick_timer = self.loop.call_later(delay, self._tick)

    def _cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    # --- links --------------------------------------------------------------------------------------
    def _on_attach(self, link: Link) -> None:
        path = node_path(link.address)
        match = self.ctx.routes.match(path, link.role)
        if match is None:
            self.audit("amqp.attach", "unknown-address", address=path[:256])
            self.conn.refuse_link(link, Error(e.NOT_FOUND, f"no node at {path[:256]}"))
            return
        handler = match.route.handler(self, link, match)
        link.handler = handler
        self.spawn(self._open_link(handler))

    async def _open_link(self, handler: LinkHandler) -> None:
        link = handler.link
        try:
            await handler.open()
        except LinkRefused as exc:
            if not exc.details.pop("audited", False):
                self.audit("amqp.attach", exc.reason, address=node_path(link.address)[:256], **exc.details)
            self.conn.refuse_link(link, Error(exc.condition, exc.description))
            self.flush()
            return
        except Exception:
            log.exception("opening AMQP link %s failed", handler.match.name)
            self.conn.refuse_link(link, Error(e.INTERNAL_ERROR, "the link could not be opened"))
            self.flush()
            return
        if self.closed or link.state is not LinkState.ATTACH_RECEIVED:
            handler.on_detach()
            return
        self._handlers.add(handler)
        self.conn.accept_link(link, **handler.attach_options())
        handler.on_attached()
        if link.credit:
            handler.on_credit()  # the peer gave credit before we answered its attach
        self.flush()

    def _on_link_gone(self, event: LinkDetached | LinkError) -> None:
        handler = event.link.handler
        if isinstance(event, LinkError):
            self.audit("amqp.transfer", "message-too-large", address=node_path(event.link.address)[:256])
        if isinstance(handler, LinkHandler):
            self._release(handler)

    def _release(self, handler: LinkHandler) -> None:
        if handler in self._handlers:
            self._handlers.discard(handler)
            for links in self._identity_links.values():
                links.discard(handler)
            try:
                handler.on_detach()
            except Exception:
                log.exception("AMQP link handler cleanup failed")

    def detach(self, handler: LinkHandler, condition: str, description: str) -> None:
        """Detach one of our links with an error (the peer sees `condition`)."""
        self.conn.detach(handler.link, Error(condition, description))
        self._release(handler)
        self.flush()

    # --- authorization for handlers -----------------------------------------------------------------
    async def authorize_device(self, handler: LinkHandler, device_id: str,
                               module_id: str | None) -> Principal:
        """The principal a device link acts as, or `LinkRefused` (unauthorized-access)."""
        epoch = self.ctx.connections.epoch(device_id, module_id)
        target = device_id if module_id is None else f"{device_id}/{module_id}"
        try:
            principal, scope = await self.auth.device(device_id, module_id, self.ctx.clock())
        except AuthRefused as exc:
            audited = exc.reason != "not-authorized"  # the authenticator audited the rest
            reason = exc.reason
            if not audited and self.auth.any_identity:
                reason = self.auth.other_identity(device_id)
            raise LinkRefused(e.UNAUTHORIZED_ACCESS, reason, exc.detail or reason, audited=audited,
                              device=target) from None
        handler.scope = scope
        grant = self.auth.grants.get(scope)
        if grant is not None:
            self._arm_expiry(grant)
        identity = (device_id, module_id)
        await self._register(principal)
        if self.ctx.connections.epoch(device_id, module_id) != epoch:  # disabled or deleted meanwhile
            self.drop_identity(identity, "device-disabled")
            raise LinkRefused(e.UNAUTHORIZED_ACCESS, "device-disabled", "the identity is disabled or gone",
                              device=target)
        self._identity_links.setdefault(identity, set()).add(handler)
        return principal

    def identity(self, principal: Principal) -> IdentityHandle:
        """The handle of an identity `authorize_device` registered."""
        return self._identities[(principal.device_id or "", principal.module_id)]

    def authorize_service(self, handler: LinkHandler, permission: Permission) -> Principal:
        try:
            principal, scope = self.auth.service(permission, self.ctx.clock())
        except AuthRefused as exc:
            raise LinkRefused(e.UNAUTHORIZED_ACCESS, exc.reason, exc.detail,
                              permission=permission.value) from None
        handler.scope = scope
        return principal

    async def put_token(self, token: str, audience: str) -> Grant:
        """CBS put-token (see `cbs`); audited by the authenticator, wrong audiences here."""
        try:
            scope = self.auth.audience_check(audience)
        except AuthRefused as exc:
            self.audit("amqp.cbs", exc.reason, auth_failure=True, audience=audience[:256])
            raise
        grant = await self.auth.put_token(token, scope)
        self._arm_expiry(grant)
        return grant

    def _arm_expiry(self, grant: Grant) -> None:
        old = self._expiry.pop(grant.scope, None)
        if old is not None:
            old.cancel()
        if grant.expires_at is not None and not self.closed:
            delay = max(0.0, grant.expires_at - self.ctx.clock())
            self._expiry[grant.scope] = self.loop.call_later(delay, self._expire, grant)

    def _expire(self, grant: Grant) -> None:
        self._expiry.pop(grant.scope, None)
        if self.closed or not self.auth.expire(grant.scope, grant):
            return
        doomed = [h for h in self._handlers if h.scope == grant.scope]
        if doomed:
            self.audit("amqp.token", "token-expired", principal=grant.principal.name, links=len(doomed))
        for handler in doomed:
            self.detach(handler, e.UNAUTHORIZED_ACCESS, "the token for this link expired")

    # --- presence -----------------------------------------------------------------------------------
    async def _register(self, principal: Principal) -> None:
        identity = (principal.device_id or "", principal.module_id)
        if identity in self._identities:
            return
        handle = IdentityHandle(self, principal)
        self._identities[identity] = handle
        CONNECTED_DEVICES.labels(self.protocol).inc()
        await self.ctx.connections.register(identity[0], identity[1], handle)
        self.spawn(self.ctx.activity.touch(identity[0], identity[1], connected=True))
        # every AMQP connection starts a fresh session: links subscribe again when they attach
        await self.ctx.hooks.connected(principal, handle, persistent=False)

    def drop_identity(self, identity: Identity, reason: str) -> None:
        """Another connection took the identity over, or the device was disabled or deleted."""
        if reason == "hub-stopping":
            self.force_close("amqp:connection:forced", "the hub is stopping", reason)
            return
        condition = e.LINK_STOLEN if reason == "connection-replaced" else e.UNAUTHORIZED_ACCESS
        for handler in list(self._identity_links.pop(identity, ())):
            self.detach(handler, condition, reason)
        self._unregister(identity, reason)

    def _unregister(self, identity: Identity, reason: str) -> None:
        handle = self._identities.pop(identity, None)
        if handle is None:
            return
        handle.mark_closed()
        CONNECTED_DEVICES.labels(self.protocol).dec()
        still_ours = self.ctx.connections.unregister(identity[0], identity[1], handle)
        if still_ours and reason != "connection-replaced":
            self.spawn(self.ctx.activity.touch(identity[0], identity[1], connected=False))

    # --- sending for handlers -----------------------------------------------------------------------
    def send_transfer(self, link: Link, payload: bytes, *, settled: bool) -> int:
        delivery_id = self.conn.send_transfer(link, payload, settled=settled)
        self._schedule_flush()
        return delivery_id

    def settle(self, link: Link, delivery_ids: Iterable[int], state: Any) -> None:
        self.conn.settle(link, delivery_ids, state)
        self._schedule_flush()

    def send_message(self, link: Link, message: Message, *, settled: bool) -> int:
        return self.send_transfer(link, message.encode(), settled=settled)

    _flush_scheduled = False

    def _schedule_flush(self) -> None:
        """Sends and settlements made while handling one read leave in one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if not self.closed:
            self.flush()

    # --- refusals and shutdown ----------------------------------------------------------------------
    def audit(self, action: str, reason: str, *, auth_failure: bool = False, **details: Any) -> None:
        """Audit a refusal. Before the connection holds a credential it goes through
        `Authenticator.refuse` (counted as an authentication failure, charged to the peer's budget,
        aggregated once the peer floods); after, it is recorded as it is (`auth_failure`: counted too)."""
        principal = details.pop("principal", None)
        device = details.pop("device", None)
        details["surface"] = self.surface
        if not self.authenticated:
            self.spawn(self.ctx.authenticator.refuse(action, reason, surface=self.surface, peer=self.peer,
                                                     principal=principal, target=device, details=details))
            return
        if auth_failure:
            AUTH_FAILURES.labels(self.surface, reason).inc()
        self.spawn(self.ctx.audit.record(action, "refused", reason=reason, peer=self.peer,
                                         principal=principal, target=device, details=details))

    def _protocol_error(self, exc: ProtocolError) -> None:
        # garbage before the open exchange (a bad protocol header, a broken SASL frame) is a failed
        # connection attempt, like MQTT's before CONNECT; later a broken frame of an open connection
        self.audit("amqp.protocol" if self._opened else "amqp.connect", exc.reason, condition=exc.condition)
        self.force_close(exc.condition, exc.description[:200], exc.reason)

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("AMQP endpoint task failed", exc_info=task.exception())

    def force_close(self, condition: str, description: str, reason: str) -> None:
        """Close the connection with an error the peer sees."""
        if not self.closed:
            self.conn.close(Error(condition, description))
            self.flush()
            self.shutdown(reason)

    def shutdown(self, reason: str) -> None:
        """Close now (idempotent)."""
        if self.closed:
            return
        self.closed_reason = reason
        self._cancel_timers()
        if self._tick_timer is not None:
            self._tick_timer.cancel()
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()
        for handler in list(self._handlers):
            self._release(handler)
        for identity in list(self._identities):
            self._unregister(identity, reason)
        self.transport.close()
        self.ctx.live.discard(self)
        DISCONNECTS.labels(self.protocol, reason).inc()
        log.debug("AMQP connection from %s closed: %s", self.peer, reason)
        self._closed.set()
