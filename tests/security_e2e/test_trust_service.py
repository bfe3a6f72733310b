"""`TrustService` on a real PKI directory: versions only go up, the stored bundle is reused byte for
byte, and states it cannot handle safely are refused with a named error rather than guessed at."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from e2e_helpers import bundle_version

from tether.errors import Conflict, NotFound, TetherError
from tether.security import pki
from tether.security.trust import BUNDLE_FILE, TrustPhase, TrustService, issued_by


def _service(pki_dir: Path, cert_file: Path | None = None, key_file: Path | None = None) -> TrustService:
    pki.init_pki(pki_dir, ["localhost", "hub.example"], ["127.0.0.1"])
    return TrustService(pki_dir, cert_file=cert_file, key_file=key_file)


async def test_bundle_is_created_once_and_reused(tmp_path: Path) -> None:
    service = _service(tmp_path)
    first = await service.bundle()
    assert first.version == 1 and (tmp_path / BUNDLE_FILE).read_bytes() == first.data
    assert await service.bundle() is first  # cached while the files are unchanged
    assert (await TrustService(tmp_path).bundle()).data == first.data  # a restart serves the same bytes


async def test_full_rollover_on_disk_keeps_names_and_bumps_versions(tmp_path: Path) -> None:
    service = _service(tmp_path)
    root_a = pki.load_certificate(tmp_path / "root-ca.pem")
    status, created = await service.add_next_root(actor="test")
    assert created and status.phase is TrustPhase.published and status.bundle.version == 2
    root_b = status.next_root
    assert root_b is not None and root_b.subject != root_a.subject  # unique names across rollovers
    status, reissued = await service.switch(actor="test")
    assert reissued and status.phase is TrustPhase.switched and status.bundle.version == 2
    server = status.server_certificate
    assert server is not None and issued_by(server, root_b)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "hub.example"]
    assert (await service.switch(actor="test"))[1] is False  # idempotent
    status, _ = await service.retire(actor="test")
    assert status.phase is TrustPhase.single and status.bundle.version == 3
    assert status.bundle.roots == (root_b,) and pki.verify_trust_bundle(status.bundle.data, [root_b])
    # A second rollover starts from B.
    status, _ = await service.add_next_root(actor="test")
    assert status.bundle.version == 4 and status.bundle.roots[0] == root_b


async def test_hub_without_its_own_root_has_no_bundle(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as info:
        await TrustService(tmp_path).bundle()
    assert info.value.code == "TrustBundleNotFound"


async def test_switch_refuses_certificates_the_hub_does_not_serve_from_its_pki(tmp_path: Path) -> None:
    service = _service(tmp_path / "pki", cert_file=tmp_path / "byo.pem", key_file=tmp_path / "byo.key")
    await service.add_next_root(actor="test")
    with pytest.raises(Conflict) as info:
        await service.switch(actor="test")
    assert info.value.code == "TrustExternalCertificate"


async def test_missing_root_key_and_corrupt_bundle_are_named_errors(tmp_path: Path) -> None:
    service = _service(tmp_path)
    await service.bundle()
    (tmp_path / "root-ca.key").rename(tmp_path / "offline.key")  # root key kept offline: fine ...
    assert (await TrustService(tmp_path).bundle()).version == 1
    pki.next_root(tmp_path)  # ... until the roots change and the bundle must be re-signed
    with pytest.raises(TetherError) as info:
        await TrustService(tmp_path).bundle()
    assert info.value.code == "TrustRootKeyMissing"
    (tmp_path / "offline.key").rename(tmp_path / "root-ca.key")
    assert bundle_version((await TrustService(tmp_path).bundle()).data) == 2

    (tmp_path / BUNDLE_FILE).write_bytes(b"{garbage")
    with pytest.raises(TetherError) as info:
        await TrustService(tmp_path).bundle()
    assert info.value.code == "TrustBundleCorrupt"  # never silently restart at version 1
