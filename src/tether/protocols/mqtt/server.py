"""Thin asyncio adapter: one `asyncio.Protocol` per socket feeding bytes to an `MqttSession`.

TLS comes from the one TLS layer (`tether.security.tls`), whose transport exposes the client
certificate chain as `peercert_chain`; plain TCP exists for loopback tests and benchmarks only. All
protocol decisions are the session's. Every socket is admitted by the hub's `ConnectionSlots` first
(`tether.security.listener`); a session counts as productive for them once it is authenticated (before
that it may be shed under descriptor pressure). Sockets beyond `limits.max_connections` are closed at
once, and the TLS handshake gets `limits.connect_timeout_s` like the CONNECT that must follow it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509

from tether.observability.metrics import DISCONNECTS, watch_stream
from tether.protocols.mqtt.context import MqttContext
from tether.protocols.mqtt.session import MqttSession
from tether.security.admission import Slot
from tether.security.listener import format_peer, start_listener
from tether.security.tls import TlsContextFactory, start_tls_server

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["MqttProtocol", "context_for", "format_peer", "start_mqtt", "stop_mqtt"]

_CONTEXTS: weakref.WeakKeyDictionary[Any, MqttContext] = weakref.WeakKeyDictionary()


def context_for(hub: Hub) -> MqttContext:
    """The hub's shared MQTT context (TCP, TLS and WebSocket sessions all use it).

    Built once per hub from the services the hub owns (presence, telemetry, device hooks)."""
    ctx = _CONTEXTS.get(hub)
    if ctx is not None:
        return ctx
    settings = hub.settings
    telemetry = hub.telemetry
    watch_stream(hub.stream)
    ctx = MqttContext(
        hostname=settings.hub.hostname,
        authenticator=hub.authenticator,
        audit=hub.audit,
        activity=hub.registry,
        connections=hub.connections,
        telemetry=telemetry,
        limits=settings.limits,
        hooks=hub.device_sessions,
    )
    _CONTEXTS[hub] = ctx
    return ctx


class MqttProtocol(asyncio.Protocol):
    """Socket side of one MQTT connection: admission, then bytes in and out of the session."""

    def __init__(self, ctx: MqttContext, slot: Slot | None = None) -> None:
        self._ctx = ctx
        self._session: MqttSession | None = None
        self._slot = slot  # plain TCP: ours to attach and release (under TLS the TLS layer does)

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports do not subclass asyncio's
        if self._slot is not None:
            self._slot.attach(transport.abort)
        slot: Slot | None = self._slot or transport.get_extra_info("connection_slot")
        if slot is not None:
            slot.established = self._authenticated
        if not self._ctx.connections.admit():
            DISCONNECTS.labels("mqtt", "max-connections").inc()
            transport.abort()
            return

        def chain() -> Sequence[x509.Certificate]:
            return transport.get_extra_info("peercert_chain") or ()

        self._session = MqttSession(
            self._ctx, transport, peer=format_peer(transport.get_extra_info("peername")), peer_chain=chain
        )

    def _authenticated(self) -> bool:
        session = self._session
        return session is not None and session.principal is not None

    def data_received(self, data: bytes) -> None:
        if self._session is not None:
            self._session.data_received(data)

    def eof_received(self) -> bool:
        return False  # no half-open MQTT connections: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is not None:
            self._slot.release()
        session, self._session = self._session, None
        if session is not None:
            session.connection_lost()
            self._ctx.connections.release()


async def start_mqtt(hub: Hub, *, host: str, port: int, tls: bool) -> asyncio.AbstractServer:
    """Listen for MQTT on host:port (TLS via `hub.tls`, created from settings if unset)."""
    ctx = context_for(hub)
    slots = hub.slots

    if not tls:
        return await start_listener("mqtt", lambda slot: MqttProtocol(ctx, slot), host, port, slots=slots)
    factory = getattr(hub, "tls", None)
    if not isinstance(factory, TlsContextFactory):
        s = hub.settings
        factory = TlsContextFactory(s.tls, s.cert_file, s.key_file, s.tls.chain_file)
        hub.tls = factory
    return await start_tls_server(lambda: MqttProtocol(ctx), host, port, factory, slots=slots, name="mqtts",
                                  handshake_timeout=ctx.limits.connect_timeout_s)


async def stop_mqtt(hub: Hub) -> None:
    """Close every live device connection of the hub (listeners are closed by the hub)."""
    await hub.connections.close_all("hub-stopping")
