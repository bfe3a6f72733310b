"""No caller obtains a credential granting more than it holds (issue 14, "privilege escalation to
owner"): a RegistryRead + RegistryReadWrite + ServiceConnect policy — everything but DeviceConnect —
read `GET /tether/policies/iothubowner?keys=true`, minted an owner token and created a full-rights
policy. Now every policy key read checks the target's rights against the caller's and is audited as
`policy.keys.read`; device keys go only to callers that could act as the device anyway."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hub_app_helpers import API, HOST, create_device, make_hub, policy_token, serving

from tether.hub import Hub
from tether.security.disclosure import rights_of
from tether.security.principal import Permission
from tether.security.sas import build_token

ALMOST = ("RegistryRead", "RegistryReadWrite", "ServiceConnect")  # the outside test's policy


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = make_hub(tmp_path)
    await h.open()
    await h.policies.create("almostOwner", ALMOST, actor="test")
    await h.policies.create("readerAndService", ("RegistryRead", "ServiceConnect"), actor="test")
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(hub) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        yield c


async def as_policy(hub: Hub, name: str) -> dict[str, str]:
    return {"Authorization": await policy_token(hub, name)}


async def key_reads(hub: Hub) -> list[Any]:
    await hub.audit.flush()
    return await hub.audit.query(limit=1000, action_prefix="policy.keys.read")


async def test_a_non_owner_policy_cannot_read_any_key_of_a_policy_with_more_rights(
        hub: Hub, client: httpx.AsyncClient) -> None:
    caller = await hub.policies.get("almostOwner")
    headers = await as_policy(hub, "almostOwner")
    held = rights_of(caller.permissions)
    for policy in await hub.policies.list():
        r = await client.get(f"/tether/policies/{policy.name}{API}&keys=true", headers=headers)
        if rights_of(policy.permissions) <= held:
            assert r.status_code == 200, (policy.name, r.text)
            assert r.json()["primaryKey"] == policy.primary_key
        else:  # iothubowner and device: DeviceConnect is the right the caller lacks
            assert r.status_code == 403, (policy.name, r.text)
            assert "primaryKey" not in r.text and policy.primary_key not in r.text
            assert policy.secondary_key not in r.text and "DeviceConnect" in r.json()["message"]
    refused = [r for r in await key_reads(hub) if r.outcome == "refused"]
    assert sorted(r.target for r in refused) == ["device", "iothubowner"]
    assert all(r.principal == "policy:almostOwner" and r.reason == "more-rights" for r in refused)
    assert all(r.peer for r in refused)
    allowed = [r for r in await key_reads(hub) if r.outcome == "allowed"]
    assert sorted(r.target for r in allowed) == sorted(
        p.name for p in await hub.policies.list() if rights_of(p.permissions) <= held)


async def test_the_listing_withholds_the_keys_of_policies_with_more_rights(
        hub: Hub, client: httpx.AsyncClient) -> None:
    r = await client.get(f"/tether/policies{API}&keys=true", headers=await as_policy(hub, "almostOwner"))
    assert r.status_code == 200, r.text
    shown = {p["keyName"] for p in r.json() if "primaryKey" in p}
    assert shown == {"almostOwner", "readerAndService", "registryRead", "registryReadWrite", "service"}
    owner = await hub.policies.get("iothubowner")
    assert owner.primary_key not in r.text and owner.secondary_key not in r.text
    [record] = await key_reads(hub)
    assert record.details == {"policies": sorted(shown), "withheld": ["device", "iothubowner"]}


async def test_the_owner_reads_every_key_and_each_read_is_audited(hub: Hub,
                                                                 client: httpx.AsyncClient) -> None:
    owner = await as_policy(hub, "iothubowner")
    r = await client.get(f"/tether/policies/device{API}&keys=true", headers=owner)
    assert r.status_code == 200 and r.json()["primaryKey"] == (await hub.policies.get("device")).primary_key
    [record] = await key_reads(hub)
    assert (record.outcome, record.principal, record.target) == ("allowed", "policy:iothubowner", "device")
    assert "primaryKey" not in repr(record) and r.json()["primaryKey"] not in repr(record)


async def test_without_key_management_rights_no_key_is_shown_at_all(hub: Hub,
                                                                    client: httpx.AsyncClient) -> None:
    """`readerAndService` holds every right of `registryRead`, but not RegistryReadWrite: no keys."""
    r = await client.get(f"/tether/policies/registryRead{API}&keys=true",
                         headers=await as_policy(hub, "readerAndService"))
    assert r.status_code == 403


@pytest.mark.parametrize("rights", [ALMOST, ("ServiceConnect",), tuple(p.value for p in Permission)])
async def test_a_non_owner_cannot_create_or_change_policies(hub: Hub, client: httpx.AsyncClient,
                                                            rights: tuple[str, ...]) -> None:
    headers = await as_policy(hub, "almostOwner")
    r = await client.put(f"/tether/policies/evil{API}", json={"rights": list(rights)}, headers=headers)
    assert r.status_code == 403, r.text
    assert await hub.policies.find("evil") is None
    owner = await hub.policies.get("iothubowner")
    r = await client.post(f"/tether/policies/iothubowner/regenerate-key{API}", headers=headers)
    assert r.status_code == 403 and (await hub.policies.get("iothubowner")) == owner  # keys would be in it
    assert (await client.delete(f"/tether/policies/device{API}", headers=headers)).status_code == 403
    assert (await client.post(f"/tether/admin/tls/reload{API}", headers=headers)).status_code == 403


async def test_the_escalation_chain_of_the_outside_test_is_closed(hub: Hub,
                                                                  client: httpx.AsyncClient) -> None:
    """The reported chain, step by step: read the owner key, mint an owner token, create a policy."""
    almost = await as_policy(hub, "almostOwner")
    r = await client.get(f"/tether/policies/iothubowner{API}&keys=true", headers=almost)
    assert r.status_code == 403
    guessed = build_token(HOST, "AAAA" * 11, int(time.time()) + 600, "iothubowner")  # all it can do: guess
    r = await client.put(f"/tether/policies/evil{API}", json={"rights": [p.value for p in Permission]},
                         headers={"Authorization": guessed})
    assert r.status_code == 401


async def test_device_keys_only_for_callers_that_could_act_as_the_device(hub: Hub,
                                                                         client: httpx.AsyncClient) -> None:
    owner = await as_policy(hub, "iothubowner")
    client.headers.update(owner)
    device = await create_device(client, "meter")
    key = device["authentication"]["symmetricKey"]["primaryKey"]
    reader = await as_policy(hub, "registryRead")
    r = await client.get(f"/devices/meter{API}", headers=reader)
    assert r.status_code == 200 and key not in r.text
    assert r.json()["authentication"]["symmetricKey"] == {"primaryKey": None, "secondaryKey": None}
    r = await client.get(f"/devices{API}", headers=reader)
    assert r.status_code == 200 and key not in r.text and r.json()[0]["deviceId"] == "meter"
    r = await client.get(f"/tether/devices/export{API}", headers=reader)
    assert r.status_code == 403 and key not in r.text
    for writer in ("registryReadWrite", "almostOwner"):  # it could set the keys anyway
        r = await client.get(f"/devices/meter{API}", headers=await as_policy(hub, writer))
        assert r.status_code == 200 and r.json()["authentication"]["symmetricKey"]["primaryKey"] == key
    r = await client.get(f"/tether/devices/export{API}", headers=await as_policy(hub, "registryReadWrite"))
    assert r.status_code == 200 and key in r.text
    await hub.audit.flush()
    reads = await hub.audit.query(limit=100, action_prefix="device.keys.read")
    assert [(r.outcome, r.principal) for r in reversed(reads)] == [
        ("refused", "policy:registryRead"), ("allowed", "policy:registryReadWrite")]
