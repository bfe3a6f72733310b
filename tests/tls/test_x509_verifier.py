"""X509Verifier and the CA registry on real handshakes: the client presents its certificate through
the TLS adapter, the test takes `peercert_chain` from the server-side transport and asks the verifier."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.ext.asyncio import create_async_engine
from tls_helpers import DevPki, EchoServer, client_context, close_writer, echo_server

from tether.errors import BadRequest, Conflict, NotFound, PreconditionFailed
from tether.registry.models import Device
from tether.security import pki
from tether.security.principal import AuthRefused, CredentialKind
from tether.security.x509 import CaService, X509Verifier, thumbprint_matches
from tether.storage.sql.cas import SqlCaRepository


class RecordingAudit:
    """An AuditSink that keeps records in memory."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def record(self, action: str, outcome: str, **fields: Any) -> None:
        self.records.append({"action": action, "outcome": outcome, **fields})


@pytest.fixture
async def cas(tmp_path: Path) -> AsyncIterator[tuple[CaService, RecordingAudit]]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'cas.db'}")
    repo = SqlCaRepository(engine)
    await repo.create_table()
    audit = RecordingAudit()
    yield CaService(repo, audit), audit
    await engine.dispose()


@pytest.fixture
async def server(dev_pki: DevPki) -> AsyncIterator[EchoServer]:
    async with echo_server(dev_pki.factory()) as srv:
        yield srv


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def self_signed_device(device_id: str, primary: str | None, secondary: str | None = None) -> Device:
    return Device.model_validate(
        {
            "deviceId": device_id,
            "authentication": {
                "type": "selfSigned",
                "x509Thumbprint": {"primaryThumbprint": primary, "secondaryThumbprint": secondary},
            },
        }
    )


def ca_device(device_id: str, revoked: Sequence[str] = ()) -> Device:
    return Device.model_validate(
        {
            "deviceId": device_id,
            "authentication": {"type": "certificateAuthority"},
            "revokedCertificateSerials": list(revoked),
        }
    )


async def presented_chain(
    srv: EchoServer,
    dev_pki: DevPki,
    cert: x509.Certificate | None,
    key: ec.EllipticCurvePrivateKey | None,
    chain: list[x509.Certificate] | None = None,
) -> list[x509.Certificate]:
    """Handshake with `cert` as client certificate; return what the server-side transport saw."""
    identity = (
        dev_pki.identity(f"client-{id(cert)}", cert, key) if cert is not None and key is not None else None
    )
    _reader, writer = await srv.connect(
        client_context(dev_pki.files.root_cert, identity=identity, chain=chain)
    )
    transport = await srv.next_transport()
    seen: list[x509.Certificate] = transport.get_extra_info("peercert_chain")
    await close_writer(writer)
    return seen


async def refused(verifier: X509Verifier, device: Device, chain: list[x509.Certificate]) -> str:
    with pytest.raises(AuthRefused) as info:
        await verifier.verify(device, chain)
    return info.value.reason


# --- selfSigned ----------------------------------------------------------------------------------


def test_thumbprint_comparison_is_case_insensitive_and_accepts_sha256() -> None:
    cert, _ = pki.issue_device_cert("d", self_signed=True)
    sha1, sha256 = pki.thumbprints(cert)
    assert len(sha1) == 40 and sha1 == sha1.upper()
    assert thumbprint_matches(sha1.lower(), cert)
    assert thumbprint_matches(sha256, cert)
    assert thumbprint_matches(":".join(sha1[i : i + 2] for i in range(0, 40, 2)), cert)
    assert not thumbprint_matches(sha1[:-1] + ("0" if sha1[-1] != "0" else "1"), cert)
    assert not thumbprint_matches("ABCD", cert)
    assert not thumbprint_matches(None, cert)


