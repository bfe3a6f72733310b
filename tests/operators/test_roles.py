"""Roles on every route: a Data Reader sees but changes nothing, a scoped role sees and touches only
its devices, keys only for the roles that may rewrite identities, owner-only operations stay owner
only; the audit names the person and issuer on calls and changes."""

from __future__ import annotations

from typing import Any

import httpx
from operator_helpers import API, PASSWORD, OperatorEnv

from tether.api.operator_guard import classify
from tether.security.principal import Permission
from tether.security.roles import Access, Area, Role, RoleGrant, decide, parse_role, rights_of

ID = 'tags.site = \'a\''


async def seed(env: OperatorEnv) -> None:
    body: dict[str, Any] = {"authentication": {"type": "sas"}}
    for device_id, site in (("dev-a", "a"), ("dev-b", "b"), ("dev-a2", "a")):
        await env.hub.registry.create(device_id, dict(body), actor="test")
        await env.hub.twins.patch(device_id, {"tags": {"site": site}}, if_match=None, actor="test")


async def signed_in(env: OperatorEnv, username: str, *roles: tuple[str, str | None]) -> httpx.AsyncClient:
    await env.hub.operators.add(username, PASSWORD, actor="test")
    for role, scope in roles:
        await env.hub.roles.assign("local", username, role, scope, actor="test")
    r = await env.login(username)
    assert r.status_code == 200, r.text
    return env.session_client(r)


def test_roles_map_to_policy_rights() -> None:
    assert rights_of(Role.owner) == frozenset(Permission)
    assert rights_of(Role.data_reader) == {Permission.registry_read, Permission.service_connect}
    assert rights_of(Role.twin_contributor) == {Permission.registry_read, Permission.registry_write}
    assert Permission.service_connect not in rights_of(Role.registry_contributor)
    assert parse_role("IoT Hub Registry Contributor") is Role.registry_contributor
    grants = (RoleGrant(Role.twin_contributor, ID), RoleGrant(Role.data_reader))
    assert decide(grants, Area.twins, Access.write).scopes == (ID,)
    assert decide(grants, Area.twins, Access.read).scopes is None
    assert not decide(grants, Area.service, Access.write).allowed


async def test_data_reader_sees_but_cannot_change_anything(env: OperatorEnv) -> None:
    await seed(env)
    async with await signed_in(env, "reader", ("DataReader", None)) as c:
        assert (await c.get(f"/devices{API}")).status_code == 200
        device = (await c.get(f"/devices/dev-a{API}")).json()
        assert device["authentication"]["symmetricKey"]["primaryKey"] is None  # keys hidden
        assert (await c.get(f"/twins/dev-a{API}")).status_code == 200
        everything = {"query": "SELECT * FROM devices"}
        assert (await c.post(f"/devices/query{API}", json=everything)).status_code == 200
        assert (await c.get(f"/tether/audit{API}")).status_code == 200
        writes = [
            c.put(f"/devices/new{API}", json={}), c.delete(f"/devices/dev-a{API}"),
            c.patch(f"/twins/dev-a{API}", json={"tags": {"x": 1}}),
            c.post(f"/tether/devices/dev-a/disable{API}", json={}),
            c.post(f"/tether/devices/dev-a/regenerate-key{API}"),
            c.post(f"/devices/dev-a/messages/deviceBound{API}", content=b"hi"),
            c.post(f"/twins/dev-a/methods{API}", json={"methodName": "reboot"}),
            c.post(f"/devices{API}", json=[{"id": "z", "importMode": "create"}]),
            c.get(f"/tether/devices/export{API}"),
            c.get(f"/tether/policies{API}&keys=true"),
            c.put(f"/tether/policies/mine{API}", json={"rights": ["RegistryRead"]}),
            c.post(f"/tether/admin/tls/reload{API}"),
        ]
        for request in writes:
            r = await request
            assert r.status_code == 403, (r.request.method, r.request.url, r.text)
        refused = await env.audit("auth.rest", "refused", limit=30)
        assert {r.reason for r in refused} <= {"missing-role", "missing-permission"}
        assert all(r.principal == "user:reader" for r in refused)
    devices = {d.device_id for d in await env.hub.registry.list(top=10)}
    assert devices == {"dev-a", "dev-b", "dev-a2"}  # nothing changed


