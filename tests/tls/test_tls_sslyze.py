"""An independent scanner (sslyze 6) against the adapter: versions, suites, compression, renegotiation,
key-exchange groups. Scans run in a worker thread while the listener runs on the test's event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from sslyze.plugins.scan_commands import ScanCommand
from sslyze.scanner.models import ServerScanRequest, ServerScanResult, ServerScanStatusEnum
from sslyze.scanner.scanner import Scanner
from sslyze.server_setting import ServerNetworkLocation
from tls_helpers import DevPki, echo_server

from tether.config import DEFAULT_TLS12_CIPHERS
from tether.security.tls import TlsContextFactory

_AEAD = ("GCM", "CHACHA20")


def _scan(port: int, commands: set[ScanCommand]) -> ServerScanResult:
    location = ServerNetworkLocation(hostname="localhost", port=port, ip_address="127.0.0.1")
    scanner = Scanner(per_server_concurrent_connections_limit=4)
    scanner.queue_scans([ServerScanRequest(server_location=location, scan_commands=commands)])
    (result,) = list(scanner.get_results())
    assert result.scan_status is ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result


def _result(attempt: Any) -> Any:
    assert attempt.error_reason is None, attempt.error_trace
    return attempt.result


async def _scan_listener(factory: TlsContextFactory, commands: set[ScanCommand]) -> ServerScanResult:
    async with echo_server(factory) as srv:
        return await asyncio.to_thread(_scan, srv.port, commands)


async def test_default_listener_passes_sslyze(dev_pki: DevPki) -> None:
    result = await _scan_listener(
        dev_pki.factory(),
        {
            ScanCommand.SSL_2_0_CIPHER_SUITES,
            ScanCommand.SSL_3_0_CIPHER_SUITES,
            ScanCommand.TLS_1_0_CIPHER_SUITES,
            ScanCommand.TLS_1_1_CIPHER_SUITES,
            ScanCommand.TLS_1_2_CIPHER_SUITES,
            ScanCommand.TLS_1_3_CIPHER_SUITES,
            ScanCommand.TLS_COMPRESSION,
            ScanCommand.SESSION_RENEGOTIATION,
            ScanCommand.ELLIPTIC_CURVES,
        },
    )
    scan = result.scan_result
    assert scan is not None
    for attempt in (
        scan.ssl_2_0_cipher_suites,
        scan.ssl_3_0_cipher_suites,
        scan.tls_1_0_cipher_suites,
        scan.tls_1_1_cipher_suites,
    ):
        assert _result(attempt).accepted_cipher_suites == []

    tls12 = [s.cipher_suite.openssl_name for s in _result(scan.tls_1_2_cipher_suites).accepted_cipher_suites]
    configured = set(DEFAULT_TLS12_CIPHERS.split(":"))
    assert tls12, "TLS 1.2 must be accepted"
    for name in tls12:
        assert name.startswith("ECDHE-") and (any(a in name for a in _AEAD) or name in configured), name
    assert "ECDHE-ECDSA-AES256-GCM-SHA384" in tls12

    tls13 = {s.cipher_suite.name for s in _result(scan.tls_1_3_cipher_suites).accepted_cipher_suites}
    assert tls13 == {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"}

    assert _result(scan.tls_compression).supports_compression is False
    reneg = _result(scan.session_renegotiation)
    assert reneg.supports_secure_renegotiation
    assert not reneg.is_vulnerable_to_client_renegotiation_dos
    assert reneg.client_renegotiations_success_count == 0

    curves = {c.name for c in _result(scan.elliptic_curves).supported_curves}
    assert {"X25519", "secp256r1"} <= curves  # ECDHE groups: X25519 and P-256 (plus stronger)


async def test_legacy_opt_in_accepts_tls10(dev_pki: DevPki) -> None:
    result = await _scan_listener(dev_pki.factory(min_version="TLSv1"), {ScanCommand.TLS_1_0_CIPHER_SUITES})
    assert result.scan_result is not None
    accepted = [
        s.cipher_suite.openssl_name
        for s in _result(result.scan_result.tls_1_0_cipher_suites).accepted_cipher_suites
    ]
    assert accepted and all(name.startswith("ECDHE-") for name in accepted)
