"""Dev PKI files and the root rollover walk with a signed trust bundle, over real TLS connections."""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tls_helpers import DevPki, client_context, close_writer, echo_roundtrip, echo_server

from tether.security import pki
from tether.security.tls import start_tls_server


def _pem(certs: list[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def test_init_pki_writes_files_and_is_idempotent(tmp_path: Path) -> None:
    files = pki.init_pki(tmp_path, ["localhost", "hub.example:8443"], ["127.0.0.1", "::1"])
    for key_file in (files.root_key, files.server_key):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    root = pki.load_certificate(files.root_cert)
    server = pki.load_certificate(files.server_cert)
    server.verify_directly_issued_by(root)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "hub.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert (root.not_valid_after_utc - root.not_valid_before_utc).days >= 3650

    before = (files.root_cert.read_bytes(), files.server_cert.read_bytes())
    pki.init_pki(tmp_path, ["localhost"], ["127.0.0.1"])  # covered already: nothing changes
    assert (files.root_cert.read_bytes(), files.server_cert.read_bytes()) == before
    pki.init_pki(tmp_path, ["localhost", "new.example"], ["127.0.0.1"])  # new name: re-issued, same root
    assert files.root_cert.read_bytes() == before[0]
    assert files.server_cert.read_bytes() != before[1]


async def test_server_cert_for_another_loopback_ip(dev_pki: DevPki) -> None:
    cert, key = pki.server_cert_for_ip("127.0.0.7", dev_pki.root, dev_pki.root_key)
    pki.write_certificates(dev_pki.files.server_cert, [cert])
    pki.write_private_key(dev_pki.files.server_key, key)
    ctx = client_context(dev_pki.files.root_cert)
    async with echo_server(dev_pki.factory()) as srv:
        reader, writer = await srv.connect(ctx, server_hostname="127.0.0.7")  # IP SAN check by the client
        assert await echo_roundtrip(reader, writer, b"ip") == b"ip"
        await close_writer(writer)


async def test_root_rollover_with_signed_trust_bundle(dev_pki: DevPki) -> None:
    root_a, key_a = dev_pki.root, dev_pki.root_key
    next_files = pki.next_root(dev_pki.dir)
    root_b = pki.load_certificate(next_files.root_cert)
    bundle = pki.build_trust_bundle(root_a, key_a, [root_a, root_b], version=2)

    async def trust_bundle(_request: web.Request) -> web.Response:
        return web.Response(body=bundle, content_type="application/json")

    app = web.Application()
    app.router.add_get("/trust-bundle", trust_bundle)
    runner = web.AppRunner(app)
    await runner.setup()
    assert runner.server is not None
    factory = dev_pki.factory()
    server = await start_tls_server(runner.server, "127.0.0.1", 0, factory)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/trust-bundle"
    try:
        # 1. A device pinned to root A fetches the bundle over TLS and checks its signature.
        pinned_a = client_context(cadata=_pem([root_a]))
        async with httpx.AsyncClient(verify=pinned_a) as client:
            data = (await client.get(url)).content
        roots = pki.verify_trust_bundle(data, [root_a], min_version=1)
        assert roots == [root_a, root_b]

        # 2. The hub moves to a server certificate under root B and hot-reloads.
        pki.reissue_server_cert_under_next_root(dev_pki.dir, ["localhost"], ["127.0.0.1"])
        factory.reload()

        # 3. The device trusting the bundle's roots still connects; one pinned to A alone no longer can.
        async with httpx.AsyncClient(verify=client_context(cadata=_pem(roots))) as client:
            assert (await client.get(url)).content == bundle
        async with httpx.AsyncClient(verify=client_context(cadata=_pem([root_a]))) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url)
    finally:
        server.close()
        await server.wait_closed()
        await runner.cleanup()

    # 4. Finally B becomes the root on disk; A is kept as root-ca-prev.pem.
    files = pki.promote_next_root(dev_pki.dir)
    assert pki.load_certificate(files.root_cert) == root_b
    assert pki.load_certificate(dev_pki.dir / "root-ca-prev.pem") == root_a


def test_tampered_or_foreign_trust_bundles_are_rejected(dev_pki: DevPki) -> None:
    root_a, key_a = dev_pki.root, dev_pki.root_key
    evil, evil_key = pki.issue_root_ca("Evil Root")
    bundle = pki.build_trust_bundle(root_a, key_a, [root_a], version=3)

    doc = json.loads(bundle)
    payload = json.loads(base64.b64decode(doc["payload"]))
    payload["roots"].append(evil.public_bytes(serialization.Encoding.PEM).decode())
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(pki.TrustBundleError):
        pki.verify_trust_bundle(json.dumps(doc).encode(), [root_a])

    forged = pki.build_trust_bundle(evil, evil_key, [evil], version=4)  # signed by an unpinned root
    with pytest.raises(pki.TrustBundleError):
        pki.verify_trust_bundle(forged, [root_a])
    with pytest.raises(pki.TrustBundleError):
        pki.verify_trust_bundle(b"{not json", [root_a])
    with pytest.raises(pki.TrustBundleError):
        pki.verify_trust_bundle(bundle, [root_a], min_version=4)  # replay of an older bundle
    assert pki.verify_trust_bundle(bundle, [evil, root_a]) == [root_a]


def test_verification_and_device_certificates_shape(dev_pki: DevPki) -> None:
    cert, _ = pki.issue_verification_cert("ABC123", dev_pki.root, dev_pki.root_key)
    cert.verify_directly_issued_by(dev_pki.root)
    assert cert.subject.rfc4514_string() == "CN=ABC123"
    device, _ = pki.issue_device_cert("Dev_1:a", ca_cert=dev_pki.root, ca_key=dev_pki.root_key)
    san = device.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev-1-a"]
    assert (
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        in device.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    crl = pki.make_crl(dev_pki.root, dev_pki.root_key, [device.serial_number])
    assert crl.is_signature_valid(dev_pki.root.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(device.serial_number) is not None
    with pytest.raises(ValueError):
        pki.issue_device_cert("x")


def test_ssl_module_accepts_the_generated_files(dev_pki: DevPki) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(dev_pki.files.server_cert, dev_pki.files.server_key)
