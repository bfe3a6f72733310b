"""Tether's SAS verifier checked against Azure's own token generators.

A device is created over REST with a `registryReadWrite` policy token and its keys are read from the
response; device tokens are then produced by the azure-iot-device SDK's own generator
(`RenewableSasToken` + `SymmetricKeySigningMechanism`, what `IoTHubDeviceClient` signs with), and a
service token by the azure-iot-hub SDK's (`ConnectionStringAuthentication`, what its managers send).
The hub must accept them as they are, both through the Authenticator and over HTTP, and refuse a copy
with one signature character changed, with an audit record saying why.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from api_helpers import API, HOST, policy_token
from azure.iot.device.common.auth.sastoken import RenewableSasToken
from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism
from azure.iot.hub.auth import ConnectionStringAuthentication  # type: ignore[import-untyped]

from tether.hub import Hub
from tether.security.principal import CredentialKind, PrincipalKind
from tether.security.sas import parse_token
from tether.storage.base import AuditRecord

TTL = 600


async def create_device(client: httpx.AsyncClient, device_id: str) -> dict[str, Any]:
    """PUT without keys: the hub generates both and returns them, as Azure does."""
    r = await client.put(f"/devices/{device_id}{API}",
                         json={"deviceId": device_id, "authentication": {"type": "sas"}})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["deviceId"] == device_id and body["authentication"]["type"] == "sas"
    return body


def sdk_device_token(device_id: str, key: str) -> str:
    """A device token from azure-iot-device's generator, for the resource URI its clients use."""
    token = str(RenewableSasToken(f"{HOST}/devices/{device_id}", SymmetricKeySigningMechanism(key), ttl=TTL))
    assert token.startswith("SharedAccessSignature sr=") and "skn=" not in token
    return token


def tampered(token: str) -> str:
    """The same token with one signature character changed: the first letter or digit (never part
    of a %XX escape, never the last significant base64 character), so it still parses and only the
    signature is wrong."""
    head, sig = token.split("&sig=", 1)
    i = next(i for i, c in enumerate(sig) if c.isalnum() and (i < 1 or sig[i - 1] != "%")
             and (i < 2 or sig[i - 2] != "%"))
    changed = f"{sig[:i]}{'B' if sig[i] == 'A' else 'A'}{sig[i + 1:]}"
    assert len(changed) == len(sig) and sum(a != b for a, b in zip(changed, sig, strict=True)) == 1
    return f"{head}&sig={changed}"


async def refusals(hub: Hub, device_id: str) -> list[AuditRecord]:
    await hub.audit.flush()
    return [r for r in await hub.audit.query(limit=1000, action_prefix="auth.", outcome="refused")
            if r.target == device_id]


async def send_event(base_url: str, device_id: str, authorization: str, n: int) -> httpx.Response:
    headers = {"Authorization": authorization, "Content-Type": "application/json",
               "iothub-messageid": f"{device_id}-{n}", "iothub-app-n": str(n)}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        return await http.post(f"/devices/{device_id}/messages/events{API}", headers=headers,
                               content=f'{{"n": {n}}}')


async def device_events(hub: Hub, device_id: str) -> list[tuple[str, str, bytes]]:
    """(message id, `n` property, body) of the device's events in its partition, in order."""
    events = await hub.stream.read(hub.stream.partition_for(device_id), from_sequence=0, max_count=1000)
    return [(e.system_properties.get("message-id", ""), e.properties.get("n", ""), e.body)
            for e in events if e.device_id == device_id]


