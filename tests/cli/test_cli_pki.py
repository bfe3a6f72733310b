"""`tether pki …` and `tether ca …` (local mode only)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cryptography import x509

from tether.security.pki import load_certificate, load_certificates, thumbprints

from .conftest import Cli, json_lines


@pytest.fixture(autouse=True)
def work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`pki device-cert` writes to the current directory by default: make it a temporary one."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def server_names(cli: Cli) -> tuple[set[str], set[str]]:
    cert = load_certificate(cli.data_dir / "pki" / "server.pem")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return set(sans.get_values_for_type(x509.DNSName)), ips


def _field(output: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}: (.+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1).strip()


def test_pki_device_cert_prints_thumbprints_of_the_written_cert(cli: Cli, owner_cs: str,
                                                                work_dir: Path) -> None:
    out = cli("pki", "device-cert", "cam-1").stdout
    cert_path = Path(_field(out, "certificate"))
    key_path = Path(_field(out, "private key"))
    assert cert_path == work_dir / "cam-1.pem" and key_path == work_dir / "cam-1.key"  # not the data dir
    assert not (cli.data_dir / "devices").exists()
    assert key_path.stat().st_mode & 0o077 == 0
    cert = load_certificates(cert_path)[0]
    sha1, sha256 = thumbprints(cert)
    assert _field(out, "SHA-1 thumbprint") == sha1
    assert _field(out, "SHA-256 thumbprint") == sha256
    assert int(_field(out, "serial"), 16) == cert.serial_number
    assert cert.issuer == cert.subject  # self-signed by default

    created = json.loads(
        cli("device", "create", "cam-1", "--auth", "selfSigned", "--primary-thumbprint", sha1).stdout
    )
    assert created["authentication"]["x509Thumbprint"]["primaryThumbprint"].upper() == sha1


def test_pki_device_cert_out_dir_and_root_ca(cli: Cli, owner_cs: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "certs"
    out = cli("pki", "device-cert", "d-root", "--ca", "root", "--out", str(out_dir)).stdout
    chain = load_certificates(out_dir / "d-root.pem")
    root = load_certificates(cli.data_dir / "pki" / "root-ca.pem")[0]
    assert len(chain) == 1 and chain[0].issuer == root.subject
    assert _field(out, "SHA-256 thumbprint") == thumbprints(chain[0])[1]
    both = cli("pki", "device-cert", "d2", "--ca", "root", "--self-signed", ok=False)
    assert both.exit_code == 1
    missing = cli("pki", "device-cert", "d3", "--ca", "nope", ok=False)
    assert missing.exit_code == 1 and "pki ca-cert nope" in missing.stderr


def test_ca_registration_proof_crl_and_removal(cli: Cli, owner_cs: str) -> None:
    ca_pem = Path(_field(cli("pki", "ca-cert", "fleet").stdout, "CA certificate"))
    code = cli("ca", "add", "fleet", str(ca_pem)).stdout.strip()
    assert re.fullmatch(r"[0-9A-F]{16,}", code)
    listing = cli("ca", "list").stdout
    assert "fleet" in listing and " no " in listing

    proof = Path(_field(cli("pki", "proof-cert", "fleet", code).stdout, "proof certificate"))
    assert cli("ca", "verify", "fleet", str(proof)).stdout.strip() == "CA fleet verified"
    assert re.search(r"fleet\s+[0-9A-F]{40}\s+yes\s+no", cli("ca", "list").stdout)

    out = cli("pki", "device-cert", "truck-7", "--ca", "fleet").stdout
    chain = load_certificates(Path(_field(out, "certificate")))
    assert len(chain) == 2  # leaf + intermediate, so the hub can build the path
    serial = _field(out, "serial")
    crl_out = cli("pki", "crl", "--ca", "fleet", "--revoke", serial).stdout
    assert "attached to registered CA fleet" in crl_out
    crl = x509.load_pem_x509_crl(Path(_field(crl_out, "CRL").split(" (")[0]).read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    assert re.search(r"fleet\s+[0-9A-F]{40}\s+yes\s+yes", cli("ca", "list").stdout)
    assert cli("pki", "crl", "--ca", "fleet", "--revoke", "xyz", ok=False).exit_code == 1

    new_code = cli("ca", "verification-code", "fleet").stdout.strip()
    assert new_code and new_code != code
    bad_proof = cli("ca", "verify", "fleet", str(proof), ok=False)  # old code: refused
    assert bad_proof.exit_code == 1

    actions = {r["action"] for r in json_lines(cli("audit", "--json", "--action", "ca.").stdout)}
    assert {"ca.add", "ca.verify", "ca.crl"} <= actions

    assert cli("ca", "remove", "fleet").stdout.strip() == "removed CA fleet"
    assert "fleet" not in cli("ca", "list").stdout
    assert cli("ca", "remove", "fleet", ok=False).exit_code == 1


def test_ca_add_verified_and_rejects_non_ca(cli: Cli, owner_cs: str) -> None:
    root = cli.data_dir / "pki" / "root-ca.pem"
    assert "registered and verified" in cli("ca", "add", "dev-root", str(root), "--verified").stdout
    leaf = Path(_field(cli("pki", "device-cert", "leafy").stdout, "certificate"))
    refused = cli("ca", "add", "leaf", str(leaf), ok=False)
    assert refused.exit_code == 1 and "not a CA" in refused.stderr


def test_pki_and_ca_refuse_remote_mode(cli: Cli, owner_cs: str) -> None:
    result = cli("--hub-url", "http://127.0.0.1:9", "ca", "list", ok=False)
    assert result.exit_code == 1 and "local mode" in result.stderr
    result = cli("--hub-url", "http://127.0.0.1:9", "pki", "device-cert", "d", ok=False)
    assert result.exit_code == 1 and "local mode" in result.stderr


def test_pki_init_is_idempotent(cli: Cli, owner_cs: str) -> None:
    root = (cli.data_dir / "pki" / "root-ca.pem").read_bytes()
    out = cli("pki", "init").stdout
    assert "root-ca.pem" in out
    assert (cli.data_dir / "pki" / "root-ca.pem").read_bytes() == root


def test_pki_init_san_adds_names_and_reissues_only_when_the_set_changes(cli: Cli, owner_cs: str) -> None:
    server = cli.data_dir / "pki" / "server.pem"
    assert server_names(cli) == ({"localhost"}, {"127.0.0.1"})
    out = cli("pki", "init", "--san", "hub.example.com", "--san", "10.1.2.3", "--san", "[::1]",
              "--san", "*.edge.example.com").stdout
    assert "server names: " in out and "hub.example.com" in out
    wanted = ({"localhost", "hub.example.com", "*.edge.example.com"}, {"127.0.0.1", "10.1.2.3", "::1"})
    assert server_names(cli) == wanted
    root = load_certificate(cli.data_dir / "pki" / "root-ca.pem")
    load_certificate(server).verify_directly_issued_by(root)

    first = server.read_bytes()
    cli("pki", "init", "--san", "10.1.2.3", "--san", "HUB.example.com", "--san", "::1",
        "--san", "*.edge.example.com")
    assert server.read_bytes() == first  # same set (order, case, brackets aside): kept
    cli("pki", "init")
    cli("init")
    assert server.read_bytes() == first  # without --san a covering certificate is kept, extras included

    cli("pki", "init", "--san", "other.example.com")
    assert server_names(cli) == ({"localhost", "other.example.com"}, {"127.0.0.1"})  # exactly the new set


def test_pki_init_refuses_a_bad_san(cli: Cli, owner_cs: str) -> None:
    before = (cli.data_dir / "pki" / "server.pem").read_bytes()
    for bad in ("bad name", "-lead.example.com", "a..b", "x" * 300, "http://x"):
        result = cli("pki", "init", "--san", bad, ok=False)
        assert result.exit_code == 1 and "--san" in result.stderr, bad
    assert (cli.data_dir / "pki" / "server.pem").read_bytes() == before


def test_init_san_adds_names_to_the_server_certificate(tmp_path: Path) -> None:
    from cryptography import x509 as cx509
    from typer.testing import CliRunner

    from tether.cli.main import app

    data = tmp_path / "hub"
    runner = CliRunner()
    first = runner.invoke(app, ["--data-dir", str(data), "init"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["--data-dir", str(data), "init", "--if-needed", "--san", "hub.lan",
                                "--san", "192.168.7.9"])
    assert again.exit_code == 0, again.output
    cert = cx509.load_pem_x509_certificate((data / "pki" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(cx509.SubjectAlternativeName).value
    assert "hub.lan" in sans.get_values_for_type(cx509.DNSName)
    assert "192.168.7.9" in {str(ip) for ip in sans.get_values_for_type(cx509.IPAddress)}
