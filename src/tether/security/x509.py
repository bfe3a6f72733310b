"""X.509 device authentication: thumbprints, the registered-CA service and the certificate verifier.

The TLS layer lets every client chain through the handshake (tether.security.tls); this module decides
afterwards, the way Azure IoT Hub does:
- selfSigned devices are known only by thumbprint (SHA-1 as Azure shows it, or SHA-256), compared
  case-insensitively in constant time, plus the leaf's validity dates;
- certificateAuthority devices must present a chain that verifies up to a *verified* CA (proof of
  possession done), whose leaf CN is the device id, and which no CA CRL or device record revokes.
Path validation is cryptography's (`x509.verification`) with extension policies relaxed to what real
device certificates carry: SAN and AKI are optional, EKU must allow clientAuth when present, every CA
must assert basicConstraints cA (path-length limits are enforced by the builder).
"""

from __future__ import annotations

import asyncio
import builtins
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from tether.errors import BadRequest, NotFound, PreconditionFailed
from tether.registry.models import AuthType, Device
from tether.security.audit import AuditSink
from tether.security.principal import AuthRefused, CredentialKind
from tether.storage.sql.cas import CaRecord, CaRepository

__all__ = [
    "AuditSink",
    "CaService",
    "TrustSnapshot",
    "X509Verifier",
    "sha1_thumbprint",
    "sha256_thumbprint",
    "thumbprint_matches",
]

log = logging.getLogger(__name__)


# --- thumbprints ---------------------------------------------------------------------------------


def sha1_thumbprint(cert: x509.Certificate) -> str:
    """Azure's thumbprint: SHA-1 of the DER certificate, uppercase hex (an identifier, not a MAC)."""
    return cert.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303


def sha256_thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex().upper()


def _normalise_hex(value: str) -> str:
    return value.strip().replace(":", "").replace(" ", "").upper()


def thumbprint_matches(expected: str | None, cert: x509.Certificate) -> bool:
    """True when `expected` (40 hex = SHA-1, 64 hex = SHA-256, any case, ':' allowed) is the
    certificate's thumbprint. Constant time in the compared value."""
    if not expected:
        return False
    want = _normalise_hex(expected)
    if len(want) == 40:
        have = sha1_thumbprint(cert)
    elif len(want) == 64:
        have = sha256_thumbprint(cert)
    else:
        return False
    return hmac.compare_digest(want.encode("ascii", "replace"), have.encode("ascii"))


def _serial_key(value: str | int) -> str:
    if isinstance(value, int):
        return format(value, "x")
    text = _normalise_hex(value).lower()
    text = text.removeprefix("0x")
    return text.lstrip("0") or "0"


# --- audit ---------------------------------------------------------------------------------------




# --- CA registry ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustSnapshot:
    """Verified CAs and their CRLs, parsed once and shared by every verification until the registry
    changes (or `cache_ttl_s` passes, for hubs sharing one database)."""

    certificates: tuple[x509.Certificate, ...]
    store: Store | None
    crls: dict[bytes, tuple[x509.CertificateRevocationList, ...]]  # CA SPKI DER -> CRLs it signed
    loaded_at: float


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_cert(data: str | bytes) -> x509.Certificate:
    raw = data.encode() if isinstance(data, str) else data
    try:
        return (
            x509.load_pem_x509_certificate(raw)
            if b"-----BEGIN" in raw
            else x509.load_der_x509_certificate(raw)
        )
    except ValueError as exc:
        raise BadRequest(f"not a valid X.509 certificate: {exc}", code="CertificateInvalid") from exc


