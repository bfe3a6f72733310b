"""Who may fetch the trust bundle and who may run the TLS/trust admin calls — over real HTTPS, with
every refusal in the audit log."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from e2e_helpers import (
    BUNDLE,
    HttpsConn,
    client_ctx,
    device_token,
    fetch,
    policy_token,
    refusals,
    sas_device,
    write_identity,
)

from tether.hub import Hub
from tether.security import pki
from tether.security.sas import build_token

ADMIN_POSTS = ("/tether/admin/tls/reload", "/tether/admin/trust/next-root", "/tether/admin/trust/switch",
               "/tether/admin/trust/retire")


def _root(hub: Hub) -> list[x509.Certificate]:
    return [pki.load_certificate(hub.settings.pki_dir / "root-ca.pem")]


async def test_every_kind_of_principal_may_fetch_the_bundle(hub: Hub, tmp_path: Path) -> None:
    port, roots = hub.ports["https"], _root(hub)
    device = await sas_device(hub, "dev-sas")
    device_policy = await hub.policies.get("device")
    minted = build_token("localhost/devices/dev-sas", device_policy.primary_key, int(time.time()) + 600,
                         "device")  # the token-service pattern: DeviceConnect policy key + skn
    credentials = [
        device_token(device),
        minted,
        await policy_token(hub, "service"),  # ServiceConnect
        await policy_token(hub, "registryRead"),
        await policy_token(hub, "registryReadWrite"),
        await policy_token(hub, "iothubowner"),
    ]
    for credential in credentials:
        reply = await fetch(port, roots, BUNDLE, credential)
        assert reply.status == 200, reply.body
        assert pki.verify_trust_bundle(reply.body, roots) == roots

    # Mutual TLS, no Authorization header: a selfSigned device by its client certificate.
    cert, key = pki.issue_device_cert("dev-cert", self_signed=True)
    await hub.registry.create("dev-cert", {"authentication": {
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": pki.thumbprints(cert)[0]}}}, actor="t")
    identity = write_identity(tmp_path, "dev-cert", cert, key)
    conn = await HttpsConn.open(port, client_ctx(roots, identity))
    assert (await conn.get(BUNDLE)).status == 200
    assert (await conn.get(f"{BUNDLE}?deviceId=dev-cert")).status == 200
    await conn.close()

    allowed = await hub.audit.query(action_prefix="auth.", outcome="allowed", limit=1000)
    by_principal = {(r.action, r.principal, r.credential) for r in allowed}
    assert ("auth.https", "device:dev-sas", "sas") in by_principal
    assert ("auth.https", "device:dev-sas", "sas-policy") in by_principal
    assert ("auth.https", "device:dev-cert", "selfSigned") in by_principal
    assert ("auth.rest", "policy:registryRead", "policy") in by_principal


async def test_bundle_fetch_refusals_are_401_or_403_and_audited(hub: Hub, tmp_path: Path) -> None:
    port, roots = hub.ports["https"], _root(hub)
    device = await sas_device(hub, "dev-off")
    token = device_token(device)

    reply = await fetch(port, roots, BUNDLE)  # no credential at all
    assert (reply.status, reply.json()["errorCode"]) == (401, "IotHubUnauthorizedAccess")
    assert await refusals(hub, "missing-credentials", action_prefix="auth.rest")

    await hub.registry.set_status("dev-off", False, actor="test")
    assert (await fetch(port, roots, BUNDLE, token)).status == 401
    assert await refusals(hub, "device-disabled", action_prefix="auth.https", target="dev-off")

    other = await sas_device(hub, "dev-other")
    key = other.authentication.symmetric_key.primary_key
    assert key is not None
    forged = build_token("localhost/devices/dev-off", key, int(time.time()) + 600)  # wrong device's key
    assert (await fetch(port, roots, BUNDLE, forged)).status == 401
    assert await refusals(hub, "bad-signature", action_prefix="auth.https", target="dev-off")

    expired = build_token("localhost/devices/dev-other", key, int(time.time()) - 3600)
    reply = await fetch(port, roots, BUNDLE, expired)
    assert reply.status == 401 and "expired" in reply.json()["Message"]
    assert await refusals(hub, "expired", action_prefix="auth.https", target="dev-other")

    reply = await fetch(port, roots, BUNDLE, await policy_token(hub, "device"))  # hub-level, DeviceConnect
    assert reply.status == 403
    assert await refusals(hub, "missing-permission", action_prefix="auth.rest")

    reply = await fetch(port, roots, BUNDLE, "SharedAccessSignature sr=localhost&sig=nope")
    assert reply.status == 401 and b"nope" not in reply.body  # refusals never echo the token
    assert await refusals(hub, "malformed", action_prefix="auth.rest")

    # Mutual TLS with a certificate the device record does not know.
    await hub.registry.create("dev-cert", {"authentication": {
        "type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "A" * 40}}}, actor="t")
    cert, key_ = pki.issue_device_cert("dev-cert", self_signed=True)
    conn = await HttpsConn.open(port, client_ctx(roots, write_identity(tmp_path, "c", cert, key_)))
    assert (await conn.get(BUNDLE)).status == 401
    await conn.close()
    assert await refusals(hub, "thumbprint-mismatch", action_prefix="auth.https", target="dev-cert")


@pytest.mark.parametrize("policy", ["registryReadWrite", "registryRead", "service", "device"])
async def test_admin_calls_need_an_owner_policy(hub: Hub, policy: str) -> None:
    port, roots = hub.ports["https"], _root(hub)
    credential = await policy_token(hub, policy)
    conn = await HttpsConn.open(port, client_ctx(roots))
    try:
        for path in ADMIN_POSTS:
            reply = await conn.post(path, credential)
            assert (reply.status, reply.json()["errorCode"]) == (403, "IotHubUnauthorizedAccess"), path
        assert (await conn.get("/tether/admin/trust", credential)).status == 403
        for path in ADMIN_POSTS:
            assert (await conn.post(path)).status == 401
    finally:
        await conn.close()
    refused = await refusals(hub, "missing-permission", action_prefix="auth.rest")
    assert len([r for r in refused if r.principal == f"policy:{policy}"]) == len(ADMIN_POSTS) + 1
    if policy == "registryReadWrite":  # a valid credential for the route guard: the owner check refuses
        assert all(r.details.get("operation") == "TLS and trust administration" for r in refused)
    assert len(await refusals(hub, "missing-credentials", action_prefix="auth.rest")) == len(ADMIN_POSTS)
    # Nothing changed on disk.
    assert not (hub.settings.pki_dir / "root-ca-next.pem").exists()


async def test_openapi_lists_the_security_routes(hub: Hub) -> None:
    reply = await fetch(hub.ports["https"], _root(hub), "/openapi.json")
    paths = json.loads(reply.body)["paths"]
    assert "get" in paths["/tether/trust-bundle"]
    for path in ADMIN_POSTS:
        assert paths[path]["post"]["x-tether-extension"] is True
