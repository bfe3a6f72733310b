"""Connection-security routes: the signed trust bundle devices fetch, and the owner's TLS and root
rollover controls.

`GET /tether/trust-bundle` serves the hub's current bundle (`tether.security.trust`) to ANY
authenticated principal: a device (SAS in `Authorization`, its device id taken from the token's `sr`;
or, without that header, its mutual-TLS client certificate), a device-scoped token minted with a
DeviceConnect policy key (`skn`), or a service policy holding ServiceConnect or RegistryRead. Roots are
public, but an authenticated fetch means every download is attributable in the audit log. Devices
still verify the signature with the root they pin: TLS alone must not be what they trust the bundle for.

`/tether/admin/*` needs an owner policy (all four rights, the same check as policy management):
`tls/reload` re-reads the certificate files (also on SIGHUP), `trust/next-root`, `trust/switch` and
`trust/retire` are the three rollover steps of docs/rollover.md, `GET trust` shows where the hub is.

`FEATURE` is this module's part of the route table (`api.app` lists it); its setup keeps the trust
service on the app.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Final

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field

from tether.api.auth import OWNER_RIGHTS, refusal_error, require_all
from tether.api.auth import SURFACE as SERVICE_SURFACE
from tether.api.context import hub_of, peer_of, principal_of
from tether.api.routes import Feature, Param, Route
from tether.errors import Conflict, TetherError
from tether.security.principal import AuthRefused, Permission, Principal
from tether.security.sas import SasError, parse_token
from tether.security.tls import TlsContextFactory
from tether.security.trust import TrustService, TrustStatus, sha256_hex

if TYPE_CHECKING:
    from tether.hub import Hub

__all__ = ["FEATURE", "SECURITY_ROUTES", "TRUST_KEY", "authenticate_any", "trust_of"]

DEVICE_SURFACE: Final = "https"  # device credentials over HTTPS are audited as auth.https
VERSION_HEADER: Final = "x-tether-trust-bundle-version"
TRUST_KEY: web.AppKey[TrustService] = web.AppKey("trust", TrustService)
ADMIN_WHAT: Final = "TLS and trust administration"


# --- response bodies -----------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    def to_wire(self) -> dict[str, object]:
        return self.model_dump(mode="json", by_alias=True)


class TrustBundleDocument(_Wire):
    """The signed bundle. Check it with `tether.security.pki.verify_trust_bundle(data, pinned_roots,
    min_version=held_version)` before trusting any root in it."""

    payload: str = Field(description='base64 of JSON {"version", "issued", "roots": [PEM, ...]}')
    signature: str = Field(description="base64 DER ECDSA-SHA256 over the payload bytes by the current root")
    signer: str = Field(description="SHA-256 thumbprint of the signing root (uppercase hex)")


class CertificateInfo(_Wire):
    subject: str
    issuer: str
    thumbprint: str = Field(description="SHA-256 of the DER certificate, uppercase hex")
    serial_number: str = Field(alias="serialNumber", description="hex")
    not_before: datetime = Field(alias="notBefore")
    not_after: datetime = Field(alias="notAfter")

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertificateInfo:
        return cls(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            thumbprint=sha256_hex(cert),
            serial_number=format(cert.serial_number, "X"),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )


class TlsReloadResult(_Wire):
    """The certificate new connections get from now on."""

    thumbprint: str = Field(description="SHA-256 of the served certificate, uppercase hex")
    not_after: datetime = Field(alias="notAfter")
    subject: str
    issuer: str
    generation: int = Field(description="Counts TLS context loads since start (1 = the first)")


class TrustState(_Wire):
    version: int = Field(description="Version of the bundle now served")
    phase: str = Field(description="single | next-published | switched")
    changed: bool = Field(description="Whether this call changed anything (the admin steps are idempotent)")
    roots: list[CertificateInfo] = Field(description="The bundle's roots, current first")
    current_root: CertificateInfo = Field(alias="currentRoot")
    next_root: CertificateInfo | None = Field(None, alias="nextRoot")
    server_certificate: CertificateInfo | None = Field(
        None, alias="serverCertificate", description="The certificate file a TLS reload serves")
    served_certificate: CertificateInfo | None = Field(
        None, alias="servedCertificate", description="What the running listeners serve now")

    @classmethod
    def of(cls, status: TrustStatus, *, changed: bool, served: x509.Certificate | None) -> TrustState:
        server = status.server_certificate
        return cls(
            version=status.bundle.version,
            phase=status.phase.value,
            changed=changed,
            roots=[CertificateInfo.of(r) for r in status.bundle.roots],
            current_root=CertificateInfo.of(status.current_root),
            next_root=CertificateInfo.of(status.next_root) if status.next_root is not None else None,
            server_certificate=CertificateInfo.of(server) if server is not None else None,
            served_certificate=CertificateInfo.of(served) if served is not None else None,
        )


# --- helpers -------------------------------------------------------------------------------------


def trust_of(request: web.Request) -> TrustService:
    service = request.app.get(TRUST_KEY)
    if service is None:
        raise RuntimeError("no TrustService: build the app with build_app(hub)")
    return service


def _tls(hub: Hub) -> TlsContextFactory | None:
    factory = hub.tls
    return factory if isinstance(factory, TlsContextFactory) else None


def _device_claim(authorization: str) -> tuple[str, str | None] | None:
    """(device id, module id) named by a device-scoped token's `sr`; None for hub-level (service)
    tokens and for anything unparsable (the service path then refuses and audits it)."""
    try:
        token = parse_token(authorization)
    except SasError:
        return None
    parts = token.resource.rstrip("/").split("/")[1:]
    if len(parts) == 2 and parts[0] == "devices":
        return parts[1], None
    if len(parts) == 4 and parts[0] == "devices" and parts[2] == "modules":
        return parts[1], parts[3]
    return None


async def _service_right(hub: Hub, authorization: str) -> Permission:
    """ServiceConnect when the named policy has it, else RegistryRead: either right suffices, and
    asking the authenticator for the one the policy holds keeps to one audit record per fetch."""
    try:
        name = parse_token(authorization).policy_name
    except SasError:
        return Permission.registry_read
    policy = await hub.policies.find(name) if name else None
    if policy is not None and Permission.service_connect.value in policy.permissions:
        return Permission.service_connect
    return Permission.registry_read


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else ""


async def authenticate_any(request: web.Request) -> Principal:
    """Any principal the hub knows: device SAS (id from `sr`), device client certificate (id from
    `?deviceId=`, else the leaf CN), or a service policy with ServiceConnect or RegistryRead. Every
    attempt writes one audit record (by the authenticator); refusals answer 401/403."""
    hub = hub_of(request)
    peer = peer_of(request)
    auth = hub.authenticator
    authorization = request.headers.get("Authorization")
    try:
        if authorization:
            claim = _device_claim(authorization)
            if claim is not None:
                device_id, module_id = claim
                return await auth.device_sas(authorization, device_id, module_id, surface=DEVICE_SURFACE,
                                             peer=peer)
            required = await _service_right(hub, authorization)
            return await auth.service(authorization, required=required, surface=SERVICE_SURFACE, peer=peer)
        transport = request.transport
        chain: Sequence[x509.Certificate] = (
            transport.get_extra_info("peercert_chain") if transport is not None else None
        ) or ()
        if chain:
            device_id = request.query.get("deviceId") or _common_name(chain[0])
            return await auth.device_certificate(list(chain), device_id, surface=DEVICE_SURFACE, peer=peer)
        # Neither credential: the authenticator audits the refusal as missing-credentials.
        return await auth.service(None, required=Permission.registry_read, surface=SERVICE_SURFACE, peer=peer)
    except AuthRefused as exc:
        raise refusal_error(exc) from None


async def _owner(request: web.Request) -> str:
    principal = principal_of(request)
    await require_all(request, principal, OWNER_RIGHTS, what=ADMIN_WHAT)
    return principal.name


def _json(model: _Wire) -> web.Response:
    return web.json_response(model.to_wire())


# --- handlers ------------------------------------------------------------------------------------


async def get_trust_bundle(request: web.Request) -> web.Response:
    """The signed bundle as stored; `If-None-Match` with the ETag answers 304."""
    principal = await authenticate_any(request)
    bundle = await trust_of(request).bundle()
    headers = {"ETag": bundle.etag, VERSION_HEADER: str(bundle.version), "Cache-Control": "no-cache"}
    unchanged = bundle.etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}
    # One record per fetch: during a rollover the operator checks which devices hold the new version.
    await hub_of(request).audit.record(
        "trust.fetch", "ok", principal=principal.name, credential=principal.credential.value,
        peer=peer_of(request), details={"version": bundle.version, "notModified": unchanged},
    )
    if unchanged:
        return web.Response(status=304, headers=headers)
    return web.Response(body=bundle.data, content_type="application/json", headers=headers)


async def _reload(
    request: web.Request, factory: TlsContextFactory, actor: str, cause: str
) -> TlsReloadResult:
    """`hub.reload_tls()` with its audit record; a failure keeps the previous context in service."""
    hub = hub_of(request)
    try:
        hub.reload_tls()
    except Exception as exc:
        reason = type(exc).__name__
        await hub.audit.record("tls.reload", "failed", principal=actor, reason=reason, peer=peer_of(request),
                               target=str(factory.cert_file), details={"cause": cause})
        raise TetherError(f"TLS reload failed ({reason}): still serving the previous certificate; check "
                          f"{factory.cert_file} and {factory.key_file}", code="TlsReloadFailed") from None
    cert = factory.certificate
    result = TlsReloadResult(thumbprint=sha256_hex(cert), not_after=cert.not_valid_after_utc,
                             subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
                             generation=factory.generation)
    await hub.audit.record("tls.reload", "ok", principal=actor, peer=peer_of(request),
                           target=str(factory.cert_file),
                           details={"thumbprint": result.thumbprint, "generation": result.generation,
                                    "cause": cause})
    return result


async def reload_tls(request: web.Request) -> web.Response:
    actor = await _owner(request)
    factory = _tls(hub_of(request))
    if factory is None:
        raise Conflict("the TLS listeners are not running", code="TlsNotRunning")
    return _json(await _reload(request, factory, actor, "admin"))


def _served(hub: Hub) -> x509.Certificate | None:
    factory = _tls(hub)
    return factory.certificate if factory is not None else None


async def trust_status(request: web.Request) -> web.Response:
    await _owner(request)
    status = await trust_of(request).status()
    return _json(TrustState.of(status, changed=False, served=_served(hub_of(request))))


async def add_next_root(request: web.Request) -> web.Response:
    actor = await _owner(request)
    status, created = await trust_of(request).add_next_root(actor=actor)
    return _json(TrustState.of(status, changed=created, served=_served(hub_of(request))))


async def switch_root(request: web.Request) -> web.Response:
    """Re-issue the server certificate under the next root, then hot-reload the listeners: live
    connections keep the certificate they were opened with, new ones get the new one."""
    actor = await _owner(request)
    hub = hub_of(request)
    status, reissued = await trust_of(request).switch(actor=actor)
    factory = _tls(hub)
    if factory is not None and (reissued or factory.certificate != status.server_certificate):
        await _reload(request, factory, actor, "trust.switch")
    return _json(TrustState.of(status, changed=reissued, served=_served(hub)))


async def retire_root(request: web.Request) -> web.Response:
    actor = await _owner(request)
    served = _served(hub_of(request))
    status, retired = await trust_of(request).retire(actor=actor, served=served)
    return _json(TrustState.of(status, changed=retired, served=served))


# --- route table ---------------------------------------------------------------------------------

OWNER = Permission.registry_write  # the route guard; every admin handler then requires all four rights
_OWNER_NOTE = "Owner only: a policy with all four rights (403 otherwise, audited)."

TRUST_BUNDLE_ROUTE = Route(
    "GET", "/tether/trust-bundle", get_trust_bundle, "The hub's signed trust bundle (current and next root)",
    Permission.registry_read, "tether-security", response=TrustBundleDocument, response_headers=(
        "ETag", VERSION_HEADER),
    params=(Param("deviceId", "query", "Mutual TLS only: the device the client certificate is for "
                                       "(default: the certificate's CN)."),
            Param("If-None-Match", "header", "ETag of the bundle held: 304 when unchanged.")),
    description="Any authenticated principal: a device SAS token (device id from `sr`; a "
                "DeviceConnect policy token with `skn` too), a device client certificate over mutual "
                "TLS (no Authorization header), or a policy with ServiceConnect or RegistryRead. Devices "
                "must verify the signature with the root they already pin and refuse versions older than "
                "the one they hold.", self_auth=True)

ADMIN_ROUTES: tuple[Route, ...] = (
    Route("POST", "/tether/admin/tls/reload", reload_tls, "Reload the TLS certificate files (like SIGHUP)",
          OWNER, "tether-security", response=TlsReloadResult,
          description=f"{_OWNER_NOTE} New connections get the new certificate; live ones keep theirs. "
                      "409 TlsNotRunning without TLS listeners; 500 TlsReloadFailed keeps the old one."),
    Route("GET", "/tether/admin/trust", trust_status, "Rollover state: bundle version, roots, phase",
          OWNER, "tether-security", response=TrustState, description=_OWNER_NOTE),
    Route("POST", "/tether/admin/trust/next-root", add_next_root, "Rollover step 1: create the next root",
          OWNER, "tether-security", response=TrustState,
          description=f"{_OWNER_NOTE} The bundle becomes [current, next] signed by the current root, "
                      "version + 1. Idempotent: an existing next root is kept (changed=false)."),
    Route("POST", "/tether/admin/trust/switch", switch_root,
          "Rollover step 2: server certificate under the next root, hot reload", OWNER, "tether-security",
          response=TrustState,
          description=f"{_OWNER_NOTE} Same names as the current server certificate. 409 "
                      "TrustNextRootMissing before step 1; 409 TrustExternalCertificate when the hub "
                      "serves certificate files outside its PKI directory."),
    Route("POST", "/tether/admin/trust/retire", retire_root, "Rollover step 3: retire the old root",
          OWNER, "tether-security", response=TrustState,
          description=f"{_OWNER_NOTE} The next root becomes current; the bundle becomes [new root] signed "
                      "by it, version + 1. 409 TrustNotSwitched before step 2."),
)

SECURITY_ROUTES: tuple[Route, ...] = (TRUST_BUNDLE_ROUTE, *ADMIN_ROUTES)


def _setup(app: web.Application, hub: Hub) -> None:
    """The trust service (bundle, rollover state) lives on the app. The bundle route authenticates
    inside its handler (any principal); the admin routes go through the standard guard."""
    app[TRUST_KEY] = TrustService.for_settings(hub.settings, audit=hub.audit)


FEATURE = Feature("security", SECURITY_ROUTES, setup=_setup)
