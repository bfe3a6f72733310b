"""Module identities over the REST API on SQLite and PostgreSQL: Azure's PUT/GET/DELETE semantics,
validation, module twins, module telemetry over HTTPS, `FROM devices.modules` queries, audit."""

from __future__ import annotations

import time
from typing import Any

import httpx
from hub_app_helpers import API, HOST, create_device, policy_token

from tether.hub import Hub
from tether.messaging.query.service import _Cursor, encode_token
from tether.security.sas import build_token
from tether.storage.base import AuditRecord

MODULE = "/devices/{d}/modules/{m}" + API
TWIN = "/twins/{d}/modules/{m}" + API
QUERY = f"/devices/query{API}"


def module_path(device_id: str, module_id: str) -> str:
    return MODULE.format(d=device_id, m=module_id)


async def put_module(client: httpx.AsyncClient, device_id: str, module_id: str,
                     body: dict[str, Any] | None = None, *, if_match: str | None = None) -> httpx.Response:
    headers = {"If-Match": if_match} if if_match else {}
    return await client.put(module_path(device_id, module_id),
                            json={"moduleId": module_id, **(body or {})}, headers=headers)


async def audit(hub: Hub, prefix: str) -> list[AuditRecord]:
    await hub.audit.flush()
    return await hub.audit.query(limit=1000, action_prefix=prefix)


async def test_create_get_replace_delete_follow_azure(hub: Hub, client: httpx.AsyncClient) -> None:
    await create_device(client, "dev")
    # The Node SDK's addModule: empty keys mean "generate".
    r = await put_module(client, "dev", "mod", {"deviceId": "dev", "authentication": {
        "type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": ""}}})
    assert r.status_code == 200, r.text
    created = r.json()
    assert r.headers["ETag"] == f'"{created["etag"]}"'
    assert set(created) == {"moduleId", "deviceId", "managedBy", "generationId", "etag", "connectionState",
                            "connectionStateUpdatedTime", "lastActivityTime", "cloudToDeviceMessageCount",
                            "authentication"}
    keys = created["authentication"]["symmetricKey"]
    assert keys["primaryKey"] and keys["secondaryKey"] and created["generationId"]
    assert (created["connectionState"], created["cloudToDeviceMessageCount"]) == ("Disconnected", 0)
    assert created["connectionStateUpdatedTime"] == "0001-01-01T00:00:00Z"

    r = await put_module(client, "dev", "mod")
    assert r.status_code == 409 and r.json()["errorCode"] == "ModuleAlreadyExistsOnDevice"
    assert (await client.get(module_path("dev", "mod"))).json() == created

    # Replace: an echoed module with server-managed fields changed is fine; keys left out are kept.
    echoed = {**created, "managedBy": "IotEdge", "generationId": "x", "etag": "y",
              "connectionState": "Connected",
              "authentication": {"type": "sas", "symmetricKey": {"primaryKey": keys["primaryKey"]}}}
    r = await client.put(module_path("dev", "mod"), json=echoed,
                         headers={"If-Match": f'"{created["etag"]}"'})
    assert r.status_code == 200, r.text
    replaced = r.json()
    assert replaced["managedBy"] == "IotEdge" and replaced["generationId"] == created["generationId"]
    assert replaced["authentication"]["symmetricKey"] == keys and replaced["etag"] != created["etag"]
    assert replaced["connectionState"] == "Disconnected"
    r = await put_module(client, "dev", "mod", if_match=f'"{created["etag"]}"')
    assert r.status_code == 412

    other = (await put_module(client, "dev", "a-first")).json()
    r = await client.get(f"/devices/dev/modules{API}")
    assert r.status_code == 200 and [m["moduleId"] for m in r.json()] == ["a-first", "mod"]

    r = await client.delete(module_path("dev", "mod"), headers={"If-Match": f'"{created["etag"]}"'})
    assert r.status_code == 412
    r = await client.delete(module_path("dev", "mod"), headers={"If-Match": f'"{replaced["etag"]}"'})
    assert r.status_code == 204
    r = await client.get(module_path("dev", "mod"))
    assert r.status_code == 404 and r.json()["errorCode"] == "ModuleNotFound"
    r = await client.delete(module_path("dev", "mod"), headers={"If-Match": "*"})
    assert r.status_code == 404 and r.json()["errorCode"] == "ModuleNotFound"
    # A module re-created with the same id is a new generation.
    again = (await put_module(client, "dev", "mod")).json()
    assert again["generationId"] != created["generationId"]
    assert other["moduleId"] == "a-first"

    records = {(r.action, r.target) for r in await audit(hub, "module.")}
    assert {("module.create", "dev/mod"), ("module.update", "dev/mod"), ("module.delete", "dev/mod"),
            ("module.create", "dev/a-first")} <= records


