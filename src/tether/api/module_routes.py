"""Module identity routes: Azure's `/devices/{id}/modules[/{mid}]` (registry) and
`/twins/{id}/modules/{mid}` (module twins), plus Tether's key regeneration for modules.

The registry and twin rules live in `tether.registry.modules.ModuleService` and
`tether.messaging.twins.TwinService` (`module_id=`); handlers only parse the request (bounded read,
strict JSON, `If-Match`). Answers carry the module (or module twin) and its `ETag`; a module list is
a bare JSON array, as Azure answers it. Module direct methods (`POST /twins/{id}/modules/{mid}/methods`)
are in `method_routes`, module telemetry over HTTPS in `device_routes`.

`add_module_routes(app, hub)` mounts `MODULE_ROUTES` on an app from `build_app(hub)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from tether.api.bodies import parse_if_match, query_choice, read_json_object
from tether.api.context import hub_of, principal_of
from tether.api.devices import KEY_CHOICES
from tether.api.routes import IF_MATCH, KEY, READ, WRITE, Route
from tether.api.twins import Twin
from tether.registry.models import Module, validate_device_id

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["MODULE_ROUTES", "add_module_routes"]


def _ids(request: web.Request) -> tuple[str, str]:
    return (validate_device_id(request.match_info["id"], field="deviceId"),
            validate_device_id(request.match_info["mid"], field="moduleId"))


def _module_response(module: Module) -> web.Response:
    return web.json_response(module.to_wire(), headers={"ETag": f'"{module.etag}"'})


def _twin_response(twin: dict[str, Any]) -> web.Response:
    return web.json_response(twin, headers={"ETag": f'"{twin["etag"]}"'})


async def put_module(request: web.Request) -> web.Response:
    """Without If-Match: create (409 ModuleAlreadyExistsOnDevice if it exists); with an etag or `*`:
    replace `managedBy` and `authentication` (keys left out are kept; a new sas module gets both)."""
    device_id, module_id = _ids(request)
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await read_json_object(request)
    module = await hub_of(request).modules.put(device_id, module_id, body, if_match=if_match,
                                               actor=principal_of(request).name)
    return _module_response(module)


async def get_module(request: web.Request) -> web.Response:
    return _module_response(await hub_of(request).modules.get(*_ids(request)))


async def list_modules(request: web.Request) -> web.Response:
    device_id = validate_device_id(request.match_info["id"], field="deviceId")
    modules = await hub_of(request).modules.list(device_id)
    return web.json_response([m.to_wire() for m in modules])


async def delete_module(request: web.Request) -> web.Response:
    """A missing If-Match is taken as `*` (unconditional); the Azure SDKs always send one."""
    device_id, module_id = _ids(request)
    if_match = parse_if_match(request.headers.get("If-Match")) or "*"
    await hub_of(request).modules.delete(device_id, module_id, if_match=if_match,
                                         actor=principal_of(request).name)
    return web.Response(status=204)


async def regenerate_module_key(request: web.Request) -> web.Response:
    device_id, module_id = _ids(request)
    which = query_choice(request, "key", KEY_CHOICES, default="primary")
    module = await hub_of(request).modules.regenerate_key(device_id, module_id, which,
                                                          actor=principal_of(request).name)
    return _module_response(module)


async def get_module_twin(request: web.Request) -> web.Response:
    device_id, module_id = _ids(request)
    return _twin_response(await hub_of(request).twins.get(device_id, module_id))


async def patch_module_twin(request: web.Request) -> web.Response:
    """Merge tags and/or desired properties; `If-Match` etag or `*` (absent = unconditional)."""
    return await _write_twin(request, replace=False)


async def replace_module_twin(request: web.Request) -> web.Response:
    """Replace tags and desired properties; `If-Match` etag or `*` (absent = unconditional)."""
    return await _write_twin(request, replace=True)


async def _write_twin(request: web.Request, *, replace: bool) -> web.Response:
    device_id, module_id = _ids(request)
    if_match = parse_if_match(request.headers.get("If-Match"))
    body = await read_json_object(request)
    twins = hub_of(request).twins
    write = twins.replace if replace else twins.patch
    twin = await write(device_id, body, module_id=module_id, if_match=if_match,
                       actor=principal_of(request).name)
    return _twin_response(twin)


_NOT_FOUND = "404 DeviceNotFound for an unknown device, ModuleNotFound for an unknown module."

MODULE_ROUTES: tuple[Route, ...] = (
    Route("PUT", "/devices/{id}/modules/{mid}", put_module, "Create or replace a module identity", WRITE,
          "modules", request=Module, response=Module, params=(IF_MATCH,), response_headers=("ETag",),
          description="Without If-Match: create (409 ModuleAlreadyExistsOnDevice if it exists; 403 "
                      "IotHubQuotaExceeded beyond 50 modules per device). With If-Match etag or `*`: "
                      "replace (412 on a stale etag). Empty or missing sas keys are generated. "
                      + _NOT_FOUND),
    Route("GET", "/devices/{id}/modules/{mid}", get_module, "Get a module identity", READ, "modules",
          response=Module, response_headers=("ETag",), description=_NOT_FOUND),
    Route("DELETE", "/devices/{id}/modules/{mid}", delete_module, "Delete a module identity", WRITE,
          "modules", status=204, params=(IF_MATCH,),
          description="Deletes its twin too and closes its connection. If-Match etag or `*`; a missing "
                      "If-Match is unconditional (Tether leniency). " + _NOT_FOUND),
    Route("GET", "/devices/{id}/modules", list_modules, "List the module identities of a device", READ,
          "modules", response=Module, array=True,
          description="A JSON array ordered by module id; 404 DeviceNotFound for an unknown device."),
    Route("GET", "/twins/{id}/modules/{mid}", get_module_twin, "Get a module twin", READ, "twins",
          response=Twin, response_headers=("ETag",), description=_NOT_FOUND),
    Route("PATCH", "/twins/{id}/modules/{mid}", patch_module_twin,
          "Update a module twin's tags and desired properties", WRITE, "twins", request="object",
          response=Twin, params=(IF_MATCH,), response_headers=("ETag",),
          description="A connected module subscribed to desired patches gets the change. " + _NOT_FOUND),
    Route("PUT", "/twins/{id}/modules/{mid}", replace_module_twin,
          "Replace a module twin's tags and desired properties", WRITE, "twins", request="object",
          response=Twin, params=(IF_MATCH,), response_headers=("ETag",), description=_NOT_FOUND),
    Route("POST", "/tether/devices/{id}/modules/{mid}/regenerate-key", regenerate_module_key,
          "Regenerate a module's symmetric key(s)", WRITE, "tether-devices", response=Module,
          params=(KEY,)),
)


def add_module_routes(app: web.Application, hub: Hub) -> None:
    """Mount the module routes on an app from `build_app(hub)` (before it starts)."""
    from tether.api.app import mount  # not at import time: app.py imports this module

    mount(app, MODULE_ROUTES)
