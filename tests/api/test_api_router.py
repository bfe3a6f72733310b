"""Routing as Azure IoT Hub does it (`api.router.RouteTable`): literal path segments match in any case,
a trailing slash is tolerated, parameters keep their case and encoded characters; the most literal
template wins; a path known with other methods is 405 with `Allow`; and every error — the router's
own 404/405 included — carries Azure's body and `iothub-errorcode` header."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from api_helpers import API, create, device_body

from tether.api.app import FEATURES, build_app
from tether.api.router import RouteTable, canonical_path
from tether.hub import Hub


@pytest.mark.parametrize("path", ["/devices/Case-Dev1", "/DEVICES/Case-Dev1", "/Devices/Case-Dev1/",
                                  "/devices/Case-Dev1/"])
async def test_literals_match_in_any_case_and_a_trailing_slash_is_tolerated(
        client: httpx.AsyncClient, path: str) -> None:
    await create(client, "Case-Dev1")
    r = await client.get(f"{path}{API}")
    assert r.status_code == 200 and r.json()["deviceId"] == "Case-Dev1"  # the id keeps its case


async def test_parameters_keep_their_case(client: httpx.AsyncClient) -> None:
    await create(client, "UPPER")
    r = await client.get(f"/devices/upper{API}")
    assert r.status_code == 404 and r.headers["iothub-errorcode"] == "DeviceNotFound"


async def test_list_with_a_trailing_slash(client: httpx.AsyncClient) -> None:
    await create(client, "l1")
    r = await client.get(f"/devices/{API}")
    assert r.status_code == 200 and [d["deviceId"] for d in r.json()] == ["l1"]


async def test_encoded_characters_in_ids(client: httpx.AsyncClient) -> None:
    device_id = "odd%id:1"
    r = await client.put(f"/devices/{quote(device_id, safe='')}{API}", json=device_body(device_id))
    assert r.status_code == 200, r.text
    assert (await client.get(f"/devices/{quote(device_id, safe='')}{API}")).json()["deviceId"] == device_id


async def test_the_most_literal_template_wins(client: httpx.AsyncClient) -> None:
    r = await client.post(f"/devices/QUERY{API}", json={"query": "SELECT * FROM devices"})
    assert r.status_code == 200 and r.headers["x-ms-item-type"]  # the query, not a device named QUERY


async def test_router_errors_are_azure_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get(f"/no/such/route{API}")
    assert missing.status_code == 404 and missing.headers["iothub-errorcode"] == "NotFound"
    assert missing.json()["Message"].startswith("ErrorCode:NotFound;no route for GET /no/such/route")
    wrong = await client.patch(f"/Devices/x/{API}", json={})
    assert wrong.status_code == 405 and wrong.headers["iothub-errorcode"] == "MethodNotAllowed"
    assert set(wrong.headers["Allow"].split(", ")) == {"DELETE", "GET", "PUT"}
    # Node splits Message at ';': the text after the code keeps its meaning without one
    assert wrong.json()["Message"].count(";") == 1 and "allowed: DELETE, GET, PUT" in wrong.json()["Message"]


def test_canonical_paths_of_the_sdk_spellings() -> None:
    table = RouteTable((r.method, r.path, r.handler) for f in FEATURES for r in f.routes)
    assert canonical_path(table, "/devices/d1/messages/devicebound") == "/devices/{id}/messages/deviceBound"
    assert canonical_path(table, "/devices/d1/messages/devicebound/abc/abandon") == \
        "/devices/{id}/messages/deviceBound/{etag}/abandon"
    assert canonical_path(table, "/devices/") == "/devices"
    assert canonical_path(table, "/devices//x") is None  # an empty segment is no id


async def test_every_table_route_is_registered_once(hub: Hub) -> None:
    app = build_app(hub)
    registered = [(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None]
    table = [(r.method, r.path) for f in FEATURES for r in f.routes]
    assert sorted(registered) == sorted(table) and len(set(table)) == len(table)