def _load_crl(data: str | bytes) -> x509.CertificateRevocationList:
    raw = data.encode() if isinstance(data, str) else data
    try:
        if b"-----BEGIN" in raw:
            return x509.load_pem_x509_crl(raw)
        return x509.load_der_x509_crl(raw)
    except ValueError as exc:
        raise BadRequest(f"not a valid CRL: {exc}", code="CrlInvalid") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _cn(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CaService:
    """Register, prove and revoke device CAs. Only verified CAs are trust anchors for devices."""

    def __init__(
        self,
        repo: CaRepository,
        audit: AuditSink | None = None,
        *,
        cache_ttl_s: float = 30.0,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._repo = repo
        self._audit = audit
        self._ttl = cache_ttl_s
        self._now = now
        self._snapshot: TrustSnapshot | None = None

    async def _record(
        self,
        action: str,
        outcome: str,
        actor: str,
        name: str,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if self._audit is not None:
            await self._audit.record(
                action, outcome, principal=actor, target=name, reason=reason, details=details
            )

    async def get(self, name: str) -> CaRecord:
        record = await self._repo.get(name)
        if record is None:
            raise NotFound(f"certificate {name!r} not found", code="CertificateNotFound")
        return record

    async def list(self) -> list[CaRecord]:
        return await self._repo.list()

    async def add(
        self, name: str, pem: str | bytes, *, verified: bool = False, actor: str = "system"
    ) -> CaRecord:
        """Register a CA certificate (unverified unless the operator says so) with a fresh code."""
        if not name or len(name) > 128 or any(c in name for c in "/\\ \t\r\n"):
            raise BadRequest(
                "certificate name must be 1-128 characters without '/', '\\' or spaces",
                code="ArgumentInvalid",
                field="name",
            )
        cert = _load_cert(pem)
        if not _is_ca(cert):
            raise BadRequest(
                "the certificate is not a CA (basicConstraints cA is not set)", code="CertificateInvalid"
            )
        now = self._now()
        record = CaRecord(
            name=name,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            thumbprint=sha1_thumbprint(cert),
            verified=verified,
            verification_code=None if verified else _new_code(),
            crl_pem=None,
            created=now,
            updated=now,
        )
        await self._repo.insert(record)
        self.invalidate()
        await self._record(
            "ca.add", "ok", actor, name, details={"thumbprint": record.thumbprint, "verified": verified}
        )
        return record

    async def verification_code(self, name: str, *, actor: str = "system") -> str:
        """A new proof-of-possession code; any earlier code stops working."""
        record = await self.get(name)
        code = _new_code()
        await self._repo.update(replace(record, verification_code=code, updated=self._now()))
        await self._record("ca.verification_code", "ok", actor, name)
        return code

    async def verify(self, name: str, proof_pem: str | bytes, *, actor: str = "system") -> CaRecord:
        """Proof of possession: `proof_pem` must be signed by the CA's key, have CN == the current
        code and be within its validity period. Consumes the code and marks the CA verified."""
        record = await self.get(name)
        try:
            ca_cert = _load_cert(record.certificate_pem)
            proof = _load_cert(proof_pem)
            code = record.verification_code
            if code is None:
                raise PreconditionFailed(
                    "no verification code is pending; request one first",
                    code="CertificateVerificationCodeMissing",
                )
            try:
                proof.verify_directly_issued_by(ca_cert)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise BadRequest(
                    "the proof certificate is not signed by this CA", code="CertificateValidationFailed"
                ) from exc
            cn = _cn(proof) or ""
            if not hmac.compare_digest(cn.encode(), code.encode()):
                raise BadRequest(
                    "the proof certificate's CN is not the current verification code",
                    code="CertificateValidationFailed",
                )
            now = self._now()
            if not proof.not_valid_before_utc <= now <= proof.not_valid_after_utc:
                raise BadRequest(
                    "the proof certificate is outside its validity period", code="CertificateValidationFailed"
                )
            done = replace(record, verified=True, verification_code=None, updated=now)
            if not await self._repo.update(done, expected_code=code):
                raise PreconditionFailed(
                    "the verification code changed meanwhile", code="CertificateVerificationCodeMissing"
                )
        except (BadRequest, PreconditionFailed) as exc:
            await self._record("ca.verify", "failed", actor, name, reason=exc.message)
            raise
        self.invalidate()
        await self._record("ca.verify", "ok", actor, name)
        return done

    async def remove(self, name: str, *, actor: str = "system") -> None:
        if not await self._repo.delete(name):
            raise NotFound(f"certificate {name!r} not found", code="CertificateNotFound")
        self.invalidate()
        await self._record("ca.remove", "ok", actor, name)

    async def set_crl(self, name: str, crl_data: str | bytes | None, *, actor: str = "system") -> CaRecord:
        """Attach (PEM or DER) or clear (None) the CA's CRL; it must be issued and signed by the CA."""
        record = await self.get(name)
        crl_pem: str | None = None
        if crl_data is not None:
            crl = _load_crl(crl_data)
            ca_cert = _load_cert(record.certificate_pem)
            public_key = ca_cert.public_key()
            if crl.issuer != ca_cert.subject or not crl.is_signature_valid(public_key):  # type: ignore[arg-type]
                await self._record("ca.crl", "failed", actor, name, reason="crl-not-from-ca")
                raise BadRequest("the CRL is not issued by this CA", code="CrlInvalid")
            crl_pem = crl.public_bytes(serialization.Encoding.PEM).decode("ascii")
        updated = replace(record, crl_pem=crl_pem, updated=self._now())
        await self._repo.update(updated)
        self.invalidate()
        await self._record("ca.crl", "ok", actor, name, details={"cleared": crl_pem is None})
        return updated

    async def load_crl_file(self, name: str, path: Path | str, *, actor: str = "system") -> CaRecord:
        """Re-read a CRL file (e.g. on SIGHUP or from a cron job publishing the CA's CRL)."""
        data = await asyncio.to_thread(Path(path).read_bytes)
        return await self.set_crl(name, data, actor=actor)

    async def verified_certificates(self) -> builtins.list[x509.Certificate]:
        return list((await self.trust()).certificates)

    def invalidate(self) -> None:
        self._snapshot = None

    async def trust(self) -> TrustSnapshot:
        snap = self._snapshot
        if snap is not None and time.monotonic() - snap.loaded_at < self._ttl:
            return snap
        certs: list[x509.Certificate] = []
        crls: dict[bytes, list[x509.CertificateRevocationList]] = {}
        for record in await self._repo.list():
            if not record.verified:
                continue
            cert = _load_cert(record.certificate_pem)
            certs.append(cert)
            if record.crl_pem:
                crls.setdefault(_spki(cert), []).append(_load_crl(record.crl_pem))
        snap = TrustSnapshot(
            certificates=tuple(certs),
            store=Store(certs) if certs else None,
            crls={k: tuple(v) for k, v in crls.items()},
            loaded_at=time.monotonic(),
        )
        self._snapshot = snap
        return snap


def _new_code() -> str:
    return secrets.token_hex(24).upper()


# --- verifier ------------------------------------------------------------------------------------


def _ca_basic_constraints(_policy: Policy, _cert: x509.Certificate, bc: x509.BasicConstraints) -> None:
    if not bc.ca:
        raise ValueError("basicConstraints cA is not asserted")


def _ca_key_usage(_policy: Policy, _cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("keyUsage lacks keyCertSign")


def _ee_basic_constraints(_policy: Policy, _cert: x509.Certificate, bc: x509.BasicConstraints | None) -> None:
    if bc is not None and bc.ca:
        raise ValueError("a device certificate must not be a CA")


def _ee_eku(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is not None and not _eku_allows_client(eku):
        raise ValueError("extendedKeyUsage does not allow clientAuth")


def _eku_allows_client(eku: x509.ExtendedKeyUsage) -> bool:
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku


_CA_POLICY = (
    ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _ca_basic_constraints)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
)
_EE_POLICY = (
    ExtensionPolicy.permit_all()
    .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, _ee_basic_constraints)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ee_eku)
)


class X509Verifier:
    """Implements tether.security.authenticator.CertificateVerifier. `cas` may be None on hubs with
    only selfSigned devices (every CA-signed device is then refused as untrusted)."""

    def __init__(self, cas: CaService | None = None, *, now: Callable[[], datetime] = _utcnow) -> None:
        self._cas = cas
        self._now = now

    async def verify(self, device: Device, chain: Sequence[x509.Certificate]) -> CredentialKind:
        if not chain:
            raise AuthRefused("no-client-certificate", "no client certificate was presented")
        leaf = chain[0]
        now = self._now()
        if now < leaf.not_valid_before_utc:
            raise AuthRefused("certificate-not-yet-valid", f"valid from {leaf.not_valid_before_utc}")
        if now > leaf.not_valid_after_utc:
            raise AuthRefused("certificate-expired", f"expired {leaf.not_valid_after_utc}")
        revoked = {_serial_key(s) for s in device.revoked_serials}
        if revoked and _serial_key(leaf.serial_number) in revoked:
            raise AuthRefused("certificate-revoked", "serial revoked on the device record")
        auth = device.authentication
        if auth.type is AuthType.self_signed:
            prints = auth.x509_thumbprint
            # Evaluate both comparisons so timing does not reveal which slot matched.
            primary = thumbprint_matches(prints.primary_thumbprint, leaf)
            secondary = thumbprint_matches(prints.secondary_thumbprint, leaf)
            if not (primary or secondary):
                raise AuthRefused("thumbprint-mismatch", "certificate thumbprint is not registered")
            return CredentialKind.x509_self_signed
        if auth.type is AuthType.certificate_authority:
            await self._verify_ca_chain(device, leaf, list(chain[1:]), now)
            return CredentialKind.x509_ca
        raise AuthRefused("wrong-auth-type", "identity does not use X.509")

    async def _verify_ca_chain(
        self, device: Device, leaf: x509.Certificate, intermediates: list[x509.Certificate], now: datetime
    ) -> None:
        cn = _cn(leaf)
        # A module's certificate names the module, so a device's certificate is not a module's.
        expected = f"{device.device_id}/{device.module_id}" if device.module_id else device.device_id
        if cn != expected:
            raise AuthRefused("cn-mismatch", "certificate CN is not the identity's id")
        snap = await self._cas.trust() if self._cas is not None else None
        if snap is None or snap.store is None:
            raise AuthRefused("untrusted-ca", "no verified certificate authority is registered")
        verifier = (
            PolicyBuilder()
            .store(snap.store)
            .time(now)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise AuthRefused("untrusted-ca", str(exc)[:200]) from exc
        path = verified.chain
        for cert, issuer in itertools.pairwise(path):
            for crl in snap.crls.get(_spki(issuer), ()):
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    raise AuthRefused(
                        "certificate-revoked", f"serial {cert.serial_number:x} is on the CA's CRL"
                    )
