"""Who is acting: the single output of the Authenticator, consumed by every protocol surface."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tether.security.roles import RoleGrant


class Permission(StrEnum):
    registry_read = "RegistryRead"
    registry_write = "RegistryReadWrite"
    service_connect = "ServiceConnect"
    device_connect = "DeviceConnect"


class CredentialKind(StrEnum):
    device_key = "sas"  # SAS signed with the device's (or module's) own key
    policy_device_token = "sas-policy"  # device-scoped SAS signed with a DeviceConnect policy key (skn)
    policy = "policy"  # service token from a shared access policy
    x509_self_signed = "selfSigned"  # client certificate matched by thumbprint
    x509_ca = "certificateAuthority"  # client certificate chaining to a verified CA
    token_service = "token-service"  # token minted by an operator's own auth system
    oidc = "oidc"  # an operator's bearer token from an OpenID Connect provider
    session = "session"  # an operator's console session (signed in with OIDC or a local password)
    password = "password"  # a local operator's password (console sign-in)


class PrincipalKind(StrEnum):
    device = "device"
    module = "module"
    service = "service"
    user = "user"  # a person: an operator from an OIDC provider or the local operator store


@dataclass(frozen=True, slots=True)
class Principal:
    kind: PrincipalKind
    credential: CredentialKind
    device_id: str | None = None
    module_id: str | None = None
    policy_name: str | None = None
    permissions: frozenset[Permission] = field(default_factory=frozenset)
    expires_at: float | None = None  # unix seconds; the connection must end then (SAS expiry)
    # Operators (kind user): who (`subject` at `issuer`; "local" for the local operator store), a
    # display name, and the roles held (their union is `permissions`).
    subject: str | None = None
    issuer: str | None = None
    display_name: str | None = None
    grants: tuple[RoleGrant, ...] = ()

    @property
    def name(self) -> str:
        """Stable label for audit records and metrics (never a secret)."""
        if self.kind is PrincipalKind.user:
            return f"user:{self.subject}"
        if self.kind is PrincipalKind.service:
            return f"policy:{self.policy_name}"
        if self.module_id:
            return f"device:{self.device_id}/{self.module_id}"
        return f"device:{self.device_id}"

    def has(self, permission: Permission) -> bool:
        return permission in self.permissions


@dataclass(slots=True)
class AuthAttempt:
    """What is known about a claim so far, for the audit record if it is refused."""

    principal: str | None
    target: str | None
    credential: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class AuthRefused(Exception):
    """A credential was refused. `reason` is a short machine-readable slug for audit and metrics;
    `not_authorized` distinguishes "valid credential, no right" (MQTT 5 / HTTP 403) from
    "bad credential" (MQTT 4 / HTTP 401)."""

    def __init__(self, reason: str, detail: str = "", *, not_authorized: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.not_authorized = not_authorized

    @property
    def public_reason(self) -> str:
        """The reason as unauthenticated observers (metric labels, disconnect counters) may see it."""
        return public_reason(self.reason)


INVALID_CREDENTIAL = "invalid-credential"
# Refusal reasons that tell nothing about which identities exist or how they are configured: they are
# decided from the presented token alone (or are told to the client anyway). Every other reason of the
# authenticator — unknown device, module or policy, bad signature, disabled device, wrong kind of
# credential, every certificate mismatch — depends on a registry lookup, so public counters merge them
# into `invalid-credential`, as the responses already do (docs/security.md, "Refusals reveal little").
PUBLIC_REASONS = frozenset({
    "missing-credentials", "malformed", "expired", "lifetime-too-long", "device-token-not-allowed",
    "wrong-scope", "wrong-hub", "missing-permission", "auth-rate-limited", "internal-error",
})


def public_reason(reason: str) -> str:
    return reason if reason in PUBLIC_REASONS else INVALID_CREDENTIAL