async def test_scoped_role_cannot_read_or_touch_another_sites_device(env: OperatorEnv) -> None:
    await seed(env)
    async with await signed_in(env, "site-a", ("DataContributor", ID)) as c:
        assert (await c.get(f"/devices/dev-a{API}")).status_code == 200
        desired = {"properties": {"desired": {"v": 1}}}
        assert (await c.patch(f"/twins/dev-a{API}", json=desired)).status_code == 200
        for request in (c.get(f"/devices/dev-b{API}"), c.get(f"/twins/dev-b{API}"),
                        c.patch(f"/twins/dev-b{API}", json={"tags": {"site": "a"}}),
                        c.delete(f"/devices/dev-b{API}"), c.post(f"/tether/devices/dev-b/disable{API}"),
                        c.post(f"/devices/dev-b/messages/deviceBound{API}", content=b"x"),
                        c.post(f"/twins/dev-b/methods{API}", json={"methodName": "m"}),
                        c.get(f"/tether/events/stream{API}&device=dev-b"),
                        c.get(f"/tether/events/stream{API}"), c.get(f"/statistics/devices{API}"),
                        c.get(f"/tether/audit{API}")):
            r = await request
            assert r.status_code == 403, (r.request.method, r.request.url, r.text)
        assert (await env.last_refusal()).reason == "out-of-scope"
        listed = {d["deviceId"] for d in (await c.get(f"/devices{API}")).json()}
        assert listed == {"dev-a", "dev-a2"}
        queried = (await c.post(f"/devices/query{API}", json={"query": "SELECT * FROM devices"})).json()
        assert {d["deviceId"] for d in queried} == {"dev-a", "dev-a2"}
        counted = (await c.post(f"/devices/query{API}",
                                json={"query": "SELECT COUNT() AS n FROM devices"})).json()
        assert counted == [{"n": 2}]
    twin_b = await env.hub.twins.get("dev-b")
    assert twin_b["tags"] == {"site": "b"}


async def test_twin_contributor_writes_twins_not_identities_and_sees_no_keys(env: OperatorEnv) -> None:
    await seed(env)
    async with await signed_in(env, "twins", ("TwinContributor", None)) as c:
        assert (await c.patch(f"/twins/dev-b{API}", json={"tags": {"floor": 2}})).status_code == 200
        assert (await c.put(f"/devices/new{API}", json={})).status_code == 403
        keys = (await c.get(f"/devices/dev-b{API}")).json()["authentication"]["symmetricKey"]
        assert keys["primaryKey"] is None and keys["secondaryKey"] is None


async def test_registry_contributor_sees_keys_and_changes_name_the_issuer(env: OperatorEnv) -> None:
    await seed(env)
    async with await signed_in(env, "registrar", ("RegistryContributor", None)) as c:
        device = (await c.get(f"/devices/dev-a{API}")).json()
        assert device["authentication"]["symmetricKey"]["primaryKey"]
        assert (await c.post(f"/tether/devices/dev-a/disable{API}", json={})).status_code == 200
        assert (await c.patch(f"/twins/dev-a{API}", json={"tags": {"x": 1}})).status_code == 403
    change = (await env.audit("device.", limit=1))[0]
    assert change.principal == "user:registrar"
    assert change.details.get("issuer") == "local"


async def test_data_contributor_cannot_read_policy_keys_or_manage_policies(env: OperatorEnv) -> None:
    async with await signed_in(env, "contrib", ("DataContributor", None)) as c:
        assert (await c.get(f"/tether/policies{API}")).status_code == 200
        assert (await c.get(f"/tether/policies{API}&keys=true")).status_code == 403
        assert (await c.delete(f"/tether/policies/service{API}")).status_code == 403
    async with await signed_in(env, "boss", ("Owner", None)) as c:
        listed = (await c.get(f"/tether/policies{API}&keys=true")).json()
        assert all(p.get("primaryKey") for p in listed)


async def test_console_me_tells_the_console_what_to_offer(env: OperatorEnv) -> None:
    async with await signed_in(env, "viewer", ("DataReader", None)) as c:
        me = (await c.get("/console/api/me")).json()
        assert me["user"] == "user:viewer" and me["csrf"]
        assert me["can"] == {"registryWrite": False, "twinsWrite": False, "service": False, "telemetry": True,
                             "audit": True, "admin": False, "keys": False}


def test_unclassified_routes_need_an_owner() -> None:
    class Fake:
        method = "POST"
        path = "/tether/something/new"
        query: dict[str, str] = {}
        match_info: dict[str, str] = {}

    op = classify(Fake())  # type: ignore[arg-type]
    assert (op.area, op.access) == (Area.admin, Access.write)


