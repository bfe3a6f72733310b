"""X.509 device authentication end to end on the real MQTT/TLS listener with paho-mqtt 1.6.1.

The session's documented mapping (protocols/mqtt/session.py `_authenticate`): a refusal with
`not_authorized` or reason `device-disabled` answers CONNACK 5, every other credential refusal
CONNACK 4. Every certificate problem below is a bad credential, so CONNACK 4, and the authenticator
writes one `auth.mqtt` refused record with the reason.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from e2e_helpers import paho_connack, refusals, write_identity

from tether.hub import Hub
from tether.protocols.mqtt.packets import ConnAckCode
from tether.security import pki

BAD_CREDENTIAL = ConnAckCode.BAD_USERNAME_OR_PASSWORD  # 4
NOT_AUTHORIZED = ConnAckCode.NOT_AUTHORIZED  # 5


def _self_signed(device_id: str, cert: Any, **extra: Any) -> dict[str, Any]:
    return {"authentication": {"type": "selfSigned",
                               "x509Thumbprint": {"primaryThumbprint": pki.thumbprints(cert)[0]}}, **extra}


CA_SIGNED: dict[str, Any] = {"authentication": {"type": "certificateAuthority"}}


async def _connack(hub: Hub, device_id: str, identity: tuple[Path, Path] | None) -> int:
    ca_file = hub.settings.pki_dir / "root-ca.pem"
    return await asyncio.to_thread(paho_connack, hub.ports["mqtts"], ca_file, device_id, identity)


async def _assert_refused(hub: Hub, device_id: str, identity: tuple[Path, Path] | None, reason: str,
                          code: int = BAD_CREDENTIAL) -> None:
    assert await _connack(hub, device_id, identity) == code, reason
    records = await refusals(hub, reason, action_prefix="auth.mqtt", target=device_id)
    assert records, f"no auth.mqtt refusal {reason!r} for {device_id}"
    assert records[0].principal == f"device:{device_id}"


async def test_self_signed_devices(hub: Hub, tmp_path: Path) -> None:
    cert, key = pki.issue_device_cert("x-self", self_signed=True)
    await hub.registry.create("x-self", _self_signed("x-self", cert), actor="test")
    identity = write_identity(tmp_path, "x-self", cert, key)
    assert await _connack(hub, "x-self", identity) == ConnAckCode.ACCEPTED
    allowed = await hub.audit.query(action_prefix="auth.mqtt", outcome="allowed")
    assert (allowed[0].principal, allowed[0].credential) == ("device:x-self", "selfSigned")

    # The secondary thumbprint slot and the SHA-256 form work too.
    cert2, key2 = pki.issue_device_cert("x-self2", self_signed=True)
    await hub.registry.create("x-self2", {"authentication": {"type": "selfSigned", "x509Thumbprint": {
        "primaryThumbprint": "B" * 40, "secondaryThumbprint": pki.thumbprints(cert2)[1]}}}, actor="test")
    assert await _connack(hub, "x-self2", write_identity(tmp_path, "x-self2", cert2, key2)) == 0

    # Wrong thumbprint: a different key pair with the same subject.
    other, other_key = pki.issue_device_cert("x-self", self_signed=True)
    await _assert_refused(hub, "x-self", write_identity(tmp_path, "other", other, other_key),
                          "thumbprint-mismatch")

    # Expired, though the thumbprint matches.
    old, old_key = pki.issue_device_cert("x-expired", self_signed=True, days=1,
                                         valid_from=datetime.now(UTC) - timedelta(days=3))
    await hub.registry.create("x-expired", _self_signed("x-expired", old), actor="test")
    await _assert_refused(hub, "x-expired", write_identity(tmp_path, "old", old, old_key),
                          "certificate-expired")

    # Revoked on the device record (revokedCertificateSerials), though the thumbprint matches.
    rev, rev_key = pki.issue_device_cert("x-revoked", self_signed=True)
    await hub.registry.create("x-revoked", _self_signed(
        "x-revoked", rev, revokedCertificateSerials=[format(rev.serial_number, "X")]), actor="test")
    await _assert_refused(hub, "x-revoked", write_identity(tmp_path, "rev", rev, rev_key),
                          "certificate-revoked")

    # An X.509-only device presenting no certificate (and no password).
    await _assert_refused(hub, "x-self", None, "missing-credentials")

    # Disabled: the certificate is fine, the identity is not -> CONNACK 5.
    await hub.registry.set_status("x-self", False, actor="test")
    await _assert_refused(hub, "x-self", identity, "device-disabled", NOT_AUTHORIZED)


async def test_ca_signed_devices_with_proof_of_possession_and_crl(hub: Hub, tmp_path: Path) -> None:
    ca, ca_key = pki.issue_root_ca("Fleet CA")
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    record = await hub.cas.add("fleet", ca_pem, actor="test")
    assert record.verification_code is not None
    proof, _ = pki.issue_verification_cert(record.verification_code, ca, ca_key)
    await hub.cas.verify("fleet", proof.public_bytes(serialization.Encoding.PEM), actor="test")

    cert, key = pki.issue_device_cert("x-ca", ca_cert=ca, ca_key=ca_key)
    await hub.registry.create("x-ca", CA_SIGNED, actor="test")
    identity = write_identity(tmp_path, "x-ca", cert, key)
    assert await _connack(hub, "x-ca", identity) == ConnAckCode.ACCEPTED

    # CN != device id: a valid fleet certificate issued to another device.
    stolen, stolen_key = pki.issue_device_cert("x-ca-other", ca_cert=ca, ca_key=ca_key)
    await _assert_refused(hub, "x-ca", write_identity(tmp_path, "stolen", stolen, stolen_key), "cn-mismatch")

    # A CA registered but never proven (no proof of possession) is not a trust anchor.
    rogue, rogue_key = pki.issue_root_ca("Unproven CA")
    await hub.cas.add("unproven", rogue.public_bytes(serialization.Encoding.PEM), actor="test")
    r_cert, r_key = pki.issue_device_cert("x-unverified", ca_cert=rogue, ca_key=rogue_key)
    await hub.registry.create("x-unverified", CA_SIGNED, actor="test")
    await _assert_refused(hub, "x-unverified", write_identity(tmp_path, "rogue", r_cert, r_key),
                          "untrusted-ca")

    # Revoked by the CA's CRL: accepted before, refused after `set_crl`.
    crl = pki.make_crl(ca, ca_key, [cert.serial_number])
    await hub.cas.set_crl("fleet", crl.public_bytes(serialization.Encoding.PEM), actor="test")
    await _assert_refused(hub, "x-ca", identity, "certificate-revoked")

    # A self-signed certificate offered for a CA-signed device chains to nothing.
    self_cert, self_key = pki.issue_device_cert("x-ca", self_signed=True)
    await _assert_refused(hub, "x-ca", write_identity(tmp_path, "self", self_cert, self_key), "untrusted-ca")