async def test_self_signed_matching_thumbprints_are_accepted(server: EchoServer, dev_pki: DevPki) -> None:
    cert, key = pki.issue_device_cert("dev-ss", self_signed=True)
    chain = await presented_chain(server, dev_pki, cert, key)
    sha1, sha256 = pki.thumbprints(cert)
    verifier = X509Verifier()
    assert await verifier.verify(self_signed_device("dev-ss", sha1), chain) is CredentialKind.x509_self_signed
    assert (
        await verifier.verify(self_signed_device("dev-ss", sha256), chain) is CredentialKind.x509_self_signed
    )
    other, _ = pki.issue_device_cert("other", self_signed=True)
    secondary = self_signed_device("dev-ss", pki.thumbprints(other)[0], sha1.lower())
    assert await verifier.verify(secondary, chain) is CredentialKind.x509_self_signed


async def test_self_signed_wrong_thumbprint_is_refused(server: EchoServer, dev_pki: DevPki) -> None:
    cert, key = pki.issue_device_cert("dev-ss", self_signed=True)
    other, _ = pki.issue_device_cert("dev-ss", self_signed=True)
    chain = await presented_chain(server, dev_pki, cert, key)
    device = self_signed_device("dev-ss", pki.thumbprints(other)[0], pki.thumbprints(other)[1])
    assert await refused(X509Verifier(), device, chain) == "thumbprint-mismatch"


async def test_expired_and_not_yet_valid_certificates_are_refused(
    server: EchoServer, dev_pki: DevPki
) -> None:
    now = datetime.now(UTC)
    expired, key = pki.issue_device_cert(
        "dev-old", self_signed=True, valid_from=now - timedelta(days=10), days=1
    )
    chain = await presented_chain(server, dev_pki, expired, key)
    assert await refused(
        X509Verifier(), self_signed_device("dev-old", pki.thumbprints(expired)[0]), chain
    ) == ("certificate-expired")
    future, key = pki.issue_device_cert("dev-new", self_signed=True, valid_from=now + timedelta(days=2))
    chain = await presented_chain(server, dev_pki, future, key)
    assert await refused(
        X509Verifier(), self_signed_device("dev-new", pki.thumbprints(future)[0]), chain
    ) == ("certificate-not-yet-valid")


async def test_no_client_certificate_is_refused(server: EchoServer, dev_pki: DevPki) -> None:
    chain = await presented_chain(server, dev_pki, None, None)
    assert chain == []
    assert (
        await refused(X509Verifier(), self_signed_device("dev-x", "A" * 40), chain) == "no-client-certificate"
    )


async def test_self_signed_serial_revoked_on_device_record(server: EchoServer, dev_pki: DevPki) -> None:
    cert, key = pki.issue_device_cert("dev-ss", self_signed=True)
    chain = await presented_chain(server, dev_pki, cert, key)
    device = self_signed_device("dev-ss", pki.thumbprints(cert)[0])
    device.revoked_serials.append(format(cert.serial_number, "X"))
    assert await refused(X509Verifier(), device, chain) == "certificate-revoked"


async def test_sas_device_cannot_use_a_certificate(server: EchoServer, dev_pki: DevPki) -> None:
    cert, key = pki.issue_device_cert("dev-sas", self_signed=True)
    chain = await presented_chain(server, dev_pki, cert, key)
    assert (
        await refused(X509Verifier(), Device.model_validate({"deviceId": "dev-sas"}), chain)
        == "wrong-auth-type"
    )


# --- certificateAuthority ------------------------------------------------------------------------


async def test_ca_signed_device_via_intermediate_is_accepted(
    server: EchoServer, dev_pki: DevPki, cas: tuple[CaService, RecordingAudit]
) -> None:
    service, _ = cas
    root, root_key = pki.issue_root_ca("Fleet Root")
    inter, inter_key = pki.issue_intermediate_ca("Fleet Issuing", root, root_key)
    await service.add("fleet", pem(root), verified=True)
    cert, key = pki.issue_device_cert("dev-ca", ca_cert=inter, ca_key=inter_key)
    chain = await presented_chain(server, dev_pki, cert, key, chain=[inter])
    assert await X509Verifier(service).verify(ca_device("dev-ca"), chain) is CredentialKind.x509_ca
    # Without the intermediate the chain cannot be built.
    assert await refused(X509Verifier(service), ca_device("dev-ca"), chain[:1]) == "untrusted-ca"


