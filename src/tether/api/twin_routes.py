"""Device twin routes: `GET`, `PATCH` and `PUT /twins/{id}` in Azure's twin JSON shape.

Handlers parse the request (bounded read, strict JSON, `If-Match`) and call `TwinService`, which
validates the body against Azure's twin limits before anything is written. Every answer carries the
full twin and its `ETag`. Mount with `add_twin_routes(app, hub)` — or put `TWIN_ROUTES` into the route
table — before the application starts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from tether.api.auth import authenticate
from tether.api.bodies import parse_if_match, read_json_object
from tether.api.context import PRINCIPAL_KEY, hub_of, principal_of
from tether.messaging.twins import TwinService
from tether.registry.models import validate_device_id
from tether.security.principal import Permission
from tether.storage.sql.twins import SqlTwinRepository

if TYPE_CHECKING:
    from tether.hub import Hub

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TWINS_KEY: web.AppKey[TwinService] = web.AppKey("twins", TwinService)


def twin_service(app: web.Application, hub: Hub) -> TwinService:
    """The hub's `TwinService` (`hub.twins` once the hub builds one), remembered on the app; until
    then one is built over the hub's storage and shared by the twin and query routes."""
    if TWINS_KEY in app:
        return app[TWINS_KEY]
    service = getattr(hub, "twins", None)
    if not isinstance(service, TwinService):
        service = TwinService(SqlTwinRepository(hub.storage.db), hub.registry, hub.audit)
    app[TWINS_KEY] = service
    return service


def twins_of(request: web.Request) -> TwinService:
    service = request.app.get(TWINS_KEY)
    if service is None:
        service = getattr(hub_of(request), "twins", None)
    if not isinstance(service, TwinService):
        raise RuntimeError("no TwinService: mount with add_twin_routes(app, hub) or set hub.twins")
    return service


def _device_id(request: web.Request) -> str:
    return validate_device_id(request.match_info["id"], field="deviceId")


def twin_response(twin: dict[str, object]) -> web.Response:
    return web.json_response(twin, headers={"ETag": f'"{twin["etag"]}"'})


async def get_twin(request: web.Request) -> web.Response:
    return twin_response(await twins_of(request).get(_device_id(request)))


async def patch_twin(request: web.Request) -> web.Response:
    """Merge tags and/or desired properties; `If-Match` etag or `*` (absent = unconditional)."""
    device_id = _device_id(request)
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await read_json_object(request)
    twin = await twins_of(request).patch(device_id, body, if_match=if_match, actor=principal_of(request).name)
    return twin_response(twin)


async def replace_twin(request: web.Request) -> web.Response:
    """Replace tags and desired properties; `If-Match` etag or `*` (absent = unconditional)."""
    device_id = _device_id(request)
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await read_json_object(request)
    twin = await twins_of(request).replace(device_id, body, if_match=if_match,
                                           actor=principal_of(request).name)
    return twin_response(twin)


TWIN_ROUTES: tuple[tuple[str, str, Handler, Permission], ...] = (
    ("GET", "/twins/{id}", get_twin, Permission.registry_read),
    ("PATCH", "/twins/{id}", patch_twin, Permission.registry_write),
    ("PUT", "/twins/{id}", replace_twin, Permission.registry_write),
)


def guarded(handler: Handler, permission: Permission) -> Handler:
    """Authenticate (audited by the authenticator) before the handler runs, like `build_app` does."""

    async def run(request: web.Request) -> web.StreamResponse:
        request[PRINCIPAL_KEY] = await authenticate(request, permission)
        return await handler(request)

    run.__name__ = getattr(handler, "__name__", "handler")
    run.__doc__ = handler.__doc__
    return run


def add_twin_routes(app: web.Application, hub: Hub) -> None:
    twin_service(app, hub)
    for method, path, handler, permission in TWIN_ROUTES:
        app.router.add_route(method, path, guarded(handler, permission))


__all__ = ["TWINS_KEY", "TWIN_ROUTES", "add_twin_routes", "get_twin", "patch_twin", "replace_twin",
           "twin_service", "twins_of"]
