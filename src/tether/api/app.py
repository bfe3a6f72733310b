"""`build_app(hub)`: the aiohttp application serving the service REST API.

aiohttp rather than an ASGI server because the device HTTPS surface needs the TLS peer
certificate (see docs/decisions/0001-http-stack-aiohttp.md). Serve it with
`web.AppRunner(build_app(hub))` on a `TCPSite` (plain, tests) or through
`tether.security.tls.start_tls_server(runner.server, …)`.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from tether.api.auth import authenticate
from tether.api.bodies import BULK_FACTOR
from tether.api.context import HUB_KEY, PRINCIPAL_KEY, ROUTES_KEY, SPEC_KEY
from tether.api.errors import error_middleware
from tether.api.openapi import spec_bytes
from tether.api.routes import ROUTES, Route
from tether.hub import Hub
from tether.security.principal import Permission


def _guarded(handler: Handler, permission: Permission) -> Handler:
    """Authenticate before the handler runs; the principal is stored on the request."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        request[PRINCIPAL_KEY] = await authenticate(request, permission)
        return await handler(request)

    guarded.__name__ = getattr(handler, "__name__", "handler")
    guarded.__doc__ = handler.__doc__
    return guarded


def register(app: web.Application, routes: tuple[Route, ...]) -> None:
    for route in routes:
        handler = route.handler if route.permission is None else _guarded(route.handler, route.permission)
        app.router.add_route(route.method, route.path, handler)


def build_app(hub: Hub) -> web.Application:
    # aiohttp's own cap is the largest body any route accepts (bulk import); each handler then
    # reads with its own limit, so ordinary routes still answer 413 above the normal limit.
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=hub.settings.limits.max_request_body_bytes * BULK_FACTOR,
    )
    app[HUB_KEY] = hub
    app[ROUTES_KEY] = ROUTES
    app[SPEC_KEY] = spec_bytes(ROUTES)
    register(app, ROUTES)
    return app