async def check_sdk_device_token(hub: Hub, base_url: str, device_id: str, key: str) -> None:
    token = sdk_device_token(device_id, key)
    # (a) the verifier itself accepts Azure's token for this device
    principal = await hub.authenticator.device_sas(token, device_id, surface="test")
    assert principal.kind is PrincipalKind.device and principal.device_id == device_id
    assert principal.credential is CredentialKind.device_key and principal.module_id is None
    assert principal.expires_at == parse_token(token).expiry
    assert abs(parse_token(token).expiry - (time.time() + TTL)) < 30
    assert unquote(parse_token(token).resource) == f"{HOST}/devices/{device_id}"
    # (b) and so does the hub over HTTP: the event is durable in the stream
    before = await device_events(hub, device_id)
    r = await send_event(base_url, device_id, token, len(before))
    assert r.status_code == 204, r.text
    after = await device_events(hub, device_id)
    assert after == [*before, (f"{device_id}-{len(before)}", str(len(before)),
                               f'{{"n": {len(before)}}}'.encode())]
    # (c) one signature character changed: 401, audited as bad-signature, nothing appended
    assert await refusals(hub, device_id) == []
    r = await send_event(base_url, device_id, tampered(token), 99)
    assert r.status_code == 401, r.text
    new = await refusals(hub, device_id)
    assert [(rec.action, rec.reason) for rec in new] == [("auth.https", "bad-signature")]
    assert new[0].principal == f"device:{device_id}" and new[0].peer
    for sent in (token, tampered(token)):  # never log tokens or signatures
        assert sent.split("&sig=", 1)[1].split("&", 1)[0] not in repr(new[0])
    assert await device_events(hub, device_id) == after


async def test_sdk_device_token_signed_with_the_primary_key(hub: Hub, base_url: str,
                                                            client: httpx.AsyncClient) -> None:
    device = await create_device(client, "sdk-token-primary")
    key = device["authentication"]["symmetricKey"]["primaryKey"]
    await check_sdk_device_token(hub, base_url, "sdk-token-primary", key)


async def test_sdk_device_token_signed_with_the_secondary_key(hub: Hub, base_url: str,
                                                              client: httpx.AsyncClient) -> None:
    """Key rotation: devices move to the secondary key while the primary is regenerated."""
    device = await create_device(client, "sdk-token-secondary")
    keys = device["authentication"]["symmetricKey"]
    assert keys["secondaryKey"] and keys["secondaryKey"] != keys["primaryKey"]
    await check_sdk_device_token(hub, base_url, "sdk-token-secondary", keys["secondaryKey"])


async def test_sdk_device_token_for_another_device_is_refused(hub: Hub, base_url: str,
                                                              client: httpx.AsyncClient) -> None:
    """Azure's token for device A, signed with A's key, does not open device B."""
    a = await create_device(client, "sdk-token-a")
    await create_device(client, "sdk-token-b")
    token = sdk_device_token("sdk-token-a", a["authentication"]["symmetricKey"]["primaryKey"])
    r = await send_event(base_url, "sdk-token-b", token, 0)
    assert r.status_code == 401, r.text
    assert await device_events(hub, "sdk-token-b") == []
    refused = await refusals(hub, "sdk-token-b")
    assert [(rec.action, rec.reason) for rec in refused] == [("auth.https", "wrong-scope")]


@pytest.mark.parametrize("policy", ["registryRead", "iothubowner"])
async def test_azure_iot_hub_sdk_service_token(hub: Hub, base_url: str, client: httpx.AsyncClient,
                                               policy: str) -> None:
    """azure-iot-hub's own service-token generator, fed the hub's connection string."""
    await create_device(client, "sdk-token-svc")
    auth = ConnectionStringAuthentication(await hub.service_connection_string(policy))
    token = auth.signed_session().headers["Authorization"]
    assert token.startswith("SharedAccessSignature ") and f"skn={policy}" in token
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        r = await http.get(f"/devices/sdk-token-svc{API}", headers={"Authorization": token})
        assert r.status_code == 200, r.text
        assert r.json()["deviceId"] == "sdk-token-svc"
        bad = await http.get(f"/devices/sdk-token-svc{API}", headers={"Authorization": tampered(token)})
        assert bad.status_code == 401, bad.text
    await hub.audit.flush()
    records = await hub.audit.query(limit=1000, action_prefix="auth.")
    assert any(r.outcome == "allowed" and r.principal == f"policy:{policy}" for r in records)
    assert any(r.outcome == "refused" and r.reason == "bad-signature" for r in records)


async def test_policy_token_is_what_created_the_device(hub: Hub, base_url: str) -> None:
    """The REST create above needs RegistryReadWrite: a read-only policy's token is refused."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        r = await http.put(f"/devices/sdk-token-ro{API}", json={"deviceId": "sdk-token-ro"},
                           headers={"Authorization": await policy_token(hub, "registryRead")})
    assert r.status_code == 403, r.text
    assert await hub.registry.find("sdk-token-ro") is None
