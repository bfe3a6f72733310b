"""Device identity CRUD over real HTTP, Azure paths and shapes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

import httpx
from api_helpers import API, create, device_body, make_hub, new_key, policy_token, serving

from tether.hub import Hub


async def test_create_get_list_stats_update_delete(client: httpx.AsyncClient) -> None:
    body = device_body("dev1")
    r = await client.put(f"/devices/dev1{API}", json=body)
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["deviceId"] == "dev1"
    assert created["etag"] and r.headers["ETag"] == f'"{created["etag"]}"'
    assert created["authentication"]["symmetricKey"] == body["authentication"]["symmetricKey"]
    assert created["status"] == "enabled" and created["connectionState"] == "Disconnected"

    r = await client.get(f"/devices/dev1{API}")
    assert r.status_code == 200 and r.json() == created

    await create(client, "dev2")
    r = await client.get(f"/devices{API}&top=10")
    assert r.status_code == 200
    assert [d["deviceId"] for d in r.json()] == ["dev1", "dev2"]

    r = await client.get(f"/statistics/devices{API}")
    assert r.json() == {"totalDeviceCount": 2, "enabledDeviceCount": 2, "disabledDeviceCount": 0}

    update = {**body, "status": "disabled", "statusReason": "maintenance"}
    r = await client.put(f"/devices/dev1{API}", json=update, headers={"If-Match": f'"{created["etag"]}"'})
    assert r.status_code == 200, r.text
    updated = r.json()
    assert updated["status"] == "disabled" and updated["statusReason"] == "maintenance"
    assert updated["etag"] != created["etag"]

    r = await client.put(f"/devices/dev1{API}", json=body, headers={"If-Match": f'"{created["etag"]}"'})
    assert r.status_code == 412
    assert r.json()["errorCode"] == "PreconditionFailed"

    r = await client.get(f"/statistics/devices{API}")
    assert r.json() == {"totalDeviceCount": 2, "enabledDeviceCount": 1, "disabledDeviceCount": 1}

    r = await client.delete(f"/devices/dev1{API}", headers={"If-Match": f'"{updated["etag"]}"'})
    assert r.status_code == 204 and r.content == b""
    r = await client.get(f"/devices/dev1{API}")
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound"


async def test_create_existing_is_409(client: httpx.AsyncClient) -> None:
    await create(client, "dup")
    r = await client.put(f"/devices/dup{API}", json=device_body("dup"))
    assert r.status_code == 409
    assert r.json()["errorCode"] == "DeviceAlreadyExists"


async def test_unknown_device_is_404_everywhere(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"/devices/ghost{API}")).status_code == 404
    assert (await client.get(f"/twins/ghost{API}")).status_code == 404
    r = await client.delete(f"/devices/ghost{API}", headers={"If-Match": "*"})
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound"
    r = await client.put(f"/devices/ghost{API}", json=device_body("ghost"), headers={"If-Match": "*"})
    assert r.status_code == 404


async def test_replace_with_wildcard_and_delete_without_if_match(client: httpx.AsyncClient) -> None:
    await create(client, "w")
    r = await client.put(f"/devices/w{API}", json=device_body("w", status="disabled"),
                         headers={"If-Match": "*"})
    assert r.status_code == 200 and r.json()["status"] == "disabled"
    r = await client.delete(f"/devices/w{API}")  # documented: missing If-Match = unconditional
    assert r.status_code == 204
    assert (await client.get(f"/devices/w{API}")).status_code == 404


async def test_stale_etag_delete_is_412(client: httpx.AsyncClient) -> None:
    first = await create(client, "d")
    r = await client.put(f"/devices/d{API}", json=device_body("d"), headers={"If-Match": "*"})
    assert r.status_code == 200
    r = await client.delete(f"/devices/d{API}", headers={"If-Match": f'"{first["etag"]}"'})
    assert r.status_code == 412
    assert (await client.get(f"/devices/d{API}")).status_code == 200


async def test_generated_keys_when_omitted(client: httpx.AsyncClient) -> None:
    r = await client.put(f"/devices/gen{API}", json={"deviceId": "gen"})
    assert r.status_code == 200, r.text
    keys = r.json()["authentication"]["symmetricKey"]
    assert keys["primaryKey"] and keys["secondaryKey"]


async def test_body_without_device_id_takes_the_path_id(client: httpx.AsyncClient) -> None:
    r = await client.put(f"/devices/implicit{API}", json={"status": "enabled"})
    assert r.status_code == 200, r.text
    assert r.json()["deviceId"] == "implicit"


async def test_device_id_with_special_characters_round_trips(client: httpx.AsyncClient) -> None:
    device_id = "a%b:c=d@e$f'g(h)!*,.?_-"
    path = f"/devices/{quote(device_id, safe='')}{API}"
    r = await client.put(path, json=device_body(device_id))
    assert r.status_code == 200, r.text
    r = await client.get(path)
    assert r.status_code == 200 and r.json()["deviceId"] == device_id


async def test_list_pages_with_continuation(client: httpx.AsyncClient) -> None:
    ids = [f"p{i:02d}" for i in range(7)]
    for device_id in ids:
        await create(client, device_id)
    seen: list[str] = []
    headers: dict[str, str] = {}
    for _ in range(10):
        r = await client.get(f"/devices{API}&top=3", headers=headers)
        assert r.status_code == 200
        page = [d["deviceId"] for d in r.json()]
        seen += page
        if "x-ms-continuation" not in r.headers:
            break
        headers = {"x-ms-continuation": r.headers["x-ms-continuation"]}
    assert seen == ids


async def test_list_top_out_of_range_means_1000_and_bad_top_is_400(client: httpx.AsyncClient) -> None:
    await create(client, "t1")
    r = await client.get(f"/devices{API}&top=5000")
    assert r.status_code == 200 and len(r.json()) == 1
    r = await client.get(f"/devices{API}&top=ten")
    assert r.status_code == 400 and r.json()["field"] == "top"


async def test_twin_shape(client: httpx.AsyncClient) -> None:
    await create(client, "tw")
    r = await client.get(f"/twins/tw{API}")
    assert r.status_code == 200, r.text
    twin = r.json()
    for key in ("deviceId", "etag", "version", "status", "statusReason", "statusUpdateTime",
                "connectionState", "lastActivityTime", "cloudToDeviceMessageCount",
                "authenticationType", "x509Thumbprint", "capabilities", "tags", "properties"):
        assert key in twin, key
    assert twin["deviceId"] == "tw" and twin["version"] == 1 and twin["tags"] == {}
    assert twin["authenticationType"] == "sas"
    for side in ("desired", "reported"):
        assert twin["properties"][side]["$version"] == 1
        assert "$lastUpdated" in twin["properties"][side]["$metadata"]


async def test_enable_disable_and_regenerate_key(client: httpx.AsyncClient) -> None:
    created = await create(client, "conv")
    r = await client.post(f"/tether/devices/conv/disable{API}", json={"reason": "stolen"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "disabled" and r.json()["statusReason"] == "stolen"
    r = await client.post(f"/tether/devices/conv/enable{API}")
    assert r.status_code == 200 and r.json()["status"] == "enabled"
    r = await client.post(f"/tether/devices/conv/regenerate-key{API}&key=secondary")
    assert r.status_code == 200
    old, new = created["authentication"]["symmetricKey"], r.json()["authentication"]["symmetricKey"]
    assert new["primaryKey"] == old["primaryKey"] and new["secondaryKey"] != old["secondaryKey"]
    r = await client.post(f"/tether/devices/conv/regenerate-key{API}&key=tertiary")
    assert r.status_code == 400 and r.json()["field"] == "key"
    r = await client.post(f"/tether/devices/conv/disable{API}", json={"why": "x"})
    assert r.status_code == 400 and r.json()["field"] == "why"


async def test_registry_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    key = new_key()
    hub = make_hub(data_dir)
    await hub.open()
    try:
        async with serving(hub) as url, httpx.AsyncClient(
            base_url=url, headers={"Authorization": await policy_token(hub)}
        ) as c:
            body = device_body("keeper")
            body["authentication"]["symmetricKey"]["primaryKey"] = key
            assert (await c.put(f"/devices/keeper{API}", json=body)).status_code == 200
    finally:
        await hub.close()

    hub = make_hub(data_dir)
    await hub.open()
    try:
        async with serving(hub) as url, httpx.AsyncClient(
            base_url=url, headers={"Authorization": await policy_token(hub)}
        ) as c:
            r = await c.get(f"/devices/keeper{API}")
            assert r.status_code == 200
            assert r.json()["authentication"]["symmetricKey"]["primaryKey"] == key
    finally:
        await hub.close()


async def test_concurrent_updates_with_same_etag_one_wins(client: httpx.AsyncClient) -> None:
    created = await create(client, "race")
    headers = {"If-Match": f'"{created["etag"]}"'}

    async def update(reason: str) -> httpx.Response:
        return await client.put(f"/devices/race{API}", json=device_body("race", statusReason=reason),
                                headers=headers)

    results = await asyncio.gather(update("a"), update("b"))
    assert sorted(r.status_code for r in results) == [200, 412]


async def test_writes_are_audited_with_the_policy_as_actor(client: httpx.AsyncClient, hub: Hub) -> None:
    await create(client, "aud")
    await hub.audit.flush()
    records = await hub.audit.query(action_prefix="device.", principal="policy:registryReadWrite")
    assert any(r.target == "aud" for r in records), records