async def test_bad_requests_name_the_field_and_write_nothing(hub: Hub, client: httpx.AsyncClient) -> None:
    await create_device(client, "dev")
    cases: list[tuple[str, str, dict[str, Any], str]] = [
        ("dev", "m", {"moduleId": "other"}, "moduleId"),
        ("dev", "m", {"deviceId": "other"}, "deviceId"),
        ("dev", "m", {"status": "disabled"}, "status"),
        ("dev", "m", {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": "not base64!"}}},
         "authentication.symmetricKey.primaryKey"),
        ("dev", "m", {"authentication": {"type": "selfSigned"}},
         "authentication.x509Thumbprint.primaryThumbprint"),
        ("dev", "m", {"authentication": {"type": "sas", "x509Thumbprint": {"primaryThumbprint": "AB" * 20}}},
         "authentication.x509Thumbprint"),
        ("dev", "m", {"managedBy": "x" * 200}, "managedBy"),
        ("dev", "bad/id", {}, ""),
        ("dev", "a" * 129, {}, "moduleId"),
    ]
    for device_id, module_id, body, field in cases:
        r = await client.put(f"/devices/{device_id}/modules/{module_id}{API}", json=body)
        assert r.status_code in (400, 404), (module_id, body, r.text)
        if field:
            assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)
    r = await client.put(module_path("dev", "m"), content=b"[1]",
                         headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = await put_module(client, "ghost", "m")
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound"
    r = await client.get(f"/devices/ghost/modules{API}")
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound"
    r = await client.get(module_path("ghost", "m"))
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound"
    assert (await client.get(f"/devices/dev/modules{API}")).json() == []
    assert await audit(hub, "module.") == []


async def test_rights_and_the_module_limit(hub: Hub, client: httpx.AsyncClient) -> None:
    await create_device(client, "dev")
    reader = {"Authorization": await policy_token(hub, "registryRead")}
    r = await client.put(module_path("dev", "m"), json={}, headers=reader)
    assert r.status_code == 403
    assert (await put_module(client, "dev", "m")).status_code == 200
    assert (await client.get(module_path("dev", "m"), headers=reader)).status_code == 200
    r = await client.delete(module_path("dev", "m"), headers=reader)
    assert r.status_code == 403
    r = await client.get(module_path("dev", "m"), headers={"Authorization": ""})
    assert r.status_code == 401
    hub.modules.max_per_device = 2
    assert (await put_module(client, "dev", "m2")).status_code == 200
    r = await put_module(client, "dev", "m3")
    assert r.status_code == 403 and r.json()["errorCode"] == "IotHubQuotaExceeded"


async def test_deleting_the_device_deletes_its_modules_and_their_twins(client: httpx.AsyncClient) -> None:
    await create_device(client, "dev")
    await put_module(client, "dev", "m")
    r = await client.patch(TWIN.format(d="dev", m="m"), json={"tags": {"site": "a"}})
    assert r.status_code == 200 and r.json()["version"] == 2
    assert (await client.delete(f"/devices/dev{API}", headers={"If-Match": "*"})).status_code == 204
    r = await client.get(module_path("dev", "m"))
    assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound"
    await create_device(client, "dev")
    assert (await client.get(f"/devices/dev/modules{API}")).json() == []
    await put_module(client, "dev", "m")
    twin = (await client.get(TWIN.format(d="dev", m="m"))).json()
    assert twin["version"] == 1 and twin["tags"] == {}  # a fresh twin, not the deleted module's


async def test_module_twins_over_rest(hub: Hub, client: httpx.AsyncClient) -> None:
    await create_device(client, "dev")
    module = (await put_module(client, "dev", "m", {"authentication": {
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "CD" * 20}}})).json()
    path = TWIN.format(d="dev", m="m")
    twin = (await client.get(path)).json()
    assert (twin["deviceId"], twin["moduleId"], twin["version"]) == ("dev", "m", 1)
    assert twin["etag"] == "AAAAAAAAAAE="
    assert twin["deviceEtag"] == module["etag"] and twin["authenticationType"] == "selfSigned"
    assert twin["x509Thumbprint"]["primaryThumbprint"] == "CD" * 20 and "capabilities" not in twin
    assert twin["status"] == "enabled" and twin["cloudToDeviceMessageCount"] == 0
    r = await client.patch(path, json={"tags": {"a": 1}, "properties": {"desired": {"x": 1}}},
                           headers={"If-Match": f'"{twin["etag"]}"'})
    assert r.status_code == 200 and r.headers["ETag"] == f'"{r.json()["etag"]}"'
    patched = r.json()
    r = await client.patch(path, json={"tags": {"a": 2}}, headers={"If-Match": f'"{twin["etag"]}"'})
    assert r.status_code == 412
    r = await client.put(path, json={**patched, "tags": {"b": 1}, "properties": {"desired": {"y": 2}}})
    assert r.status_code == 200
    replaced = r.json()
    assert replaced["tags"] == {"b": 1} and "x" not in replaced["properties"]["desired"]
    assert replaced["properties"]["desired"]["y"] == 2 and replaced["properties"]["desired"]["$version"] == 3
    r = await client.patch(path, json={"moduleId": "other", "tags": {}})
    assert r.status_code == 400 and r.json()["field"] == "moduleId"
    r = await client.patch(path, json={"properties": {"reported": {"x": 1}}})
    assert r.status_code == 400
    for method in ("GET", "PATCH", "PUT"):
        body = None if method == "GET" else {"tags": {}}
        r = await client.request(method, TWIN.format(d="dev", m="ghost"), json=body)
        assert r.status_code == 404 and r.json()["errorCode"] == "ModuleNotFound", (method, r.text)
        r = await client.request(method, TWIN.format(d="ghost", m="m"), json=body)
        assert r.status_code == 404 and r.json()["errorCode"] == "DeviceNotFound", (method, r.text)
    device_twin = (await client.get(f"/twins/dev{API}")).json()
    assert device_twin["version"] == 1 and "moduleId" not in device_twin
    records = [r for r in await audit(hub, "twin.") if r.target == "dev/m"]
    assert [r.action for r in reversed(records)] == ["twin.update", "twin.replace"]


