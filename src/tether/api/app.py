"""`build_app(hub)`: the aiohttp application serving the service REST API, the device HTTPS surface,
the consumer API and MQTT over WebSockets.

The one module of `tether.api` that knows its parts: `FEATURES` lists every route module's `FEATURE`,
`build_app` registers their routes in one `RouteTable` (Azure's matching rules, `api.router`) behind
the service guard, runs their setups, and builds the served OpenAPI document from the same table.
Route modules import nothing from here. The web console (`tether.console`) is another package with its
own `FEATURE`; `tether.server.http_app(hub)` adds it to these for the HTTPS listener.

aiohttp rather than an ASGI server because the device HTTPS surface needs the TLS peer
certificate (see docs/decisions/0001-http-stack-aiohttp.md). Serve it with
`web.AppRunner(build_app(hub))` on a `TCPSite` (plain, tests) or, as `tether run` does, through
`tether.api.server.start_https(hub, runner, …)` (deadlines, admission, total parsing).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from tether.api import (
    admin,
    c2d_routes,
    configuration_routes,
    device_routes,
    devices,
    event_routes,
    file_upload_routes,
    job_routes,
    method_routes,
    module_routes,
    not_yet,
    operations,
    query_routes,
    security_routes,
    statistics_routes,
    twin_routes,
)
from tether.api.auth import authenticate
from tether.api.bodies import BULK_FACTOR
from tether.api.context import HUB_KEY, PRINCIPAL_KEY, ROUTES_KEY, SPEC_KEY
from tether.api.errors import error_middleware
from tether.api.openapi import spec_bytes
from tether.api.operator_guard import operator_call
from tether.api.router import RouteTable
from tether.api.routes import Feature, Route
from tether.api.server import hide_server_banner, request_guard
from tether.hub import Hub
from tether.security.principal import Permission, PrincipalKind

__all__ = ["FEATURES", "build_app", "route_table"]

FEATURES: tuple[Feature, ...] = (
    devices.FEATURE,
    statistics_routes.FEATURE,
    twin_routes.FEATURE,
    query_routes.FEATURE,
    method_routes.FEATURE,
    module_routes.FEATURE,
    file_upload_routes.FEATURE,
    job_routes.FEATURE,
    configuration_routes.FEATURE,
    c2d_routes.FEATURE,
    device_routes.FEATURE,
    not_yet.FEATURE,
    admin.FEATURE,
    event_routes.FEATURE,
    security_routes.FEATURE,
    operations.FEATURE,
)


def route_table(features: tuple[Feature, ...] = FEATURES) -> tuple[Route, ...]:
    """Every route, in the order of `features`."""
    return tuple(route for feature in features for route in feature.routes)


def _guarded(handler: Handler, permission: Permission) -> Handler:
    """Authenticate before the handler runs; the principal is stored on the request."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        request[PRINCIPAL_KEY] = principal = await authenticate(request, permission)
        if principal.kind is PrincipalKind.user:  # a person: their roles' areas and device scopes too
            return await operator_call(request, principal, handler)
        return await handler(request)

    guarded.__name__ = getattr(handler, "__name__", "handler")
    guarded.__doc__ = handler.__doc__
    return guarded


def _handler(route: Route) -> Handler:
    if route.permission is None or route.self_auth:
        return route.handler
    return _guarded(route.handler, route.permission)


def build_app(hub: Hub, features: tuple[Feature, ...] = FEATURES) -> web.Application:
    # aiohttp's own cap is the largest body any route accepts (bulk import); each handler then
    # reads with its own limit, so ordinary routes still answer 413 above the normal limit.
    app = web.Application(
        middlewares=[error_middleware, request_guard],
        client_max_size=hub.settings.limits.max_request_body_bytes * BULK_FACTOR,
    )
    app.on_response_prepare.append(hide_server_banner)
    app[HUB_KEY] = hub
    for feature in features:
        if feature.setup is not None:
            feature.setup(app, hub)
    table = route_table(features)
    app.router.register_resource(RouteTable((r.method, r.path, _handler(r)) for r in table))
    app[ROUTES_KEY] = table
    app[SPEC_KEY] = spec_bytes(table)
    return app
