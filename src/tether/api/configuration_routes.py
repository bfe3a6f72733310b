"""Automatic device configuration routes (`IoTHubConfigurationManager`): `/configurations/{id}` CRUD,
`/configurations/testQueries`, and applying configuration content to one device. Reading needs
RegistryRead, writing RegistryReadWrite; refusals are audited by the route guard."""

from __future__ import annotations

from aiohttp import web

from tether.api.bodies import query_int, read_json_object
from tether.api.context import hub_of, principal_of
from tether.api.devices import path_device_id
from tether.api.routes import IF_MATCH, READ, WRITE, Param, Route
from tether.hub import Hub

__all__ = ["CONFIGURATION_ROUTES", "add_configuration_routes"]


async def put_configuration(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    config, created = await hub_of(request).configurations.put(
        request.match_info["id"],
        body,
        if_match=request.headers.get("If-Match"),
        actor=principal_of(request).name,
    )
    return web.json_response(config, status=201 if created else 200, headers={"ETag": f'"{config["etag"]}"'})


async def get_configuration(request: web.Request) -> web.Response:
    config = await hub_of(request).configurations.get(request.match_info["id"])
    return web.json_response(config, headers={"ETag": f'"{config["etag"]}"'})


async def list_configurations(request: web.Request) -> web.Response:
    top = query_int(request, "top", default=100, low=1, high=100) if "top" in request.query else None
    return web.json_response(await hub_of(request).configurations.list_configurations(top))


async def delete_configuration(request: web.Request) -> web.Response:
    await hub_of(request).configurations.delete(
        request.match_info["id"], if_match=request.headers.get("If-Match"), actor=principal_of(request).name
    )
    return web.Response(status=204)


async def test_queries(request: web.Request) -> web.Response:
    return web.json_response(
        await hub_of(request).configurations.test_queries(await read_json_object(request))
    )


async def apply_content(request: web.Request) -> web.Response:
    device_id = path_device_id(request)
    body = await read_json_object(request)
    await hub_of(request).configurations.apply_content(device_id, body, actor=principal_of(request).name)
    return web.Response(status=204)


CONFIGURATION_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/configurations/testQueries",
        test_queries,
        "Validate a target condition and metric queries",
        READ,
        "configurations",
        request="object",
        response="object",
    ),
    Route(
        "PUT",
        "/configurations/{id}",
        put_configuration,
        "Create or update a configuration",
        WRITE,
        "configurations",
        request="object",
        response="object",
        params=(IF_MATCH,),
        response_headers=("ETag",),
        description="Without If-Match: create (201; 409 if it exists). With an etag (quoted or not) or `*`: "
        "update target condition, priority, labels, metrics (content is fixed; 412 on a stale "
        "etag).",
    ),
    Route(
        "GET",
        "/configurations/{id}",
        get_configuration,
        "Get a configuration with its metrics",
        READ,
        "configurations",
        response="object",
        response_headers=("ETag",),
    ),
    Route(
        "GET",
        "/configurations",
        list_configurations,
        "List configurations",
        READ,
        "configurations",
        response="object",
        array=True,
        params=(Param("top", "query", "At most this many (1-100).", {"type": "integer"}),),
    ),
    Route(
        "DELETE",
        "/configurations/{id}",
        delete_configuration,
        "Delete a configuration",
        WRITE,
        "configurations",
        status=204,
        params=(IF_MATCH,),
        description="Targeted twins take their next configuration; its settings are removed.",
    ),
    Route(
        "POST",
        "/devices/applyConfigurationContent/{id}",
        apply_content,
        "Apply configuration content to a device",
        WRITE,
        "configurations",
        request="object",
        status=204,
    ),
    Route(
        "POST",
        "/devices/{id}/applyConfigurationContent",
        apply_content,
        "Apply configuration content to a device (SDK path)",
        WRITE,
        "configurations",
        request="object",
        status=204,
        description="`deviceContent` desired properties are written to the device twin and each "
        "`modulesContent` entry to that module's twin (404 before any write when the device or a module "
        "does not exist); `moduleContent` is refused.",
    ),
)


def add_configuration_routes(app: web.Application, hub: Hub) -> None:
    from tether.api.app import mount  # not at import time: app.py imports this module

    mount(app, CONFIGURATION_ROUTES)
