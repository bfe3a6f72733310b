"""Typed keys for what the REST layer keeps on the application and on each request.

Handlers reach the hub and the authenticated principal only through these helpers, so nothing in
`tether.api` needs module-level state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from tether.security.principal import Principal

if TYPE_CHECKING:
    from tether.api.routes import Route
    from tether.hub import Hub

HUB_KEY: web.AppKey[Hub] = web.AppKey("hub")
ROUTES_KEY: web.AppKey[tuple[Route, ...]] = web.AppKey("routes")
SPEC_KEY: web.AppKey[bytes] = web.AppKey("openapi_spec")
PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("principal")


def hub_of(request: web.Request) -> Hub:
    return request.app[HUB_KEY]


def principal_of(request: web.Request) -> Principal:
    """The principal the route guard authenticated; a route without a permission has none."""
    principal = request.get(PRINCIPAL_KEY)
    if not isinstance(principal, Principal):
        raise RuntimeError("route has no authenticated principal")
    return principal


def peer_of(request: web.Request) -> str | None:
    """`ip:port` of the client (`[ip]:port` for IPv6), for audit records."""
    transport = request.transport
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or len(peer) < 2:
        return None
    host, port = str(peer[0]), int(peer[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