async def test_ca_signed_module_needs_its_own_certificate(
    server: EchoServer, dev_pki: DevPki, cas: tuple[CaService, RecordingAudit]
) -> None:
    """A CA-signed module's certificate names the module (CN `{device}/{module}`): the device's own
    certificate, valid for the device, is not the module's."""
    service, _ = cas
    root, root_key = pki.issue_root_ca("Fleet Root")
    await service.add("fleet", pem(root), verified=True)
    verifier = X509Verifier(service)
    module = ca_device("dev-ca").model_copy(update={"module_id": "edge"})
    cert, key = pki.issue_device_cert("dev-ca/edge", ca_cert=root, ca_key=root_key)
    chain = await presented_chain(server, dev_pki, cert, key)
    assert await verifier.verify(module, chain) is CredentialKind.x509_ca
    assert await refused(verifier, ca_device("dev-ca"), chain) == "cn-mismatch"  # nor the device's
    cert, key = pki.issue_device_cert("dev-ca", ca_cert=root, ca_key=root_key)
    device_chain = await presented_chain(server, dev_pki, cert, key)
    assert await verifier.verify(ca_device("dev-ca"), device_chain) is CredentialKind.x509_ca
    assert await refused(verifier, module, device_chain) == "cn-mismatch"


async def test_ca_signed_device_refusals(
    server: EchoServer, dev_pki: DevPki, cas: tuple[CaService, RecordingAudit]
) -> None:
    service, _ = cas
    root, root_key = pki.issue_root_ca("Fleet Root")
    record = await service.add("fleet", pem(root), verified=True)
    verifier = X509Verifier(service)

    # CN != device id
    cert, key = pki.issue_device_cert("someone-else", ca_cert=root, ca_key=root_key)
    chain = await presented_chain(server, dev_pki, cert, key)
    assert await refused(verifier, ca_device("dev-ca"), chain) == "cn-mismatch"

    # Revoked by the device record
    cert, key = pki.issue_device_cert("dev-ca", ca_cert=root, ca_key=root_key)
    chain = await presented_chain(server, dev_pki, cert, key)
    assert await verifier.verify(ca_device("dev-ca"), chain) is CredentialKind.x509_ca
    serial = f"0x{cert.serial_number:x}"
    assert await refused(verifier, ca_device("dev-ca", revoked=[serial]), chain) == "certificate-revoked"

    # Revoked by the CA's CRL
    await service.set_crl(
        record.name,
        pki.make_crl(root, root_key, [cert.serial_number]).public_bytes(serialization.Encoding.DER),
    )
    assert await refused(verifier, ca_device("dev-ca"), chain) == "certificate-revoked"
    await service.set_crl(record.name, None)
    assert await verifier.verify(ca_device("dev-ca"), chain) is CredentialKind.x509_ca

    # Expired leaf
    old, old_key = pki.issue_device_cert(
        "dev-ca", ca_cert=root, ca_key=root_key, valid_from=datetime.now(UTC) - timedelta(days=3), days=1
    )
    chain = await presented_chain(server, dev_pki, old, old_key)
    assert await refused(verifier, ca_device("dev-ca"), chain) == "certificate-expired"

    # Signed by a CA nobody registered
    stranger, stranger_key = pki.issue_root_ca("Stranger")
    cert, key = pki.issue_device_cert("dev-ca", ca_cert=stranger, ca_key=stranger_key)
    chain = await presented_chain(server, dev_pki, cert, key)
    assert await refused(verifier, ca_device("dev-ca"), chain) == "untrusted-ca"

    # A self-signed certificate claiming the right CN
    cert, key = pki.issue_device_cert("dev-ca", self_signed=True)
    chain = await presented_chain(server, dev_pki, cert, key)
    assert await refused(verifier, ca_device("dev-ca"), chain) == "untrusted-ca"


