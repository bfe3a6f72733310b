"""A byte transport over an aiohttp WebSocket, shared by MQTT and AMQP over WebSockets.

Writes are queued and sent, in order, by one writer task; `close()` flushes first. The reader side
(the route handler's receive loop) honours `readable`, which `pause_reading()` clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

__all__ = ["CLOSE_TIMEOUT_S", "WsLink"]

log = logging.getLogger("tether.ws")

CLOSE_TIMEOUT_S = 2.0


class WsLink:
    """`Link` over a WebSocket: writes are queued and sent, in order, by one writer task."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws
        self._buffer: list[bytes] = []
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.readable = asyncio.Event()
        self.readable.set()

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer.append(data)
        self._kick()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.readable.set()  # wake a paused reader so it sees the session closed
            self._kick()

    def pause_reading(self) -> None:
        if not self._closing:
            self.readable.clear()

    def resume_reading(self) -> None:
        self.readable.set()

    def _kick(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._buffer:
                data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
                self._buffer.clear()
                await self._ws.send_bytes(data)
            if self._closing and not self._ws.closed:
                await self._ws.close()
        except Exception as exc:  # peer gone: nothing more can be sent
            log.debug("WebSocket write failed: %r", exc)
            self._buffer.clear()
            self._closing = True
            self.readable.set()
        finally:
            self._writer = None

    async def wait_flushed(self) -> None:
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_TIMEOUT_S)
