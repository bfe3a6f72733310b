"""Device twin routes: `GET`, `PATCH` and `PUT /twins/{id}` in Azure's twin JSON shape.

Handlers parse the request (bounded read, strict JSON, `If-Match`) and call `TwinService`, which
validates the body against Azure's twin limits before anything is written. Every answer carries the
full twin and its `ETag`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from tether.api.bodies import parse_if_match, read_json_object
from tether.api.context import hub_of, principal_of
from tether.api.routes import IF_MATCH, READ, WRITE, Feature, Route
from tether.api.twins import Twin
from tether.messaging.twins import TwinService
from tether.registry.models import validate_device_id

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def twins_of(request: web.Request) -> TwinService:
    return hub_of(request).twins


def _device_id(request: web.Request) -> str:
    return validate_device_id(request.match_info["id"], field="deviceId")


async def twin_response(request: web.Request, device_id: str, twin: dict[str, object]) -> web.Response:
    """The twin with `cloudToDeviceMessageCount` = the live C2D queue depth (computed on read, never
    stored: a stored count would change the etags on every send)."""
    twin["cloudToDeviceMessageCount"] = await hub_of(request).c2d.queue_depth(device_id)
    return web.json_response(twin, headers={"ETag": f'"{twin["etag"]}"'})


async def get_twin(request: web.Request) -> web.Response:
    device_id = _device_id(request)
    return await twin_response(request, device_id, await twins_of(request).get(device_id))


async def patch_twin(request: web.Request) -> web.Response:
    """Merge tags and/or desired properties; `If-Match` etag or `*` (absent = unconditional)."""
    device_id = _device_id(request)
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await read_json_object(request)
    twin = await twins_of(request).patch(device_id, body, if_match=if_match, actor=principal_of(request).name)
    return await twin_response(request, device_id, twin)


async def replace_twin(request: web.Request) -> web.Response:
    """Replace tags and desired properties; `If-Match` etag or `*` (absent = unconditional)."""
    device_id = _device_id(request)
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await read_json_object(request)
    twin = await twins_of(request).replace(device_id, body, if_match=if_match,
                                           actor=principal_of(request).name)
    return await twin_response(request, device_id, twin)


FEATURE = Feature("twins", (
    Route("GET", "/twins/{id}", get_twin, "Get a device twin", READ, "twins", response=Twin,
          response_headers=("ETag",)),
    Route("PATCH", "/twins/{id}", patch_twin, "Update tags and desired properties", WRITE,
          "twins", request="object", response=Twin, params=(IF_MATCH,), response_headers=("ETag",)),
    Route("PUT", "/twins/{id}", replace_twin, "Replace tags and desired properties", WRITE,
          "twins", request="object", response=Twin, params=(IF_MATCH,), response_headers=("ETag",)),
))

__all__ = ["FEATURE", "get_twin", "patch_twin", "replace_twin", "twins_of"]
