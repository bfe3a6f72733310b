"""Service authentication and authorization on the REST surface: 401 vs 403, audit records,
tokens from the azure-iot-hub SDK's own generator, owner-only policy management."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from api_helpers import API, HOST, create, device_body, policy_token
from azure.iot.hub.auth import ConnectionStringAuthentication  # type: ignore[import-untyped]

from tether.hub import Hub
from tether.security.sas import build_token


async def refused(hub: Hub) -> list[Any]:
    await hub.audit.flush()
    return await hub.audit.query(action_prefix="auth.rest", outcome="refused", limit=1000)


def assert_unauthorized(r: httpx.Response, status: int = 401, secret: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["errorCode"] == "IotHubUnauthorizedAccess"
    assert body["Message"]
    if secret:
        assert secret not in r.text


async def test_missing_authorization_is_401_and_audited(anon: httpx.AsyncClient, hub: Hub) -> None:
    assert_unauthorized(await anon.get(f"/devices{API}"))
    records = await refused(hub)
    assert [r.reason for r in records] == ["missing-credentials"]
    assert records[0].peer and records[0].peer.startswith("127.0.0.1:")


@pytest.mark.parametrize("header", ["Bearer abc", "SharedAccessSignature garbage",
                                    "SharedAccessSignature sr=&sig=&se=",
                                    "sr=localhost&sig=x&se=1&skn=registryReadWrite"])
async def test_malformed_token_is_401(anon: httpx.AsyncClient, hub: Hub, header: str) -> None:
    assert_unauthorized(await anon.get(f"/devices{API}", headers={"Authorization": header}))
    assert len(await refused(hub)) == 1


async def test_expired_token_is_401_and_not_echoed(anon: httpx.AsyncClient, hub: Hub) -> None:
    token = await policy_token(hub, ttl=-3600)
    sig = token.split("sig=")[1].split("&")[0]
    r = await anon.get(f"/devices{API}", headers={"Authorization": token})
    assert_unauthorized(r, secret=sig)
    assert "expired" in r.json()["Message"]
    assert [x.reason for x in await refused(hub)] == ["expired"]


async def test_tampered_token_is_401(anon: httpx.AsyncClient, hub: Hub) -> None:
    token = await policy_token(hub)
    sig_start = token.index("sig=") + 4
    flipped = "A" if token[sig_start] != "A" else "B"
    tampered = token[:sig_start] + flipped + token[sig_start + 1:]
    r = await anon.get(f"/devices{API}", headers={"Authorization": tampered})
    assert_unauthorized(r, secret=tampered)
    # a tampered expiry is caught too
    se = int(token.split("&se=")[1].split("&")[0])
    moved = token.replace(f"&se={se}", f"&se={se + 60}")
    assert_unauthorized(await anon.get(f"/devices{API}", headers={"Authorization": moved}))
    assert len(await refused(hub)) == 2


async def test_token_for_another_hub_is_401(anon: httpx.AsyncClient, hub: Hub) -> None:
    record = await hub.policies.get("registryReadWrite")
    token = build_token("otherhub", record.primary_key, int(time.time()) + 600, "registryReadWrite")
    assert_unauthorized(await anon.get(f"/devices{API}", headers={"Authorization": token}))
    assert len(await refused(hub)) == 1


async def test_device_scoped_token_is_401(client: httpx.AsyncClient, anon: httpx.AsyncClient,
                                          hub: Hub) -> None:
    device = await create(client, "dev1")
    key = device["authentication"]["symmetricKey"]["primaryKey"]
    device_token = build_token(f"{HOST}/devices/dev1", key, int(time.time()) + 600)
    assert_unauthorized(await anon.get(f"/devices/dev1{API}", headers={"Authorization": device_token}))
    # a device-scoped token signed by a policy key is not a service token either
    record = await hub.policies.get("registryReadWrite")
    expiry = int(time.time()) + 600
    scoped = build_token(f"{HOST}/devices/dev1", record.primary_key, expiry, "registryReadWrite")
    assert_unauthorized(await anon.get(f"/devices/dev1{API}", headers={"Authorization": scoped}))
    assert len(await refused(hub)) == 2


async def test_service_policy_cannot_write_registry_403(anon: httpx.AsyncClient, hub: Hub) -> None:
    token = await policy_token(hub, "service")
    r = await anon.put(f"/devices/x{API}", json=device_body("x"), headers={"Authorization": token})
    assert_unauthorized(r, status=403)
    records = await refused(hub)
    assert len(records) == 1 and records[0].principal == "policy:service"
    assert (await hub.registry.find("x")) is None


async def test_registry_read_can_read_but_not_write(client: httpx.AsyncClient, anon: httpx.AsyncClient,
                                                    hub: Hub) -> None:
    await create(client, "ro")
    headers = {"Authorization": await policy_token(hub, "registryRead")}
    assert (await anon.get(f"/devices/ro{API}", headers=headers)).status_code == 200
    r = await anon.put(f"/devices/ro2{API}", json=device_body("ro2"), headers=headers)
    assert_unauthorized(r, status=403)
    r = await anon.delete(f"/devices/ro{API}", headers={**headers, "If-Match": "*"})
    assert_unauthorized(r, status=403)
    r = await anon.post(f"/tether/devices/ro/disable{API}", headers=headers)
    assert_unauthorized(r, status=403)
    assert len(await refused(hub)) == 3
    assert (await hub.registry.get("ro")).enabled


async def test_token_from_the_azure_sdk_generator_is_accepted(anon: httpx.AsyncClient, hub: Hub) -> None:
    """azure-iot-hub signs `quote_plus(host)` and quotes the signature differently; both must pass."""
    conn_str = await hub.service_connection_string("registryReadWrite")
    session = ConnectionStringAuthentication(conn_str).signed_session()
    header = session.headers["Authorization"]
    assert isinstance(header, str) and header.startswith("SharedAccessSignature ") and "skn=" in header
    r = await anon.put(f"/devices/sdk1{API}", json=device_body("sdk1"), headers={"Authorization": header})
    assert r.status_code == 200, r.text
    r = await anon.get(f"/devices/sdk1{API}", headers={"Authorization": header})
    assert r.status_code == 200


async def test_openapi_and_healthz_need_no_auth(anon: httpx.AsyncClient) -> None:
    assert (await anon.get("/healthz")).json() == {"status": "ok"}
    assert (await anon.get("/openapi.json")).status_code == 200


# --- policies (owner only) ------------------------------------------------------------------------

async def test_policy_listing_hides_keys_unless_asked_with_rights(anon: httpx.AsyncClient, hub: Hub) -> None:
    read = {"Authorization": await policy_token(hub, "registryRead")}
    r = await anon.get(f"/tether/policies{API}", headers=read)
    assert r.status_code == 200, r.text
    policies = {p["keyName"]: p for p in r.json()}
    assert set(policies) >= {"iothubowner", "service", "device", "registryRead", "registryReadWrite"}
    assert policies["registryRead"]["rights"] == ["RegistryRead"]
    assert all("primaryKey" not in p and "secondaryKey" not in p for p in policies.values())

    rw = {"Authorization": await policy_token(hub, "registryReadWrite")}
    assert_unauthorized(await anon.get(f"/tether/policies{API}&keys=true", headers=rw), status=403)

    owner = {"Authorization": await policy_token(hub, "iothubowner")}
    r = await anon.get(f"/tether/policies/service{API}&keys=true", headers=owner)
    assert r.status_code == 200
    assert r.json()["primaryKey"] == (await hub.policies.get("service")).primary_key


async def test_policy_management_requires_owner(anon: httpx.AsyncClient, hub: Hub) -> None:
    rw = {"Authorization": await policy_token(hub, "registryReadWrite")}
    r = await anon.put(f"/tether/policies/ops{API}", json={"rights": ["RegistryRead"]}, headers=rw)
    assert_unauthorized(r, status=403)
    r = await anon.post(f"/tether/policies/service/regenerate-key{API}", headers=rw)
    assert_unauthorized(r, status=403)
    r = await anon.delete(f"/tether/policies/service{API}", headers=rw)
    assert_unauthorized(r, status=403)
    records = await refused(hub)
    assert len(records) == 3 and all(x.reason == "missing-permission" for x in records)
    assert await hub.policies.find("ops") is None
    assert await hub.policies.find("service") is not None


async def test_owner_creates_uses_rekeys_and_deletes_a_policy(anon: httpx.AsyncClient, hub: Hub) -> None:
    owner = {"Authorization": await policy_token(hub, "iothubowner")}
    r = await anon.put(f"/tether/policies/ops{API}", json={"rights": ["RegistryRead", "RegistryReadWrite"]},
                       headers=owner)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["keyName"] == "ops" and created["primaryKey"]
    r = await anon.put(f"/tether/policies/ops{API}", json={"rights": ["RegistryRead"]}, headers=owner)
    assert r.status_code == 409

    ops = {"Authorization": await policy_token(hub, "ops")}
    r = await anon.put(f"/devices/byops{API}", json=device_body("byops"), headers=ops)
    assert r.status_code == 200, r.text

    r = await anon.post(f"/tether/policies/ops/regenerate-key{API}&key=primary", headers=owner)
    assert r.status_code == 200
    assert r.json()["primaryKey"] != created["primaryKey"]
    assert r.json()["secondaryKey"] == created["secondaryKey"]
    assert_unauthorized(await anon.get(f"/devices{API}", headers=ops))  # old primary key is dead

    assert (await anon.delete(f"/tether/policies/ops{API}", headers=owner)).status_code == 204
    assert (await anon.get(f"/tether/policies/ops{API}", headers=owner)).status_code == 404

    r = await anon.put(f"/tether/policies/bad{API}", json={"rights": ["Everything"]}, headers=owner)
    assert r.status_code == 400 and r.json()["field"].startswith("rights")
    r = await anon.put(f"/tether/policies/bad{API}", json={"rights": ["RegistryRead"], "primaryKey": "nope"},
                       headers=owner)
    assert r.status_code == 400 and r.json()["field"] == "primaryKey"


async def test_audit_endpoint_filters(anon: httpx.AsyncClient, hub: Hub) -> None:
    await anon.get(f"/devices{API}")  # refused, no credential
    read = {"Authorization": await policy_token(hub, "registryRead")}
    r = await anon.get(f"/tether/audit{API}&outcome=refused&action=auth.", headers=read)
    assert r.status_code == 200, r.text
    entries = r.json()
    assert entries and all(e["outcome"] == "refused" and e["action"].startswith("auth.") for e in entries)
    assert entries[0]["reason"] == "missing-credentials"
    r = await anon.get(f"/tether/audit{API}&principal=policy:registryRead&limit=5", headers=read)
    assert r.status_code == 200 and all(e["principal"] == "policy:registryRead" for e in r.json())
    r = await anon.get(f"/tether/audit{API}&since=yesterday", headers=read)
    assert r.status_code == 400 and r.json()["field"] == "since"
    r = await anon.get(f"/tether/audit{API}&limit=0", headers=read)
    assert r.status_code == 400 and r.json()["field"] == "limit"
