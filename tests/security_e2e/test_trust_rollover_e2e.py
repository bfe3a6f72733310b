"""Root rollover through the real hub: a device pinned to root A learns root B from the signed bundle,
the hub switches its server chain to B by hot reload, and A is retired — without a device pinned to
the bundle's roots ever losing its connection."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from e2e_helpers import (
    BUNDLE,
    HttpsConn,
    bundle_version,
    client_ctx,
    device_token,
    fetch,
    policy_token,
    running_hub,
    sas_device,
    tamper,
)

from tether.hub import Hub
from tether.security import pki
from tether.security.trust import issued_by, sha256_hex


async def test_root_rollover_end_to_end(hub: Hub, data_dir: Path) -> None:
    port = hub.ports["https"]
    pki_dir = hub.settings.pki_dir
    root_a = pki.load_certificate(pki_dir / "root-ca.pem")
    device = await sas_device(hub, "sensor-1")
    token = device_token(device)
    owner = await policy_token(hub, "iothubowner")

    # v1: a device pinned ONLY to root A fetches the bundle with its SAS token and verifies it.
    pinned_a = await HttpsConn.open(port, client_ctx([root_a]))
    reply = await pinned_a.get(BUNDLE, token)
    assert reply.status == 200, reply.body
    assert pki.verify_trust_bundle(reply.body, [root_a], min_version=1) == [root_a]
    assert bundle_version(reply.body) == 1 == int(reply.headers["x-tether-trust-bundle-version"])
    v1 = reply.body

    # The operator adds the next root: bundle v2 = [A, B], signed by A.
    reply = await pinned_a.post("/tether/admin/trust/next-root", owner)
    assert reply.status == 200, reply.body
    state = reply.json()
    assert (state["version"], state["phase"], state["changed"]) == (2, "next-published", True)
    assert (await pinned_a.post("/tether/admin/trust/next-root", owner)).json()["changed"] is False

    reply = await pinned_a.get(BUNDLE, token)
    roots = pki.verify_trust_bundle(reply.body, [root_a], min_version=2)
    assert len(roots) == 2 and roots[0] == root_a and bundle_version(reply.body) == 2
    root_b = roots[1]
    assert sha256_hex(root_b) == state["nextRoot"]["thumbprint"]
    assert reply.json()["signer"] == sha256_hex(root_a)
    v2 = reply.body

    # Switch: the server certificate moves under B and the listeners hot-reload.
    reply = await pinned_a.post("/tether/admin/trust/switch", owner)
    assert reply.status == 200, reply.body
    state = reply.json()
    assert (state["phase"], state["changed"], state["version"]) == ("switched", True, 2)
    assert state["servedCertificate"] == state["serverCertificate"]
    assert state["servedCertificate"]["issuer"] == root_b.subject.rfc4514_string()

    # A NEW connection trusting the bundle's roots succeeds and is served a certificate under B ...
    bundle_conn = await HttpsConn.open(port, client_ctx(roots))
    assert issued_by(bundle_conn.peer_certificate(), root_b)
    assert (await bundle_conn.get(BUNDLE, token)).body == v2
    # ... a new client pinned only to A fails verification ...
    with pytest.raises(ssl.SSLCertVerificationError):
        await HttpsConn.open(port, client_ctx([root_a]))
    # ... and the connection opened before the switch is still up, still on the old certificate.
    assert issued_by(pinned_a.peer_certificate(), root_a)
    reply = await pinned_a.get(BUNDLE, token)
    assert reply.status == 200 and reply.body == v2
    await pinned_a.close()

    # Retire: B becomes the only root; bundle v3 is signed by B, so a device holding [A, B] accepts
    # it and a device still pinned to A alone cannot.
    reply = await bundle_conn.post("/tether/admin/trust/retire", owner)
    assert reply.status == 200, reply.body
    assert (reply.json()["version"], reply.json()["phase"]) == (3, "single")
    reply = await bundle_conn.get(BUNDLE, token)
    assert pki.verify_trust_bundle(reply.body, roots, min_version=3) == [root_b]
    assert reply.json()["signer"] == sha256_hex(root_b)
    with pytest.raises(pki.TrustBundleError):
        pki.verify_trust_bundle(reply.body, [root_a])
    v3 = reply.body
    assert pki.load_certificate(pki_dir / "root-ca-prev.pem") == root_a

    # The device-side verifier refuses a tampered bundle and a replayed older one.
    evil, _ = pki.issue_root_ca("Evil Root")
    with pytest.raises(pki.TrustBundleError):
        pki.verify_trust_bundle(tamper(v3, evil), [root_b])
    with pytest.raises(pki.TrustBundleError):
        pki.verify_trust_bundle(v2, roots, min_version=3)
    with pytest.raises(pki.TrustBundleError):
        pki.verify_trust_bundle(v1, [root_a], min_version=3)

    # ETag: a device holding v3 gets 304.
    reply = await bundle_conn.get(BUNDLE, token, **{"If-None-Match": reply.headers["etag"]})
    assert reply.status == 304
    await bundle_conn.close()

    # Every step is in the audit log with the owner as actor.
    actions = [r.action for r in await hub.audit.query(action_prefix="trust.", outcome="ok")]
    assert {"trust.next_root", "trust.switch", "trust.retire"} <= set(actions)
    # ... and every fetch, so the operator can see which devices hold which version before switching.
    fetches = await hub.audit.query(action_prefix="trust.fetch", principal="device:sensor-1")
    assert sorted({r.details["version"] for r in fetches}) == [1, 2, 3]
    assert fetches[0].details["notModified"] is True
    reloads = await hub.audit.query(action_prefix="tls.reload", outcome="ok")
    assert reloads[0].principal == "policy:iothubowner" and reloads[0].details["cause"] == "trust.switch"


async def test_bundle_version_persists_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with running_hub(data_dir) as hub:
        root_a = pki.load_certificate(hub.settings.pki_dir / "root-ca.pem")
        owner = await policy_token(hub, "iothubowner")
        conn = await HttpsConn.open(hub.ports["https"], client_ctx([root_a]))
        assert (await conn.post("/tether/admin/trust/next-root", owner)).json()["version"] == 2
        before = (await conn.get(BUNDLE, owner)).body
        await conn.close()
    async with running_hub(data_dir) as hub:
        owner = await policy_token(hub, "iothubowner")
        reply = await fetch(hub.ports["https"], [root_a], BUNDLE, owner)
        assert reply.status == 200
        assert reply.body == before and bundle_version(reply.body) == 2  # same bytes, same version
        # A root changed behind the hub's back (offline `tether pki` work) yields a new version.
        (hub.settings.pki_dir / "root-ca-next.pem").unlink()
        reply = await fetch(hub.ports["https"], [root_a], BUNDLE, owner)
        assert bundle_version(reply.body) == 3
        assert pki.verify_trust_bundle(reply.body, [root_a], min_version=3) == [root_a]


async def test_rollover_steps_out_of_order_are_refused_and_audited(hub: Hub) -> None:
    root_a = pki.load_certificate(hub.settings.pki_dir / "root-ca.pem")
    owner = await policy_token(hub, "iothubowner")
    conn = await HttpsConn.open(hub.ports["https"], client_ctx([root_a]))
    try:
        reply = await conn.post("/tether/admin/trust/switch", owner)
        assert (reply.status, reply.json()["errorCode"]) == (409, "TrustNextRootMissing")
        reply = await conn.post("/tether/admin/trust/retire", owner)
        assert (reply.status, reply.json()["errorCode"]) == (409, "TrustNextRootMissing")
        assert (await conn.post("/tether/admin/trust/next-root", owner)).status == 200
        reply = await conn.post("/tether/admin/trust/retire", owner)  # before the switch
        assert (reply.status, reply.json()["errorCode"]) == (409, "TrustNotSwitched")
        status = (await conn.get("/tether/admin/trust", owner)).json()
        assert (status["phase"], status["version"]) == ("next-published", 2)
    finally:
        await conn.close()
    failed = await hub.audit.query(action_prefix="trust.", outcome="failed")
    assert {(r.action, r.reason) for r in failed} == {
        ("trust.switch", "TrustNextRootMissing"),
        ("trust.retire", "TrustNextRootMissing"),
        ("trust.retire", "TrustNotSwitched"),
    }
