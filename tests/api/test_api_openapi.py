"""The OpenAPI document is valid JSON and lists every registered route."""

from __future__ import annotations

import json

import httpx
from aiohttp import web

from tether.api.app import FEATURES, build_app
from tether.api.context import ROUTES_KEY
from tether.hub import Hub


async def test_openapi_lists_every_registered_route(anon: httpx.AsyncClient, hub: Hub) -> None:
    r = await anon.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    spec = json.loads(r.content)
    assert spec["openapi"].startswith("3.1")

    app: web.Application = build_app(hub)
    registered = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
    }
    assert len(registered) == len(app[ROUTES_KEY]) == sum(len(f.routes) for f in FEATURES)
    documented = {(m, path) for path, ops in spec["paths"].items() for m in ops}
    assert registered == documented


async def test_openapi_components_use_wire_names_and_resolve(anon: httpx.AsyncClient) -> None:
    spec = (await anon.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    device = next(v for k, v in schemas.items() if k.startswith("Device"))
    assert "deviceId" in device["properties"] and "device_id" not in device["properties"]

    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    put = spec["paths"]["/devices/{id}"]["put"]
    assert put["x-required-permission"] == "RegistryReadWrite"
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert spec["paths"]["/tether/devices/import"]["post"]["x-tether-extension"] is True
