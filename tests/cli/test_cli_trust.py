"""`tether tls …` and `tether trust …` against a real hub serving HTTPS with its real listeners
(`server.start_listeners`, TLS with the data dir's dev PKI, 127.0.0.1 ephemeral ports), run in a
background thread with its own event loop while the CLI runs in-process."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tether.config import load_settings
from tether.hub import Hub
from tether.protocols.mqtt.server import stop_mqtt
from tether.security import pki
from tether.security.trust import sha256_hex
from tether.server import start_listeners

from .conftest import Cli


class TlsHub:
    """The hub on an initialised data dir, HTTPS + MQTT/TLS on 127.0.0.1 ephemeral ports."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-hub", daemon=True)
        self.url = ""

    async def _start(self) -> None:
        settings = load_settings(hub={"hostname": "localhost", "data_dir": self.data_dir},
                                 listeners={"host": "127.0.0.1", "https_port": 0, "mqtt_port": 0,
                                            "amqp_port": 0})
        self.hub = Hub(settings)
        await self.hub.open()
        await start_listeners(self.hub)
        self.url = f"https://127.0.0.1:{self.hub.ports['https']}"

    async def _stop(self) -> None:
        await stop_mqtt(self.hub)
        await self.hub.close()

    def __enter__(self) -> TlsHub:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def opts(cli: Cli, owner_cs: str) -> Iterator[tuple[str, ...]]:
    """Global options for remote mode against the TLS hub, as the owner."""
    with TlsHub(cli.data_dir) as running:
        yield "--hub-url", running.url, "--connection-string", owner_cs


def pki_dir(cli: Cli) -> Path:
    return cli.data_dir / "pki"


def cert(path: Path) -> x509.Certificate:
    return pki.load_certificate(path)


def test_trust_status_shows_the_single_root(cli: Cli, opts: tuple[str, ...]) -> None:
    root = cert(pki_dir(cli) / "root-ca.pem")
    text = cli(*opts, "trust", "status").stdout
    assert "phase" in text and "single" in text and sha256_hex(root) in text
    assert "changed" not in text  # only the steps say whether they changed anything
    doc = json.loads(cli(*opts, "trust", "status", "--json").stdout)
    assert (doc["version"], doc["phase"], doc["nextRoot"]) == (1, "single", None)
    assert doc["currentRoot"]["thumbprint"] == sha256_hex(root)
    assert doc["servedCertificate"]["thumbprint"] == sha256_hex(cert(pki_dir(cli) / "server.pem"))


def test_next_root_publishes_bundle_v2_verified_with_the_old_root(
    cli: Cli, opts: tuple[str, ...], tmp_path: Path
) -> None:
    old_root = pki_dir(cli) / "root-ca.pem"
    text = cli(*opts, "trust", "next-root").stdout
    assert "next-published" in text and "yes" in text
    next_root = cert(pki_dir(cli) / "root-ca-next.pem")
    assert sha256_hex(next_root) in text
    again = json.loads(cli(*opts, "trust", "next-root", "--json").stdout)
    assert (again["changed"], again["version"]) == (False, 2)  # idempotent

    out = tmp_path / "bundle.json"
    report = cli(*opts, "trust", "bundle", "--out", str(out), "--verify-with", str(old_root),
                 "--min-version", "2").stdout
    assert "version   2" in report and "verified  yes" in report
    assert sha256_hex(cert(old_root)) in report and sha256_hex(next_root) in report
    roots = pki.verify_trust_bundle(out.read_bytes(), [cert(old_root)], min_version=2)
    assert [sha256_hex(r) for r in roots] == [sha256_hex(cert(old_root)), sha256_hex(next_root)]

    raw = cli(*opts, "trust", "bundle").stdout  # no options: the bundle itself, for a pipe
    assert len(pki.verify_trust_bundle(raw.encode(), [cert(old_root)])) == 2
    unverified = cli(*opts, "trust", "bundle", "--out", str(tmp_path / "b2.json")).stdout
    assert "verified  NO" in unverified


def test_a_bundle_that_does_not_verify_is_refused_and_not_written(
    cli: Cli, opts: tuple[str, ...], tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger.pem"
    pki.write_certificates(stranger, [pki.issue_root_ca("Someone Else")[0]])
    out = tmp_path / "bundle.json"
    refused = cli(*opts, "trust", "bundle", "--out", str(out), "--verify-with", str(stranger), ok=False)
    assert refused.exit_code == 1 and "NOT verified" in refused.stderr and not out.exists()
    old_root = str(pki_dir(cli) / "root-ca.pem")
    stale = cli(*opts, "trust", "bundle", "--verify-with", old_root, "--min-version", "5", ok=False)
    assert stale.exit_code == 1 and "older than 5" in stale.stderr


def test_tls_reload_prints_the_served_thumbprint(cli: Cli, opts: tuple[str, ...]) -> None:
    server = cert(pki_dir(cli) / "server.pem")
    text = cli(*opts, "tls", "reload").stdout
    assert f"thumbprint  {sha256_hex(server)}" in text
    assert "notAfter" in text and server.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S") in text
    doc = json.loads(cli(*opts, "tls", "reload", "--json").stdout)
    assert doc["thumbprint"] == sha256_hex(server) and doc["generation"] >= 2


def test_whole_rollover_from_the_cli(cli: Cli, opts: tuple[str, ...], tmp_path: Path) -> None:
    """After `switch` the hub serves a certificate from the next root: the CLI trusts the data dir's
    next root too, so `retire` still reaches it without --ca-file."""
    cli(*opts, "trust", "next-root")
    next_root = tmp_path / "next.pem"
    next_root.write_bytes((pki_dir(cli) / "root-ca-next.pem").read_bytes())
    switched = json.loads(cli(*opts, "trust", "switch", "--json").stdout)
    assert switched["phase"] == "switched"
    assert switched["servedCertificate"]["issuer"] == cert(next_root).subject.rfc4514_string()
    retired = json.loads(cli(*opts, "trust", "retire", "--json").stdout)
    assert (retired["phase"], retired["version"]) == ("single", 3)
    report = cli(*opts, "trust", "bundle", "--verify-with", str(next_root), "--min-version", "3").stdout
    assert "version   3" in report and sha256_hex(cert(next_root)) in report


def test_owner_rights_and_remote_mode_are_required(cli: Cli, opts: tuple[str, ...]) -> None:
    local = cli("trust", "status", ok=False)
    assert local.exit_code == 1 and "--hub-url" in local.stderr
    reader = (*opts[:3], cli("policy", "connection-string", "registryRead").stdout.strip())
    writer = (*opts[:3], cli("policy", "connection-string", "registryReadWrite").stdout.strip())
    denied = cli(*writer, "trust", "next-root", ok=False)
    assert denied.exit_code == 1 and "requires the rights" in denied.stderr
    denied = cli(*reader, "tls", "reload", ok=False)
    assert denied.exit_code == 1 and "not authorized" in denied.stderr
    assert json.loads(cli(*opts, "trust", "status", "--json").stdout)["phase"] == "single"
    bundle = json.loads(cli(*reader, "trust", "bundle").stdout)  # any principal may fetch the bundle
    assert set(bundle) == {"payload", "signature", "signer"}
