"""Development PKI: a local root CA, the hub's server certificate, device and proof certificates, CRLs,
and the signed trust bundle used to roll the root over without bricking devices.

Everything is ECDSA P-256 (cheapest handshake on small machines, see docs/decisions/0002). Keys are
written with mode 0600 and every file is replaced atomically, so a hub reloading its TLS context never
sees half a file. Production deployments may bring their own certificates; nothing here is required at
run time except by `tether pki init` and the tests.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "PkiFiles",
    "TrustBundleError",
    "build_trust_bundle",
    "generate_key",
    "init_pki",
    "issue_device_cert",
    "issue_intermediate_ca",
    "issue_root_ca",
    "issue_server_cert",
    "issue_verification_cert",
    "load_certificate",
    "load_certificates",
    "load_private_key",
    "make_crl",
    "next_root",
    "promote_next_root",
    "reissue_server_cert_under_next_root",
    "server_cert_for_ip",
    "thumbprints",
    "verify_trust_bundle",
    "write_certificates",
    "write_private_key",
]

ROOT_CERT = "root-ca.pem"
ROOT_KEY = "root-ca.key"
NEXT_ROOT_CERT = "root-ca-next.pem"
NEXT_ROOT_KEY = "root-ca-next.key"
PREV_ROOT_CERT = "root-ca-prev.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

_BACKDATE = timedelta(minutes=5)  # tolerate small clock differences between hub and devices
_RENEW_BEFORE = timedelta(days=30)
_DNS_UNSAFE = re.compile(r"[^a-z0-9.-]+")


# --- keys and files ------------------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write-then-rename with fsync: a crash or a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, 0o600)


def write_certificates(path: Path, certs: Sequence[x509.Certificate]) -> None:
    atomic_write(path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs), 0o644)


def load_certificates(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def load_certificate(path: Path) -> x509.Certificate:
    return load_certificates(path)[0]


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key")
    return key


def thumbprints(cert: x509.Certificate) -> tuple[str, str]:
    """(SHA-1, SHA-256) of the DER certificate, uppercase hex as Azure shows them."""
    return cert.fingerprint(hashes.SHA1()).hex().upper(), cert.fingerprint(hashes.SHA256()).hex().upper()  # noqa: S303  (Azure thumbprint, not a security hash)


# --- certificate builders ------------------------------------------------------------------------


def _name(cn: str, org: str | None = "Tether") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    days: float,
    valid_from: datetime | None,
) -> x509.CertificateBuilder:
    start = valid_from or (datetime.now(UTC) - _BACKDATE)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _aki(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:  # a foreign CA without SKI: derive it from the key
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _ee_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue_root_ca(
    common_name: str = "Tether Dev Root CA", *, days: float = 3652, valid_from: datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = generate_key()
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), days, valid_from)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_intermediate_ca(
    common_name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    days: float = 1826,
    path_length: int | None = 0,
    valid_from: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = generate_key()
    cert = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), days, valid_from)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _ip_or_none(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def issue_server_cert(
    hostnames: Iterable[str],
    ips: Iterable[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    days: float = 365,
    valid_from: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A hub certificate with a SAN for every host name and IP (the Azure SDKs check the host name)."""
    names: list[x509.GeneralName] = []
    for host in hostnames:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host  # "localhost:8443" -> "localhost"
        ip = _ip_or_none(host)
        names.append(x509.IPAddress(ip) if ip else x509.DNSName(host))
    names.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)
    names = list(dict.fromkeys(names))  # keep order, drop duplicates
    if not names:
        raise ValueError("a server certificate needs at least one host name or IP")
    first = names[0]
    cn = str(first.value)
    key = generate_key()
    cert = (
        _builder(_name(cn), ca_cert.subject, key.public_key(), days, valid_from)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ee_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def server_cert_for_ip(
    ip: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    hostnames: Sequence[str] = ("localhost",),
    days: float = 30,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Tests that run one hub per loopback address (127.0.0.N) need a certificate for that IP."""
    return issue_server_cert(hostnames, [ip], ca_cert, ca_key, days=days)


def dns_safe(device_id: str) -> str:
    """Device ids allow characters DNS names don't; the SAN carries a lowercase, hyphenated form."""
    safe = _DNS_UNSAFE.sub("-", device_id.lower()).strip("-.")
    return safe or "device"


def issue_device_cert(
    device_id: str,
    *,
    ca_cert: x509.Certificate | None = None,
    ca_key: ec.EllipticCurvePrivateKey | None = None,
    self_signed: bool = False,
    days: float = 365,
    valid_from: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A device certificate: CN = device id (Azure's rule for CA-signed devices), clientAuth EKU and a
    DNS SAN so strict path validators accept it. Either `self_signed=True` or a CA cert and key."""
    key = generate_key()
    subject = _name(device_id, org=None)
    if self_signed:
        issuer, signer, aki = subject, key, None
    elif ca_cert is not None and ca_key is not None:
        issuer, signer, aki = ca_cert.subject, ca_key, _aki(ca_cert)
    else:
        raise ValueError("pass ca_cert and ca_key, or self_signed=True")
    builder = (
        _builder(subject, issuer, key.public_key(), days, valid_from)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ee_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_safe(device_id))]), critical=False)
    )
    if aki is not None:
        builder = builder.add_extension(aki, critical=False)
    return builder.sign(signer, hashes.SHA256()), key


def issue_verification_cert(
    code: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, days: float = 1
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Proof of possession for a CA registration: CN = the hub's verification code, signed by the CA."""
    key = generate_key()
    cert = (
        _builder(_name(code, org=None), ca_cert.subject, key.public_key(), days, None)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_aki(ca_cert), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_crl(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    revoked_serials: Iterable[int],
    *,
    days: float = 7,
) -> x509.CertificateRevocationList:
    now = datetime.now(UTC) - _BACKDATE
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=days))
        .add_extension(_aki(ca_cert), critical=False)
    )
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca_key, hashes.SHA256())


# --- the hub's PKI directory ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PkiFiles:
    root_cert: Path
    root_key: Path
    server_cert: Path
    server_key: Path


def _files(directory: Path) -> PkiFiles:
    return PkiFiles(
        directory / ROOT_CERT, directory / ROOT_KEY, directory / SERVER_CERT, directory / SERVER_KEY
    )


def _server_cert_ok(path: Path, hostnames: Sequence[str], ips: Sequence[str], root: x509.Certificate,
                    *, exact: bool = False) -> bool:
    """True when the existing server certificate is from this root, covers every name (with `exact`:
    exactly these names, no others), and isn't near expiry; then `init_pki` keeps it (idempotent)."""
    try:
        cert = load_certificate(path)
        cert.verify_directly_issued_by(root)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, IndexError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    have_dns = {n.lower() for n in sans.get_values_for_type(x509.DNSName)}
    have_ips = set(sans.get_values_for_type(x509.IPAddress))
    want_dns: set[str] = set()
    want_ips = {ipaddress.ip_address(ip) for ip in ips}
    for host in hostnames:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        ip = _ip_or_none(host)
        if ip is None:
            want_dns.add(host.lower())
        else:
            want_ips.add(ip)
    if not (want_dns <= have_dns and want_ips <= have_ips):
        return False
    if exact and (have_dns != want_dns or have_ips != want_ips):
        return False
    return cert.not_valid_after_utc - datetime.now(UTC) > _RENEW_BEFORE


def init_pki(directory: Path | str, hostnames: list[str], ips: list[str], *, exact: bool = False) -> PkiFiles:
    """Create (or keep) the dev root CA and the hub server certificate in `directory`.

    Idempotent: an existing root is reused; the server certificate is re-issued only when it is missing,
    not from this root, lacks one of the names (with `exact`: has other names too), or expires within
    30 days."""
    directory = Path(directory)
    files = _files(directory)
    if files.root_cert.exists() and files.root_key.exists():
        root_cert, root_key = load_certificate(files.root_cert), load_private_key(files.root_key)
    else:
        root_cert, root_key = issue_root_ca()
        write_private_key(files.root_key, root_key)
        write_certificates(files.root_cert, [root_cert])
    if not (files.server_key.exists()
            and _server_cert_ok(files.server_cert, hostnames, ips, root_cert, exact=exact)):
        cert, key = issue_server_cert(hostnames, ips, root_cert, root_key)
        write_private_key(files.server_key, key)  # key first: a reload between the two writes fails
        write_certificates(files.server_cert, [cert])  # check_privatekey and keeps the old context
    return files


def next_root(directory: Path | str, common_name: str = "Tether Dev Root CA (next)") -> PkiFiles:
    """Create the next root (root-ca-next.pem/.key) for a rollover; existing files are kept."""
    directory = Path(directory)
    cert_path, key_path = directory / NEXT_ROOT_CERT, directory / NEXT_ROOT_KEY
    if not (cert_path.exists() and key_path.exists()):
        cert, key = issue_root_ca(common_name)
        write_private_key(key_path, key)
        write_certificates(cert_path, [cert])
    files = _files(directory)
    return PkiFiles(cert_path, key_path, files.server_cert, files.server_key)


def reissue_server_cert_under_next_root(
    directory: Path | str, hostnames: list[str], ips: list[str]
) -> x509.Certificate:
    """Step 2 of a rollover (after devices received a bundle with both roots): the server certificate is
    issued by the next root; a TLS context reload then serves it."""
    directory = Path(directory)
    root_cert = load_certificate(directory / NEXT_ROOT_CERT)
    root_key = load_private_key(directory / NEXT_ROOT_KEY)
    cert, key = issue_server_cert(hostnames, ips, root_cert, root_key)
    files = _files(directory)
    write_private_key(files.server_key, key)
    write_certificates(files.server_cert, [cert])
    return cert


def promote_next_root(directory: Path | str) -> PkiFiles:
    """Step 3: the next root becomes the root; the old root certificate is kept as root-ca-prev.pem."""
    directory = Path(directory)
    files = _files(directory)
    os.replace(files.root_cert, directory / PREV_ROOT_CERT)
    os.replace(directory / NEXT_ROOT_KEY, files.root_key)
    os.replace(directory / NEXT_ROOT_CERT, files.root_cert)
    return files


# --- trust bundle --------------------------------------------------------------------------------


class TrustBundleError(ValueError):
    """The bundle is malformed, not signed by a pinned root, or older than the one already held."""


def _sha256_hex(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def build_trust_bundle(
    current_root_cert: x509.Certificate,
    current_root_key: ec.EllipticCurvePrivateKey,
    roots: list[x509.Certificate],
    version: int,
) -> bytes:
    """A JSON document `{payload, signature, signer}`: payload is base64 of
    `{"version", "issued", "roots": [PEM, ...]}`, signature is base64 DER ECDSA-SHA256 over the payload
    bytes by the current root key, signer the current root's SHA-256 thumbprint. Devices pinned to the
    current root can then learn the next root before the hub switches to it."""
    if not roots:
        raise ValueError("a trust bundle needs at least one root")
    body = {
        "version": version,
        "issued": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "roots": [r.public_bytes(serialization.Encoding.PEM).decode("ascii") for r in roots],
    }
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    signature = current_root_key.sign(payload, ec.ECDSA(hashes.SHA256()))
    doc = {
        "payload": base64.b64encode(payload).decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
        "signer": _sha256_hex(current_root_cert),
    }
    return json.dumps(doc, indent=1).encode()


def verify_trust_bundle(
    data: bytes, pinned_roots: Sequence[x509.Certificate], *, min_version: int | None = None
) -> list[x509.Certificate]:
    """Device side: check the bundle's signature with a pinned root and return its root list.

    `min_version` (the version the device already holds) refuses a replayed older bundle."""
    try:
        doc: Any = json.loads(data)
        payload = base64.b64decode(doc["payload"], validate=True)
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise TrustBundleError(f"malformed trust bundle: {exc}") from exc
    for root in pinned_roots:
        public_key = root.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            continue
        try:
            public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        break
    else:
        raise TrustBundleError("trust bundle is not signed by a pinned root")
    try:
        body: Any = json.loads(payload)
        version = int(body["version"])
        roots = [x509.load_pem_x509_certificate(p.encode("ascii")) for p in body["roots"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TrustBundleError(f"malformed trust bundle payload: {exc}") from exc
    if not roots:
        raise TrustBundleError("trust bundle has no roots")
    if min_version is not None and version < min_version:
        raise TrustBundleError(f"trust bundle version {version} is older than {min_version}")
    return roots
