"""AMQP 1.0 over WebSockets (subprotocol `AMQPWSB10`) as an aiohttp route handler, served on the HTTPS
listener at `/$iothub/websocket` (device SDKs, beside MQTT's subprotocol `mqtt`) and
`/$servicebus/websocket` (uamqp and the Event Hubs SDKs; uamqp adds a trailing `/`).

Binary WebSocket messages carry a plain AMQP byte stream (a frame may span messages, a message may hold
several frames), fed to the very same `AmqpEndpoint` the TLS listener uses; TLS and the client
certificate come from the HTTPS listener's TLS layer (`peercert_chain`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final

from aiohttp import WSMsgType, web
from cryptography import x509

from tether.protocols.wslink import CLOSE_TIMEOUT_S, WsLink
from tether.security.listener import format_peer

from .endpoint import AmqpEndpoint
from .server import context_for

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["SERVICEBUS_WEBSOCKET_PATHS", "SUBPROTOCOL", "amqp_websocket_handler", "wants_amqp"]

SUBPROTOCOL: Final = "AMQPWSB10"
SERVICEBUS_WEBSOCKET_PATHS: Final = ("/$servicebus/websocket", "/$servicebus/websocket/")


def wants_amqp(request: web.Request) -> bool:
    """Whether a WebSocket upgrade asks for AMQP (its subprotocol list names `AMQPWSB10`)."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    return any(p.strip().upper() == SUBPROTOCOL for p in offered.split(","))


def amqp_websocket_handler(hub: Hub) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    ctx = context_for(hub)
    max_message = 2 * ctx.limits.amqp_max_frame_bytes + ctx.limits.max_d2c_message_bytes

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), timeout=CLOSE_TIMEOUT_S,
                                   max_msg_size=max_message, compress=False)
        ready = ws.can_prepare(request)
        if not ready.ok or (ready.protocol or "").upper() != SUBPROTOCOL:
            raise web.HTTPBadRequest(text=f"expected a WebSocket upgrade with subprotocol '{SUBPROTOCOL}'")
        if not ctx.connections.admit():
            raise web.HTTPServiceUnavailable(text="too many connections")
        try:
            await ws.prepare(request)
            transport = request.transport

            def chain() -> Sequence[x509.Certificate]:
                return (transport.get_extra_info("peercert_chain") if transport else None) or ()

            peer = format_peer(transport.get_extra_info("peername")) if transport else None
            link = WsLink(ws)
            endpoint = AmqpEndpoint(ctx, link, peer=peer, peer_chain=chain, surface="amqpws")
            try:
                while not endpoint.closed:
                    if not link.readable.is_set():
                        await link.readable.wait()
                        continue
                    msg = await ws.receive()
                    if msg.type is WSMsgType.BINARY:
                        endpoint.data_received(msg.data)
                    elif msg.type is WSMsgType.TEXT:
                        endpoint.force_close("amqp:connection:framing-error",
                                             "AMQP over WebSockets is binary", "websocket-text-frame")
                    else:
                        break
            finally:
                endpoint.connection_lost()
                link.close()
                await link.wait_flushed()
        finally:
            ctx.connections.release()
        return ws

    return handler