async def test_regenerating_a_module_key(hub: Hub, client: httpx.AsyncClient) -> None:
    await create_device(client, "dev")
    before = (await put_module(client, "dev", "m")).json()["authentication"]["symmetricKey"]
    r = await client.post(f"/tether/devices/dev/modules/m/regenerate-key{API}&key=secondary")
    assert r.status_code == 200, r.text
    after = r.json()["authentication"]["symmetricKey"]
    assert after["primaryKey"] == before["primaryKey"] and after["secondaryKey"] != before["secondaryKey"]
    await put_module(client, "dev", "x509", {"authentication": {"type": "certificateAuthority"}})
    r = await client.post(f"/tether/devices/dev/modules/x509/regenerate-key{API}")
    assert r.status_code == 400
    assert [r.details for r in await audit(hub, "module.regenerate-key")] == [{"which": "secondary"}]


def module_token(device_id: str, module_id: str, key: str, resource: str | None = None) -> str:
    return build_token(resource or f"{HOST}/devices/{device_id}/modules/{module_id}", key,
                       int(time.time()) + 3600)


async def test_module_telemetry_over_https(hub: Hub, client: httpx.AsyncClient) -> None:
    device = await create_device(client, "dev")
    module = (await put_module(client, "dev", "m")).json()
    other = (await put_module(client, "dev", "other")).json()
    key = module["authentication"]["symmetricKey"]["primaryKey"]
    events = f"/devices/dev/modules/m/messages/events{API}"
    r = await client.post(events, content=b'{"t": 21}', headers={
        "Authorization": module_token("dev", "m", key), "iothub-messageid": "m-1", "iothub-app-zone": "a"})
    assert r.status_code == 204, r.text
    stored = [e for e in await hub.stream.read(hub.stream.partition_for("dev"), max_count=100)
              if e.device_id == "dev"]
    assert [(e.module_id, e.body, e.properties) for e in stored] == [("m", b'{"t": 21}', {"zone": "a"})]
    assert stored[0].system_properties["iothub-connection-module-id"] == "m"
    assert stored[0].system_properties["message-id"] == "m-1"

    device_key = device["authentication"]["symmetricKey"]["primaryKey"]
    refused = {
        "device token": build_token(f"{HOST}/devices/dev", device_key, int(time.time()) + 3600),
        "other module's token": module_token("dev", "other",
                                             other["authentication"]["symmetricKey"]["primaryKey"]),
        "module key, device scope": module_token("dev", "m", key, resource=f"{HOST}/devices/dev"),
    }
    for what, token in refused.items():
        r = await client.post(events, content=b"x", headers={"Authorization": token})
        assert r.status_code == 401, (what, r.text)
    # And a module's token is not the device's.
    r = await client.post(f"/devices/dev/messages/events{API}", content=b"x",
                          headers={"Authorization": module_token("dev", "m", key)})
    assert r.status_code == 401
    await hub.audit.flush()
    records = await hub.audit.query(limit=100, action_prefix="auth.https")
    scopes = [r.details.get("tokenScope") for r in records if r.reason == "wrong-scope"]
    assert sorted(scopes) == ["device", "device", "module", "module"]
    assert len([e for e in await hub.stream.read(hub.stream.partition_for("dev"), max_count=100)
                if e.device_id == "dev"]) == 1  # nothing refused was stored


