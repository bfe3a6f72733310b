"""POST /devices/query through a real aiohttp server with httpx: headers, paging, errors, rights."""

from __future__ import annotations

import httpx
from hub_app_helpers import API, device_body

from tether.hub import Hub
from tether.messaging.twins import TwinService
from tether.storage.sql.twins import SqlTwinRepository

ACTOR = "policy:test"
QUERY = f"/devices/query{API}"


async def seed(hub: Hub, count: int) -> None:
    await hub.registry.import_devices([device_body(f"d{i:03d}") for i in range(count)], actor=ACTOR)
    twins = TwinService(SqlTwinRepository(hub.storage.db), hub.registry, hub.audit)
    for i in range(0, count, 10):
        await twins.patch(f"d{i:03d}", {"tags": {"group": "ten"}}, if_match=None, actor=ACTOR)


async def test_paging_with_continuation_over_250_devices(hub: Hub, client: httpx.AsyncClient) -> None:
    await seed(hub, 250)
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        headers = {"x-ms-max-item-count": "100"}
        if token:
            headers["x-ms-continuation"] = token
        r = await client.post(QUERY, json={"query": "SELECT * FROM devices"}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["x-ms-item-type"] == "twin"
        seen.extend(t["deviceId"] for t in r.json())
        pages += 1
        token = r.headers.get("x-ms-continuation")
        if not token:
            break
    assert seen == [f"d{i:03d}" for i in range(250)] and pages == 3


async def test_filters_projections_and_aggregates(hub: Hub, client: httpx.AsyncClient) -> None:
    await seed(hub, 30)
    r = await client.post(QUERY, json={"query": "SELECT deviceId FROM devices WHERE tags.group = 'ten'"})
    assert r.status_code == 200 and r.headers["x-ms-item-type"] == "raw"
    assert r.json() == [{"deviceId": "d000"}, {"deviceId": "d010"}, {"deviceId": "d020"}]
    assert "x-ms-continuation" not in r.headers
    r = await client.post(
        QUERY, json={"query": "SELECT tags.group, COUNT() AS n FROM devices GROUP BY tags.group"}
    )
    assert sorted(r.json(), key=lambda x: x.get("group", "")) == [{"n": 27}, {"group": "ten", "n": 3}]
    r = await client.post(QUERY, json={"query": "SELECT * FROM devices"})  # default page: 100
    assert len(r.json()) == 30


async def test_errors_name_the_field(client: httpx.AsyncClient) -> None:
    r = await client.post(QUERY, json={"query": "SELECT * FROM devices WHERE tags.x = = 1"})
    assert r.status_code == 400 and r.json()["field"] == "query"
    assert "line 1, column 38" in r.json()["Message"]
    for body, field in (
        ({"query": 5}, "query"),
        ({"query": "SELECT * FROM devices", "x": 1}, "x"),
        ({}, "query"),
    ):
        r = await client.post(QUERY, json=body)
        assert r.status_code == 400 and r.json()["field"] == field, r.text
    for value in ("abc", "0", "-3"):
        r = await client.post(
            QUERY, json={"query": "SELECT * FROM devices"}, headers={"x-ms-max-item-count": value}
        )
        assert r.status_code == 400 and r.json()["field"] == "x-ms-max-item-count"
    r = await client.post(
        QUERY, json={"query": "SELECT * FROM devices"}, headers={"x-ms-continuation": "nope"}
    )
    assert r.status_code == 400 and r.json()["field"] == "x-ms-continuation"


async def test_query_needs_registry_read(hub: Hub, client: httpx.AsyncClient) -> None:
    base = str(client.base_url)
    async with httpx.AsyncClient(base_url=base, timeout=30) as anon:
        r = await anon.post(QUERY, json={"query": "SELECT * FROM devices"})
        assert r.status_code == 401
    r = await client.post(QUERY, json={"query": "SELECT * FROM devices"})
    assert r.status_code == 200 and r.json() == []
