"""MQTT over WebSockets (`GET /$iothub/websocket`, subprotocol `mqtt`) as an aiohttp route handler.

Azure devices behind firewalls that only pass 443 use this. Binary WebSocket frames carry a plain
MQTT byte stream (a packet may span frames, a frame may hold several packets), so the handler feeds
the frames to the very same `MqttSession` the TCP listener uses; TLS and the client certificate come
from the HTTPS listener's TLS layer (`peercert_chain`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web
from cryptography import x509

from tether.protocols.mqtt.server import context_for, format_peer
from tether.protocols.mqtt.session import MqttSession
from tether.protocols.wslink import CLOSE_TIMEOUT_S, WsLink

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["WEBSOCKET_PATH", "mqtt_websocket_handler"]

log = logging.getLogger("tether.mqtt.ws")

WEBSOCKET_PATH = "/$iothub/websocket"


def mqtt_websocket_handler(hub: Hub) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler to mount at `GET /$iothub/websocket` on the HTTPS app."""
    ctx = context_for(hub)

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            protocols=("mqtt",),
            timeout=CLOSE_TIMEOUT_S,
            max_msg_size=2 * ctx.limits.max_mqtt_packet_bytes,  # a frame may carry several packets
            compress=False,
        )
        ready = ws.can_prepare(request)
        if not ready.ok or ready.protocol != "mqtt":
            raise web.HTTPBadRequest(text="expected a WebSocket upgrade with subprotocol 'mqtt'")
        if not ctx.connections.admit():
            raise web.HTTPServiceUnavailable(text="too many connections")
        try:
            await ws.prepare(request)
            transport = request.transport

            def chain() -> Sequence[x509.Certificate]:
                return (transport.get_extra_info("peercert_chain") if transport else None) or ()

            peer = format_peer(transport.get_extra_info("peername")) if transport else None
            link = WsLink(ws)
            session = MqttSession(ctx, link, peer=peer, peer_chain=chain, protocol="mqtt-ws")
            try:
                await _pump(ws, link, session)
            finally:
                session.connection_lost()
                link.close()
                await link.wait_flushed()
        finally:
            ctx.connections.release()
        return ws

    return handler


async def _pump(ws: web.WebSocketResponse, link: WsLink, session: MqttSession) -> None:
    """Binary frames into the session until either side closes; honours the session's pauses."""
    while not session.closed:
        if not link.readable.is_set():
            await link.readable.wait()
            continue
        msg = await ws.receive()
        if msg.type is WSMsgType.BINARY:
            session.data_received(msg.data)
        elif msg.type is WSMsgType.TEXT:
            session.shutdown("websocket-text-frame")  # MQTT over WebSockets is binary only
        else:  # CLOSE, CLOSING, CLOSED, ERROR
            return
