"""`build_app(hub)`: the aiohttp application serving the service REST API.

aiohttp rather than an ASGI server because the device HTTPS surface needs the TLS peer
certificate (see docs/decisions/0001-http-stack-aiohttp.md). Serve it with
`web.AppRunner(build_app(hub))` on a `TCPSite` (plain, tests) or, as `tether run` does, through
`tether.api.server.start_https(hub, runner, …)` (deadlines, admission, total parsing).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from tether.api.auth import authenticate
from tether.api.bodies import BULK_FACTOR
from tether.api.context import HUB_KEY, PRINCIPAL_KEY, ROUTES_KEY, SPEC_KEY
from tether.api.errors import error_middleware
from tether.api.openapi import spec_bytes
from tether.api.operator_guard import operator_call
from tether.api.routes import ROUTES, Route
from tether.api.server import hide_server_banner, request_guard
from tether.hub import Hub
from tether.observability.metrics import metrics_handler
from tether.protocols.amqp.websocket import SERVICEBUS_WEBSOCKET_PATHS, amqp_websocket_handler, wants_amqp
from tether.protocols.mqtt.websocket import mqtt_websocket_handler
from tether.security.principal import Permission, PrincipalKind


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


def register(app: web.Application, routes: tuple[Route, ...]) -> None:
    for route in routes:
        guard = route.permission is not None and not route.self_auth
        handler = _guarded(route.handler, route.permission) if guard else route.handler  # type: ignore[arg-type]
        app.router.add_route(route.method, route.path, handler)


def mount(app: web.Application, routes: tuple[Route, ...]) -> None:
    """Register `routes` and add them to the app's route table and served OpenAPI document, so
    what is served and what is documented cannot drift."""
    register(app, routes)
    table = (*app.get(ROUTES_KEY, ()), *routes)
    app[ROUTES_KEY] = table
    app[SPEC_KEY] = spec_bytes(table)


def _device_websocket(hub: Hub) -> Handler:
    """`/$iothub/websocket` serves MQTT (subprotocol `mqtt`) and AMQP (`AMQPWSB10`)."""
    mqtt, amqp = mqtt_websocket_handler(hub), amqp_websocket_handler(hub)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await (amqp(request) if wants_amqp(request) else mqtt(request))

    return handler


def build_app(hub: Hub) -> web.Application:
    from tether.api.c2d_routes import add_c2d_routes
    from tether.api.configuration_routes import add_configuration_routes
    from tether.api.device_routes import add_device_routes
    from tether.api.event_routes import add_event_routes
    from tether.api.file_upload_routes import add_file_upload_routes
    from tether.api.job_routes import add_job_routes
    from tether.api.method_routes import add_method_routes
    from tether.api.module_routes import add_module_routes
    from tether.api.security_routes import add_security_routes

    # aiohttp's own cap is the largest body any route accepts (bulk import); each handler then
    # reads with its own limit, so ordinary routes still answer 413 above the normal limit.
    app = web.Application(
        middlewares=[error_middleware, request_guard],
        client_max_size=hub.settings.limits.max_request_body_bytes * BULK_FACTOR,
    )
    app.on_response_prepare.append(hide_server_banner)
    app[HUB_KEY] = hub
    mount(app, ROUTES)
    add_c2d_routes(app, hub)
    add_device_routes(app, hub)
    add_method_routes(app, hub)
    add_module_routes(app, hub)
    add_event_routes(app, hub)
    add_security_routes(app, hub)
    add_file_upload_routes(app, hub)
    add_job_routes(app, hub)
    add_configuration_routes(app, hub)
    if hub.settings.operators.console:
        from tether.console import add_console_routes

        add_console_routes(app)
    mount(app, (
        Route("GET", "/metrics", metrics_handler, "Prometheus metrics", None, "operations"),
        Route("GET", "/$iothub/websocket", _device_websocket(hub), "MQTT 3.1.1 over WebSockets "
              "(subprotocol `mqtt`; the device authenticates in CONNECT) and AMQP 1.0 over WebSockets "
              "(subprotocol `AMQPWSB10`; SASL or CBS)", Permission.device_connect, "device-mqtt",
              self_auth=True),
        *(Route("GET", path, amqp_websocket_handler(hub), "AMQP 1.0 over WebSockets (subprotocol "
                "`AMQPWSB10`) for the service and Event Hubs SDKs", Permission.service_connect, "amqp",
                self_auth=True) for path in SERVICEBUS_WEBSOCKET_PATHS),
    ))
    return app
