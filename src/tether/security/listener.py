"""Tether's own accept loop, under every listener (MQTT, MQTT over TLS, AMQP over TLS, HTTPS).

Why not `loop.create_server`: when the process is out of file descriptors, `accept()` fails with
EMFILE. uvloop (libuv) then accepts and closes every pending connection without telling anyone,
stdlib asyncio logs a generic error; either way devices and health checks fail silently. Here an
EMFILE (or ENFILE, ENOBUFS, ENOMEM) pauses this listener's accepting with a growing back-off (50 ms
to 1 s), logs one warning per episode and counts `tether_accept_backoffs{listener,error}`; pending
connections wait in the kernel backlog instead of being dropped.

Before a protocol is created, the socket asks `ConnectionSlots` (`tether.security.admission`) for a
slot: over the peer's cap, or with every slot taken and nothing to shed, it is closed at once —
before any TLS work — and counted in `tether_connections_refused{listener,reason}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

from tether.observability.metrics import ACCEPT_BACKOFFS
from tether.security.admission import ConnectionSlots, Slot

__all__ = ["Listener", "ProtocolFactory", "format_peer", "start_listener"]

log = logging.getLogger(__name__)

ProtocolFactory = Callable[[Slot | None], asyncio.Protocol]
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


def format_peer(peername: Any) -> str | None:
    """`ip:port` (`[ip]:port` for IPv6) for audit records and admission."""
    if not isinstance(peername, tuple) or len(peername) < 2:
        return None
    host, port = str(peername[0]), peername[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listener(asyncio.AbstractServer):
    """Listening sockets plus the accept loop; an `asyncio.AbstractServer` for the hub's bookkeeping."""

    def __init__(self, name: str, sockets: Iterable[socket.socket], factory: ProtocolFactory,
                 slots: ConnectionSlots | None, *, backlog: int = 1024) -> None:
        self.name = name
        self.sockets = list(sockets)
        self._factory = factory
        self._slots = slots
        self._backlog = backlog
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._closed = asyncio.Event()
        self._backoff_s = 0.0
        self._resume: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        self.backoffs = 0

    # asyncio.AbstractServer ------------------------------------------------------------------
    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving or self._closed.is_set():
            return
        self._serving = True
        for sock in self.sockets:
            sock.listen(self._backlog)
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._closed.wait()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._pause()
        self._serving = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    # accepting -----------------------------------------------------------------------------------
    def _pause(self) -> None:
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _on_readable(self, sock: socket.socket) -> None:
        for _ in range(self._backlog):  # drain what is pending, up to the backlog, in one go
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in RESOURCE_ERRORS:
                    self._back_off(exc)
                    return
                log.error("listener %s: accept failed: %s", self.name, exc)
                return
            self._backoff_s = 0.0
            self._admit(conn, address)

    def _back_off(self, exc: OSError) -> None:
        """Out of descriptors (or kernel memory): stop accepting for a while; the kernel keeps the
        pending connections in the backlog meanwhile."""
        error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        ACCEPT_BACKOFFS.labels(self.name, error).inc()
        self.backoffs += 1
        first = self._backoff_s == 0.0
        self._backoff_s = BACKOFF_FIRST_S if first else min(BACKOFF_MAX_S, self._backoff_s * 2)
        if first:
            held = len(self._slots) if self._slots is not None else "?"
            log.warning("listener %s: accept failed with %s (%s): pausing accept (%.2f s, growing to %.0f s "
                        "while it lasts); %s sockets held", self.name, error, exc.strerror, self._backoff_s,
                        BACKOFF_MAX_S, held)
        self._pause()
        self._resume = self._loop.call_later(self._backoff_s, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._closed.is_set():
            return
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._on_readable, sock)
            self._on_readable(sock)
            if self._resume is not None:  # backed off again
                return

    def _admit(self, conn: socket.socket, address: Any) -> None:
        slot: Slot | None = None
        if self._slots is not None:
            slot = self._slots.open(self.name, format_peer(address))
            if slot is None:
                _close_now(conn)
                return
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            protocol = self._factory(slot)
        except Exception:
            log.exception("listener %s: protocol factory failed", self.name)
            if slot is not None:
                slot.release()
            _close_now(conn)
            return
        task = self._loop.create_task(self._connect(conn, protocol, slot))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _connect(self, conn: socket.socket, protocol: asyncio.Protocol, slot: Slot | None) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: protocol, conn)
        except Exception as exc:  # the peer left already, or we are short of memory
            log.debug("listener %s: could not set up an accepted socket: %r", self.name, exc)
            if slot is not None:
                slot.release()
            _close_now(conn)


def _close_now(conn: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): nothing is left in TIME_WAIT for a refused socket."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def _bind(host: str | None, port: int, *, reuse_port: bool | None) -> list[socket.socket]:
    infos = list(dict.fromkeys(  # getaddrinfo may repeat entries
        socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)))
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            if port == 0 and sockets:  # one port for every address of the host
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def start_listener(name: str, factory: ProtocolFactory, host: str | None, port: int, *,
                         slots: ConnectionSlots | None = None, backlog: int = 1024,
                         reuse_port: bool | None = None) -> Listener:
    """Bind host:port (every address it resolves to) and start accepting."""
    listener = Listener(name, _bind(host, port, reuse_port=reuse_port), factory, slots, backlog=backlog)
    await listener.start_serving()
    return listener
