"""The hub's trust bundle and root rollover: which roots are current and next, and the signed, versioned
bundle devices fetch to learn a new root before the hub's server certificate moves to it.

Devices pin the hub's root CA. Replacing that root outright would strand every deployed device, so the
rollover has three steps, each one admin call (docs/rollover.md):

1. `add_next_root` — a next root is created in the PKI directory; the bundle becomes
   [current, next], signed by the current root, version + 1. Devices fetch and verify it with the root
   they already pin (`pki.verify_trust_bundle`) and start trusting both.
2. `switch` — the server certificate is re-issued under the next root; the caller hot-reloads TLS.
   Devices that fetched step 1's bundle still connect; the bundle does not change.
3. `retire` — the next root becomes the current root (the old certificate is kept as
   `root-ca-prev.pem`); the bundle becomes [new current], signed by it, version + 1.

The version must never go down (devices refuse older bundles with `min_version`), so the signed bundle
is persisted as `trust-bundle.json` next to the roots and the version is read back from it on start.
Roots changed behind the hub's back (e.g. with `tether pki` while it runs) are noticed by file stat and
produce a new version, never a stale bundle. Files are replaced atomically.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether.config import Settings
from tether.errors import Conflict, NotFound, TetherError
from tether.security import pki
from tether.security.audit import AuditSink

__all__ = [
    "BUNDLE_FILE",
    "TrustBundle",
    "TrustPhase",
    "TrustService",
    "TrustStatus",
    "issued_by",
    "server_names",
    "sha256_hex",
]

BUNDLE_FILE = "trust-bundle.json"
_Stat = tuple[int, int, int] | None




class TrustPhase(StrEnum):
    """Where the hub is in a rollover."""

    single = "single"  # one root; the server certificate is under it
    published = "next-published"  # next root in the bundle; server certificate still under the current
    switched = "switched"  # server certificate under the next root; the old root still in the bundle


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """One signed bundle exactly as served: `data` never changes for a given `version`."""

    version: int
    data: bytes
    roots: tuple[x509.Certificate, ...]
    signer: str  # SHA-256 thumbprint of the root that signed it (the current root)

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.data).hexdigest()[:32] + '"'


@dataclass(frozen=True, slots=True)
class TrustStatus:
    bundle: TrustBundle
    phase: TrustPhase
    current_root: x509.Certificate
    next_root: x509.Certificate | None
    server_certificate: x509.Certificate | None  # the one on disk (what a TLS reload would serve)


def sha256_hex(cert: x509.Certificate) -> str:
    return pki.thumbprints(cert)[1]


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer`'s key signed `cert` (and the names chain)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def server_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IPs) of a server certificate's SAN, so a re-issued one covers the same names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return list(san.get_values_for_type(x509.DNSName)), ips



def _stat(path: Path) -> _Stat:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


@dataclass(frozen=True, slots=True)
class _Stored:
    version: int
    roots: tuple[str, ...]  # SHA-256 thumbprints, in bundle order
    signer: str


class TrustService:
    """Reads and changes the PKI directory's roots and keeps the signed bundle in step with them.

    One instance per hub process; every change is serialised by a lock and audited (`trust.*`).
    `cert_file`/`key_file` are the files the TLS listeners serve: `switch` refuses to write the
    PKI directory's server certificate when the hub serves other files (bring-your-own certificates)."""

    def __init__(
        self,
        pki_dir: Path | str,
        *,
        cert_file: Path | str | None = None,
        key_file: Path | str | None = None,
        audit: AuditSink | None = None,
    ) -> None:
        self.pki_dir = Path(pki_dir)
        self.cert_file = Path(cert_file) if cert_file is not None else self.pki_dir / pki.SERVER_CERT
        self.key_file = Path(key_file) if key_file is not None else self.pki_dir / pki.SERVER_KEY
        self._audit = audit
        self._lock = asyncio.Lock()
        self._cached: TrustBundle | None = None
        self._cached_stat: tuple[_Stat, ...] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, audit: AuditSink | None = None) -> TrustService:
        return cls(settings.pki_dir, cert_file=settings.cert_file, key_file=settings.key_file, audit=audit)

    @property
    def bundle_file(self) -> Path:
        return self.pki_dir / BUNDLE_FILE

    # --- reading -------------------------------------------------------------------------------

    async def bundle(self) -> TrustBundle:
        """The current signed bundle; re-signed (version + 1) when the roots on disk changed."""
        async with self._lock:
            return await self._bundle_locked()

    async def status(self) -> TrustStatus:
        async with self._lock:
            bundle = await self._bundle_locked()
            return await asyncio.to_thread(self._status, bundle)

    async def _bundle_locked(self) -> TrustBundle:
        stamp = self._files_stamp()
        if self._cached is not None and stamp == self._cached_stat:
            return self._cached  # hot path of every fetch: three stat() calls
        bundle = await asyncio.to_thread(self._reconcile)
        self._cached, self._cached_stat = bundle, self._files_stamp()
        return bundle

    def _files_stamp(self) -> tuple[_Stat, ...]:
        d = self.pki_dir
        return (_stat(d / pki.ROOT_CERT), _stat(d / pki.NEXT_ROOT_CERT), _stat(self.bundle_file))

    def _current_root(self) -> x509.Certificate:
        path = self.pki_dir / pki.ROOT_CERT
        try:
            return pki.load_certificate(path)
        except FileNotFoundError:
            raise NotFound(
                f"this hub has no root CA at {path}: the trust bundle needs the hub's own PKI "
                "(`tether pki init`)",
                code="TrustBundleNotFound",
            ) from None

    def _next_root(self) -> x509.Certificate | None:
        path = self.pki_dir / pki.NEXT_ROOT_CERT
        return pki.load_certificate(path) if path.exists() else None

    def _read_stored(self) -> _Stored | None:
        """Version, roots and signer of the persisted bundle (our own file: the signature is not
        re-checked, only compared with the roots now on disk)."""
        try:
            raw = self.bundle_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc: Any = json.loads(raw)
            body: Any = json.loads(base64.b64decode(doc["payload"], validate=True))
            roots = [x509.load_pem_x509_certificate(p.encode("ascii")) for p in body["roots"]]
            return _Stored(int(body["version"]), tuple(sha256_hex(r) for r in roots), str(doc["signer"]))
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise TetherError(
                f"{self.bundle_file} is unreadable ({type(exc).__name__}); restore it from a backup — "
                "deleting it restarts at version 1, which devices holding a newer bundle refuse",
                code="TrustBundleCorrupt",
            ) from exc

    def _reconcile(self) -> TrustBundle:
        current = self._current_root()
        nxt = self._next_root()
        roots = (current,) if nxt is None or nxt == current else (current, nxt)
        prints, signer = tuple(sha256_hex(r) for r in roots), sha256_hex(current)
        stored = self._read_stored()
        if stored is not None and stored.roots == prints and stored.signer == signer:
            return TrustBundle(stored.version, self.bundle_file.read_bytes(), roots, signer)
        try:
            key = pki.load_private_key(self.pki_dir / pki.ROOT_KEY)
        except FileNotFoundError:
            raise TetherError(
                f"the roots changed, so the bundle must be re-signed, but {pki.ROOT_KEY} is not in "
                f"{self.pki_dir}: put the current root's key back for the rollover step",
                code="TrustRootKeyMissing",
            ) from None
        if not _same_key(current, key):
            raise TetherError(f"{pki.ROOT_KEY} does not belong to {pki.ROOT_CERT} in {self.pki_dir}",
                              code="TrustRootKeyMismatch")
        version = stored.version + 1 if stored is not None else 1
        data = pki.build_trust_bundle(current, key, list(roots), version)
        pki.atomic_write(self.bundle_file, data, 0o644)  # the bundle holds public certificates only
        return TrustBundle(version, data, roots, signer)

    def _server_certificate(self) -> x509.Certificate | None:
        try:
            return pki.load_certificate(self.cert_file)
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def _status(self, bundle: TrustBundle) -> TrustStatus:
        current, nxt = self._current_root(), self._next_root()
        server = self._server_certificate()
        if nxt is None:
            phase = TrustPhase.single
        elif server is not None and issued_by(server, nxt):
            phase = TrustPhase.switched
        else:
            phase = TrustPhase.published
        return TrustStatus(bundle, phase, current, nxt, server)

    # --- changing ------------------------------------------------------------------------------

    async def add_next_root(self, *, actor: str) -> tuple[TrustStatus, bool]:
        """Step 1. Returns (status, created); an existing next root is kept (idempotent)."""
        return await self._change("trust.next_root", actor, self._add_next_root)

    async def switch(self, *, actor: str) -> tuple[TrustStatus, bool]:
        """Step 2: re-issue the server certificate under the next root (same names). Returns
        (status, reissued); nothing is re-issued when it already is under the next root. The caller
        reloads TLS."""
        return await self._change("trust.switch", actor, self._switch)

    async def retire(self, *, actor: str, served: x509.Certificate | None = None) -> tuple[TrustStatus, bool]:
        """Step 3: the next root becomes current; the bundle drops the old root. `served` is the
        certificate the listeners serve right now (it too must be under the next root)."""
        return await self._change("trust.retire", actor, lambda: self._retire(served))

    async def _change(self, action: str, actor: str, work: Callable[[], bool]) -> tuple[TrustStatus, bool]:
        async with self._lock:
            try:
                before = (await self._bundle_locked()).version
                changed = await asyncio.to_thread(work)
                self._cached = None
                bundle = await self._bundle_locked()
                status = await asyncio.to_thread(self._status, bundle)
            except TetherError as exc:
                await self._record(action, "failed", actor, reason=exc.code, details={"message": exc.message})
                raise
        details: dict[str, Any] = {
            "changed": changed,
            "version": bundle.version,
            "previousVersion": before,
            "phase": status.phase.value,
            "roots": [sha256_hex(r) for r in bundle.roots],
        }
        if status.server_certificate is not None:
            details["serverCertificate"] = sha256_hex(status.server_certificate)
        await self._record(action, "ok", actor, details=details)
        return status, changed

    async def _record(self, action: str, outcome: str, actor: str, *, reason: str | None = None,
                      details: dict[str, Any] | None = None) -> None:
        if self._audit is not None:
            await self._audit.record(action, outcome, principal=actor, target=str(self.pki_dir),
                                     reason=reason, details=details)

    def _require_next(self) -> x509.Certificate:
        nxt = self._next_root()
        if nxt is None or not (self.pki_dir / pki.NEXT_ROOT_KEY).exists():
            raise Conflict("there is no next root: create one with POST /tether/admin/trust/next-root",
                           code="TrustNextRootMissing")
        return nxt

    def _add_next_root(self) -> bool:
        self._current_root()  # 404 when the hub has no PKI of its own
        if self._next_root() is not None and (self.pki_dir / pki.NEXT_ROOT_KEY).exists():
            return False
        stored = self._read_stored()
        generation = (stored.version if stored is not None else 1) + 1
        pki.next_root(self.pki_dir, f"Tether Root CA (bundle v{generation}, {os.urandom(4).hex()})")
        return True

    def _switch(self) -> bool:
        nxt = self._require_next()
        own_cert, own_key = self.pki_dir / pki.SERVER_CERT, self.pki_dir / pki.SERVER_KEY
        if self.cert_file.resolve() != own_cert.resolve() or self.key_file.resolve() != own_key.resolve():
            raise Conflict(
                f"the hub serves {self.cert_file}, not the PKI directory's {pki.SERVER_CERT}: issue the "
                "new certificate yourself, then POST /tether/admin/tls/reload",
                code="TrustExternalCertificate",
            )
        server = self._server_certificate()
        if server is not None and issued_by(server, nxt):
            return False
        hostnames, ips = server_names(server) if server is not None else ([], [])
        if not hostnames and not ips:
            hostnames, ips = ["localhost"], ["127.0.0.1"]
        pki.reissue_server_cert_under_next_root(self.pki_dir, hostnames, ips)
        return True

    def _retire(self, served: x509.Certificate | None) -> bool:
        nxt = self._require_next()
        server = self._server_certificate()
        for what, cert in (("on disk", server), ("served", served)):
            if cert is not None and not issued_by(cert, nxt):
                raise Conflict(
                    f"the server certificate {what} is not under the next root: POST "
                    "/tether/admin/trust/switch first (retiring now would cut off every device)",
                    code="TrustNotSwitched",
                )
        if server is None:
            raise Conflict(f"no server certificate at {self.cert_file}", code="TrustNotSwitched")
        pki.promote_next_root(self.pki_dir)
        return True
