"""Serving `build_app(hub)` over HTTPS with every connection state bounded and every bad request a 4xx.

* **Deadlines.** The TLS handshake gets `limits.connect_timeout_s`. A connection with no request in
  progress — just after the handshake, between keep-alive requests, or holding half a request head —
  is closed `limits.http_idle_timeout_s` after it became idle (aiohttp's keep-alive timer, which also
  runs from the handshake on). A request body must keep arriving: `limits.http_body_timeout_s` at most
  between two reads (`api.bodies.read_body`, 408 and closed). A body the handler does not read is
  drained for at most that long too, then the connection is closed. MQTT over WebSockets is bounded by
  the MQTT session itself (CONNECT deadline, keep-alive, token expiry).
* **Admission.** Sockets are admitted by the hub's `ConnectionSlots` (`tether.security.admission`);
  `request_guard` holds the connection's slot while a request is in progress, so only idle connections
  can be shed under descriptor pressure.
* **Total parsing.** A request aiohttp cannot parse (a NUL or a raw non-ASCII byte in the request line,
  a malformed header, an oversize line) is answered by `HttpRequestHandler.handle_error`: a JSON 400
  (`errorCode` `BadRequest`) and one debug log line, never a traceback; header values that are not
  valid UTF-8 (aiohttp hands them over with surrogate escapes, which would fail wherever they are
  encoded again) are refused by `request_guard` with a 400 naming the header. Both are pre-
  authentication refusals: counted, charged to the peer's failure budget and audited in aggregate
  (`Authenticator.refuse`, action `https.request`).
* **No banner.** Every response says `Server: Tether`, without Python or aiohttp versions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from tether.api.context import hub_of, peer_of
from tether.errors import BadRequest
from tether.hub import Hub
from tether.security.listener import Listener, format_peer
from tether.security.tls import TlsContextFactory, start_tls_server

__all__ = ["SERVER_NAME", "HttpRequestHandler", "hide_server_banner", "request_guard", "start_https",
           "undecodable_header"]

log = logging.getLogger("tether.api")

SERVER_NAME: Final = "Tether"
SURFACE: Final = "https"
REQUEST_ACTION: Final = "https.request"
MAX_LINGER_S: Final = 10.0


def undecodable_header(headers: Any) -> str | None:
    """The name of the first header whose value was not valid UTF-8 (aiohttp decodes header bytes with
    `surrogateescape`, so such a value holds U+DC80..U+DCFF; any lone surrogate is refused), else None."""
    for name, value in headers.items():
        if not value.isascii() and any("\ud800" <= c <= "\udfff" for c in value):
            return str(name)
    return None


@web.middleware
async def request_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse header values that are not UTF-8; hold the connection's admission slot meanwhile."""
    transport = request.transport
    slot = transport.get_extra_info("connection_slot") if transport is not None else None
    if slot is not None:
        slot.hold()
    try:
        bad = undecodable_header(request.headers)
        if bad is not None:
            await hub_of(request).authenticator.refuse(
                REQUEST_ACTION, "invalid-header-encoding", surface=SURFACE, peer=peer_of(request),
                details={"header": bad})
            raise BadRequest(f"header {bad} is not valid UTF-8", field=bad)
        return await handler(request)
    finally:
        if slot is not None:
            slot.unhold()


async def hide_server_banner(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: no `Server: Python/… aiohttp/…` version banner."""
    response.headers[hdrs.SERVER] = SERVER_NAME


class HttpRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with Tether's answer to requests that do not parse."""

    def __init__(self, manager: web.Server, *, hub: Hub, loop: asyncio.AbstractEventLoop,
                 **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._hub = hub
        self._refusals: set[asyncio.Task[None]] = set()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:  # our failure: aiohttp logs it with its traceback
            response = super().handle_error(request, status, exc, message)
            response.headers[hdrs.SERVER] = SERVER_NAME
            return response
        transport = request.transport
        peer = format_peer(transport.get_extra_info("peername")) if transport is not None else None
        what = _first_line(exc, message)
        log.debug("malformed HTTP request from %s: %s", peer, what)
        task = self._loop.create_task(self._hub.authenticator.refuse(
            REQUEST_ACTION, "malformed-request", surface=SURFACE, peer=peer,
            details={"status": status, "error": type(exc).__name__ if exc is not None else None}))
        self._refusals.add(task)
        task.add_done_callback(self._refusals.discard)
        if request.writer.output_size > 0:  # as aiohttp: a response has started, nothing more to say
            raise ConnectionError("response already started")
        body = {"errorCode": "BadRequest", "message": f"malformed HTTP request: {what}"}
        response = web.json_response(body, status=status)
        response.headers[hdrs.SERVER] = SERVER_NAME
        response.force_close()
        return response


def _first_line(exc: BaseException | None, message: str | None) -> str:
    """The parser's complaint without the echoed request bytes it appends."""
    text = getattr(exc, "message", None) or message or (str(exc) if exc is not None else "bad request")
    return str(text).strip().splitlines()[0].rstrip(":")[:200] or "bad request"


async def start_https(hub: Hub, runner: web.AppRunner, host: str | None, port: int,
                      tls: TlsContextFactory) -> Listener:
    """Serve the runner's app (`build_app(hub)`, set up) on host:port over TLS, with the deadlines,
    admission and error handling above."""
    limits = hub.settings.limits
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    kwargs: dict[str, Any] = {
        "keepalive_timeout": limits.http_idle_timeout_s,
        "lingering_time": min(MAX_LINGER_S, limits.http_body_timeout_s),
        "access_log": None,
    }

    def handler() -> asyncio.Protocol:
        return HttpRequestHandler(server, hub=hub, loop=loop, **kwargs)

    return await start_tls_server(handler, host, port, tls, handshake_timeout=limits.connect_timeout_s,
                                  slots=hub.slots, name="https")