async def test_module_routes_follow_the_device_rules(env: OperatorEnv) -> None:
    """Module identities are registry (keys hidden as for devices), module twins are twins, and a
    scoped role reaches only the modules of its devices."""
    await seed(env)
    for device_id in ("dev-a", "dev-b"):
        await env.hub.modules.create(device_id, "edge", {}, actor="test")
    async with await signed_in(env, "reader", ("DataReader", None)) as c:
        module = (await c.get(f"/devices/dev-a/modules/edge{API}")).json()
        assert module["moduleId"] == "edge" and module["authentication"]["symmetricKey"]["primaryKey"] is None
        listed = (await c.get(f"/devices/dev-a/modules{API}")).json()
        assert [m["authentication"]["symmetricKey"]["primaryKey"] for m in listed] == [None]
        assert (await c.get(f"/twins/dev-a/modules/edge{API}")).status_code == 200
        for request in (c.put(f"/devices/dev-a/modules/new{API}", json={}),
                        c.delete(f"/devices/dev-a/modules/edge{API}"),
                        c.patch(f"/twins/dev-a/modules/edge{API}", json={"tags": {"x": 1}}),
                        c.post(f"/tether/devices/dev-a/modules/edge/regenerate-key{API}"),
                        c.post(f"/twins/dev-a/modules/edge/methods{API}", json={"methodName": "m"})):
            r = await request
            assert r.status_code == 403, (r.request.method, r.request.url, r.text)
    async with await signed_in(env, "twins", ("TwinContributor", ID)) as c:
        r = await c.patch(f"/twins/dev-a/modules/edge{API}", json={"tags": {"floor": 1}})
        assert r.status_code == 200, r.text
        r = await c.patch(f"/twins/dev-b/modules/edge{API}", json={"tags": {"floor": 1}})
        assert r.status_code == 403
        assert (await env.last_refusal()).reason == "out-of-scope"
        assert (await c.put(f"/devices/dev-a/modules/new{API}", json={})).status_code == 403
    async with await signed_in(env, "registrar", ("RegistryContributor", None)) as c:
        r = await c.put(f"/devices/dev-b/modules/new{API}", json={})
        assert r.status_code == 200 and r.json()["authentication"]["symmetricKey"]["primaryKey"]
    # A module twin tagged like another site does not widen a scope: the module's device decides.
    await env.hub.twins.patch("dev-b", {"tags": {"site": "a"}}, module_id="edge", if_match=None, actor="test")
    async with await signed_in(env, "site-a", ("DataReader", ID)) as c:
        query = {"query": "SELECT * FROM devices.modules"}
        twins = (await c.post(f"/devices/query{API}", json=query)).json()
        seen = [(t["deviceId"], t["moduleId"]) for t in twins]
        assert seen == [("dev-a", "edge")]
        count = {"query": "SELECT COUNT() AS n FROM devices.modules WHERE tags.site = 'a'"}
        assert (await c.post(f"/devices/query{API}", json=count)).json() == [{"n": 0}]


async def test_jobs_and_configurations_are_read_by_readers_and_changed_by_data_contributors(
        env: OperatorEnv) -> None:
    """Azure grants jobs and configurations to Data Contributor (`IotHubs/*`) and, to read, Data Reader
    (`IotHubs/*/read`); a Registry or Twin Contributor holds RegistryReadWrite but neither area."""
    await seed(env)
    job = {"jobId": "j1", "type": "scheduleUpdateTwin", "queryCondition": "deviceId = 'dev-a'",
           "updateTwin": {"etag": "*", "tags": {"fw": "2"}}}
    config = {"id": "c1", "targetCondition": "tags.site = 'a'", "priority": 1,
              "content": {"deviceContent": {"properties.desired.fw": 2}}}
    async with await signed_in(env, "contrib", ("DataContributor", None)) as c:
        r = await c.put(f"/jobs/v2/j1{API}", json=job)
        assert r.status_code == 200, r.text
        r = await c.put(f"/configurations/c1{API}", json=config)
        assert r.status_code in (200, 201), r.text
    async with await signed_in(env, "reader", ("DataReader", None)) as c:
        for path in ("/jobs/v2/j1", "/jobs/v2/query", "/jobs", "/configurations", "/configurations/c1"):
            r = await c.get(f"{path}{API}")
            assert r.status_code == 200, (path, r.text)
        assert (await c.get(f"/messages/serviceBound/filenotifications{API}")).status_code == 204
        writes = [
            c.put(f"/jobs/v2/j2{API}", json={**job, "jobId": "j2"}),
            c.post(f"/jobs/v2/j1/cancel{API}"),
            c.post(f"/jobs/create{API}", json={"type": "export", "outputBlobContainerUri": "https://x/c?sig=1"}),
            c.put(f"/configurations/c2{API}", json={**config, "id": "c2"}),
            c.delete(f"/configurations/c1{API}"),
            c.post(f"/configurations/testQueries{API}", json={"targetCondition": "*"}),
            c.post(f"/devices/dev-a/applyConfigurationContent{API}", json={"deviceContent": {}}),
        ]
        for request in writes:
            r = await request
            assert r.status_code == 403, (r.request.method, r.request.url, r.text)
        refused = await env.audit("auth.rest", "refused", limit=10)
        assert {r.reason for r in refused} <= {"missing-role", "missing-permission"}
        assert all(r.principal == "user:reader" for r in refused[:len(writes)])
    for role in ("RegistryContributor", "TwinContributor"):
        async with await signed_in(env, role.lower(), (role, None)) as c:
            assert (await c.put(f"/jobs/v2/j3{API}", json={**job, "jobId": "j3"})).status_code == 403
            assert (await env.last_refusal()).reason == "missing-role"
            assert (await c.put(f"/configurations/c3{API}", json={**config, "id": "c3"})).status_code == 403
            assert (await c.get(f"/configurations{API}")).status_code == 403
    assert [j["jobId"] for j in await env.hub.jobs.query_device_jobs(None, None)] == ["j1"]
    assert [c["id"] for c in await env.hub.configurations.list_configurations(None)] == ["c1"]