async def test_crl_must_come_from_the_ca(cas: tuple[CaService, RecordingAudit]) -> None:
    service, audit = cas
    root, _ = pki.issue_root_ca("Fleet Root")
    other, other_key = pki.issue_root_ca("Other")
    await service.add("fleet", pem(root), verified=True)
    with pytest.raises(BadRequest):
        await service.set_crl(
            "fleet", pki.make_crl(other, other_key, [1]).public_bytes(serialization.Encoding.PEM)
        )
    assert audit.records[-1]["action"] == "ca.crl" and audit.records[-1]["outcome"] == "failed"


async def test_crl_reload_from_file(tmp_path: Path, cas: tuple[CaService, RecordingAudit]) -> None:
    service, _ = cas
    root, root_key = pki.issue_root_ca("Fleet Root")
    await service.add("fleet", pem(root), verified=True)
    path = tmp_path / "fleet.crl"
    path.write_bytes(pki.make_crl(root, root_key, [42]).public_bytes(serialization.Encoding.PEM))
    record = await service.load_crl_file("fleet", path)
    assert record.crl_pem is not None and "BEGIN X509 CRL" in record.crl_pem


# --- proof of possession -------------------------------------------------------------------------


async def test_ca_proof_of_possession_flow(
    server: EchoServer, dev_pki: DevPki, cas: tuple[CaService, RecordingAudit]
) -> None:
    service, audit = cas
    root, root_key = pki.issue_root_ca("Fleet Root")
    record = await service.add("fleet", pem(root), actor="policy:iothubowner")
    assert not record.verified and record.verification_code
    assert record.thumbprint == pki.thumbprints(root)[0]

    verifier = X509Verifier(service)
    cert, key = pki.issue_device_cert("dev-pop", ca_cert=root, ca_key=root_key)
    chain = await presented_chain(server, dev_pki, cert, key)
    assert await refused(verifier, ca_device("dev-pop"), chain) == "untrusted-ca"  # not verified yet

    code = await service.verification_code("fleet")
    assert code != record.verification_code

    stale, _ = pki.issue_verification_cert(record.verification_code or "", root, root_key)
    with pytest.raises(BadRequest):
        await service.verify("fleet", pem(stale))  # an earlier code no longer counts
    imposter_root, imposter_key = pki.issue_root_ca("Fleet Root")  # same name, different key
    forged, _ = pki.issue_verification_cert(code, imposter_root, imposter_key)
    with pytest.raises(BadRequest):
        await service.verify("fleet", pem(forged))
    assert not (await service.get("fleet")).verified
    assert await refused(verifier, ca_device("dev-pop"), chain) == "untrusted-ca"

    proof, _ = pki.issue_verification_cert(code, root, root_key)
    verified = await service.verify("fleet", pem(proof), actor="policy:iothubowner")
    assert verified.verified and verified.verification_code is None
    assert await verifier.verify(ca_device("dev-pop"), chain) is CredentialKind.x509_ca
    with pytest.raises(PreconditionFailed):
        await service.verify("fleet", pem(proof))  # the code was consumed

    outcomes = [(r["action"], r["outcome"]) for r in audit.records]
    assert ("ca.verify", "failed") in outcomes and ("ca.verify", "ok") in outcomes
    assert all(r.get("principal") for r in audit.records)
    assert [c.subject for c in await service.verified_certificates()] == [root.subject]


async def test_ca_registry_add_list_remove(cas: tuple[CaService, RecordingAudit]) -> None:
    service, _ = cas
    root, _ = pki.issue_root_ca("A")
    await service.add("a", pem(root))
    with pytest.raises(Conflict):
        await service.add("a", pem(pki.issue_root_ca("B")[0]))
    with pytest.raises(Conflict):
        await service.add("a-again", pem(root))  # same thumbprint
    leaf, _ = pki.issue_device_cert("leaf", self_signed=True)
    with pytest.raises(BadRequest):
        await service.add("leaf", pem(leaf))  # not a CA
    with pytest.raises(BadRequest):
        await service.add("junk", "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    assert [r.name for r in await service.list()] == ["a"]
    assert (await service.get("a")).created.tzinfo is not None
    await service.remove("a")
    with pytest.raises(NotFound):
        await service.remove("a")
    with pytest.raises(NotFound):
        await service.verification_code("a")
    assert await service.list() == []
