"""GET/PATCH/PUT /twins/{id} through a real aiohttp server (SQLite and PostgreSQL) with httpx."""

from __future__ import annotations

from typing import Any

import httpx
from hub_app_helpers import API, create_device, policy_token

from tether.hub import Hub
from tether.messaging.twins import INITIAL_ETAG, TwinService


async def test_get_twin_has_azure_shape_and_etag(client: httpx.AsyncClient) -> None:
    await create_device(client, "dev1")
    r = await client.get(f"/twins/dev1{API}")
    assert r.status_code == 200, r.text
    twin = r.json()
    assert r.headers["ETag"] == f'"{INITIAL_ETAG}"' == f'"{twin["etag"]}"'
    assert twin["deviceId"] == "dev1" and twin["version"] == 1 and twin["tags"] == {}
    for section in ("desired", "reported"):
        assert twin["properties"][section]["$version"] == 1
        assert "$lastUpdated" in twin["properties"][section]["$metadata"]
    for key in (
        "status",
        "statusReason",
        "statusUpdateTime",
        "connectionState",
        "lastActivityTime",
        "cloudToDeviceMessageCount",
        "authenticationType",
        "x509Thumbprint",
        "capabilities",
    ):
        assert key in twin


async def test_unknown_device_is_404(client: httpx.AsyncClient) -> None:
    for method in ("GET", "PATCH", "PUT"):
        body = None if method == "GET" else {"tags": {"a": 1}}
        r = await client.request(method, f"/twins/ghost{API}", json=body)
        assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound", (method, r.text)


async def test_patch_then_replace_with_if_match(client: httpx.AsyncClient, hub_twins: TwinService) -> None:
    await create_device(client, "dev1")
    notices: list[dict[str, Any]] = []

    async def listener(device_id: str, module_id: str | None, patch: dict[str, Any]) -> None:
        notices.append(patch)

    hub_twins.add_desired_listener(listener)
    r = await client.patch(
        f"/twins/dev1{API}",
        headers={"If-Match": '"*"'},
        json={"tags": {"loc": "x"}, "properties": {"desired": {"rate": 5}}},
    )
    assert r.status_code == 200, r.text
    twin = r.json()
    assert r.headers["ETag"] == f'"{twin["etag"]}"' and twin["version"] == 2
    assert twin["tags"] == {"loc": "x"} and twin["properties"]["desired"]["rate"] == 5
    assert notices == [{"rate": 5, "$version": 2}]

    stale = await client.patch(
        f"/twins/dev1{API}", headers={"If-Match": f'"{INITIAL_ETAG}"'}, json={"tags": {"loc": "y"}}
    )
    assert stale.status_code == 412 and stale.json()["errorCode"] == "PreconditionFailed"

    r = await client.put(
        f"/twins/dev1{API}",
        headers={"If-Match": r.headers["ETag"]},
        json={"tags": {"zone": 1}, "properties": {"desired": {"mode": "eco"}}},
    )
    assert r.status_code == 200, r.text
    twin = r.json()
    assert twin["tags"] == {"zone": 1} and twin["version"] == 3
    desired = twin["properties"]["desired"]
    assert desired["mode"] == "eco" and "rate" not in desired and desired["$version"] == 3
    assert notices[-1] == {"rate": None, "mode": "eco", "$version": 3}
    assert (await client.get(f"/twins/dev1{API}")).json() == twin


async def test_reported_update_shows_in_rest(client: httpx.AsyncClient, hub_twins: TwinService) -> None:
    await create_device(client, "dev1")
    assert await hub_twins.update_reported("dev1", {"fw": "1.2"}) == 2
    twin = (await client.get(f"/twins/dev1{API}")).json()
    assert twin["properties"]["reported"]["fw"] == "1.2" and twin["properties"]["reported"]["$version"] == 2


async def test_bad_bodies_are_400_naming_the_field(client: httpx.AsyncClient) -> None:
    await create_device(client, "dev1")
    cases = [
        ({"properties": {"reported": {"a": 1}}}, "properties.reported"),
        ({"tags": {"a.b": 1}}, "tags.a.b"),
        ({"tags": {"big": "x" * 4000, "big2": "x" * 4000, "big3": "x" * 400}}, "tags"),
        ({"unknown": 1}, "unknown"),
    ]
    for body, field in cases:
        r = await client.patch(f"/twins/dev1{API}", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["field"] == field and r.json()["errorCode"] == "ArgumentInvalid"
    r = await client.patch(f"/twins/dev1{API}", content=b"[1]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"
    r = await client.patch(f"/twins/dev1{API}", headers={"If-Match": '"a", "b"'}, json={"tags": {}})
    assert r.status_code == 400 and r.json()["field"] == "If-Match"
    assert (await client.get(f"/twins/dev1{API}")).json()["version"] == 1


async def test_permissions(hub: Hub, base_url: str, client: httpx.AsyncClient) -> None:
    await create_device(client, "dev1")
    reader = {"Authorization": await policy_token(hub, "registryRead")}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as anon:
        assert (await anon.get(f"/twins/dev1{API}")).status_code == 401
        assert (await anon.get(f"/twins/dev1{API}", headers=reader)).status_code == 200
        r = await anon.patch(f"/twins/dev1{API}", headers=reader, json={"tags": {"a": 1}})
        assert r.status_code == 403
        r = await anon.put(f"/twins/dev1{API}", headers=reader, json={"tags": {"a": 1}})
        assert r.status_code == 403
