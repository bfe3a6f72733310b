"""Thin asyncio adapter: AMQP 1.0 over TLS (`listeners.amqp_port`, 5671), one `AmqpEndpoint` per socket.

TLS comes from the one TLS layer (`tether.security.tls`, same policy and client-certificate handling
as MQTT and HTTPS); plain TCP exists for loopback tests only. Every socket is admitted by the hub's
`ConnectionSlots` first, on `tether.security.listener`'s accept loop (EMFILE back-off); a connection
counts as productive for them once it holds a credential (before that it may be shed under descriptor
pressure). Sockets beyond `limits.max_connections` (counted by `hub.connections` across every
listener) are closed at once, and the TLS handshake gets `limits.connect_timeout_s`, like the protocol
header and open that must follow it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509

from tether.observability.metrics import DISCONNECTS, watch_stream
from tether.security.admission import Slot
from tether.security.listener import format_peer, start_listener
from tether.security.tls import TlsContextFactory, start_tls_server

from .context import AmqpContext
from .endpoint import AmqpEndpoint
from .nodes import default_table
from .routes import LinkTable

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["AmqpProtocol", "context_for", "start_amqp", "stop_amqp"]

_CONTEXTS: weakref.WeakKeyDictionary[Any, AmqpContext] = weakref.WeakKeyDictionary()


def context_for(hub: Hub, routes: LinkTable | None = None) -> AmqpContext:
    """The hub's shared AMQP context (TLS and WebSocket endpoints use it), built once per hub."""
    ctx = _CONTEXTS.get(hub)
    if ctx is not None:
        return ctx
    settings = hub.settings
    watch_stream(hub.stream)
    ctx = AmqpContext(
        hostname=settings.hub.hostname,
        authenticator=hub.authenticator,
        audit=hub.audit,
        activity=hub.registry,
        connections=hub.connections,
        telemetry=hub.telemetry,
        limits=settings.limits,
        routes=routes or default_table(),
        hooks=hub.device_sessions,
        hub=hub,
        container_id=f"tether-{hub.node_id}",
    )
    _CONTEXTS[hub] = ctx
    return ctx


class _SocketTransport:
    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._transport.close()

    def pause_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()


class AmqpProtocol(asyncio.Protocol):
    """Socket side of one AMQP connection: admission, then bytes in and out of the endpoint."""

    def __init__(self, ctx: AmqpContext, slot: Slot | None = None) -> None:
        self._ctx = ctx
        self._endpoint: AmqpEndpoint | None = None
        self._slot = slot  # plain TCP: ours to attach and release (under TLS the TLS layer does)

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        if self._slot is not None:
            self._slot.attach(transport.abort)
        slot: Slot | None = self._slot or transport.get_extra_info("connection_slot")
        if slot is not None:
            slot.established = self._authenticated
        if not self._ctx.connections.admit():
            DISCONNECTS.labels("amqp", "max-connections").inc()
            transport.abort()
            return

        def chain() -> Sequence[x509.Certificate]:
            return transport.get_extra_info("peercert_chain") or ()

        peer = format_peer(transport.get_extra_info("peername"))
        self._endpoint = AmqpEndpoint(self._ctx, _SocketTransport(transport), peer=peer, peer_chain=chain)

    def _authenticated(self) -> bool:
        endpoint = self._endpoint
        return endpoint is not None and endpoint.authenticated

    def data_received(self, data: bytes) -> None:
        if self._endpoint is not None:
            self._endpoint.data_received(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is not None:
            self._slot.release()
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.connection_lost()
            self._ctx.connections.release()


async def start_amqp(hub: Hub, *, host: str, port: int, tls: bool = True) -> asyncio.AbstractServer:
    """Listen for AMQP on host:port (TLS via `hub.tls`, created from settings if unset)."""
    ctx = context_for(hub)
    slots = hub.slots

    if not tls:
        return await start_listener("amqp", lambda slot: AmqpProtocol(ctx, slot), host, port, slots=slots)
    factory = getattr(hub, "tls", None)
    if not isinstance(factory, TlsContextFactory):
        s = hub.settings
        factory = TlsContextFactory(s.tls, s.cert_file, s.key_file, s.tls.chain_file)
        hub.tls = factory
    return await start_tls_server(lambda: AmqpProtocol(ctx), host, port, factory, slots=slots, name="amqps",
                                  handshake_timeout=ctx.limits.connect_timeout_s)


async def stop_amqp(hub: Hub) -> None:
    """Close every open AMQP connection of the hub (identities or not)."""
    ctx = _CONTEXTS.get(hub)
    if ctx is not None:
        for endpoint in list(ctx.live):
            endpoint.force_close("amqp:connection:forced", "the hub is stopping", "hub-stopping")