async def query(client: httpx.AsyncClient, text: str, **headers: str) -> httpx.Response:
    return await client.post(QUERY, json={"query": text}, headers=headers)


async def test_queries_over_module_twins(hub: Hub, client: httpx.AsyncClient) -> None:
    for device_id in ("d1", "d2", "d3"):
        await create_device(client, device_id)
    for device_id, module_id in (("d1", "b"), ("d1", "a"), ("d3", "a"), ("d3", "z")):
        await put_module(client, device_id, module_id)
    await client.patch(TWIN.format(d="d1", m="b"), json={"tags": {"role": "edge"}})
    await client.patch(TWIN.format(d="d3", m="z"), json={"tags": {"role": "edge"}})
    await client.patch(f"/twins/d2{API}", json={"tags": {"role": "edge"}})  # a device, not a module

    r = await query(client, "SELECT * FROM devices.modules WHERE tags.role = 'edge'")
    assert r.status_code == 200 and r.headers["x-ms-item-type"] == "twin"
    assert [(t["deviceId"], t["moduleId"]) for t in r.json()] == [("d1", "b"), ("d3", "z")]
    assert "x-ms-continuation" not in r.headers

    seen: list[tuple[str, str]] = []
    token = None
    while True:
        headers = {"x-ms-max-item-count": "1", **({"x-ms-continuation": token} if token else {})}
        r = await query(client, "SELECT * FROM devices.modules", **headers)
        assert r.status_code == 200, r.text
        seen += [(t["deviceId"], t["moduleId"]) for t in r.json()]
        token = r.headers.get("x-ms-continuation")
        if not token:
            break
    assert seen == [("d1", "a"), ("d1", "b"), ("d3", "a"), ("d3", "z")]

    r = await query(client, "SELECT deviceId, moduleId FROM devices.modules WHERE deviceId = 'd3'")
    assert r.headers["x-ms-item-type"] == "raw" and r.json() == [
        {"deviceId": "d3", "moduleId": "a"}, {"deviceId": "d3", "moduleId": "z"}]
    r = await query(client, "SELECT tags.role, COUNT() AS n FROM devices.modules GROUP BY tags.role")
    assert sorted(r.json(), key=lambda row: row.get("role", "")) == [{"n": 2}, {"role": "edge", "n": 2}]
    r = await query(client, "SELECT * FROM devices WHERE tags.role = 'edge'")
    assert [t["deviceId"] for t in r.json()] == ["d2"] and "moduleId" not in r.json()[0]

    # A token holding a device cursor is not a position among module twins (crafted: same query hash).
    text = "SELECT * FROM devices.modules"
    crafted = encode_token(text, _Cursor(after="d1"))
    r = await query(client, text, **{"x-ms-continuation": crafted})
    assert r.status_code == 400 and r.json()["field"] == "x-ms-continuation"
    r = await query(client, text, **{"x-ms-continuation": encode_token(text, _Cursor(after=("d1", "a")))})
    assert [(t["deviceId"], t["moduleId"]) for t in r.json()] == [("d1", "b"), ("d3", "a"), ("d3", "z")]
