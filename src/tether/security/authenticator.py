"""The one Authenticator every protocol surface calls (MQTT, HTTPS, AMQP, REST).

A surface hands over the raw credential and the claimed identity and gets back a `Principal` or an
`AuthRefused` with a reason slug. Every call writes exactly one audit record
(`auth.{surface}`, outcome `allowed` | `refused`) — except throttled refusals, written in aggregate
(below); tokens and keys never reach the audit log. Every refusal, throttled ones included, also
increments `tether_auth_failures{surface,reason}` (`observability.metrics.AUTH_FAILURES`), so the
metric covers MQTT, MQTT over WebSockets, device HTTPS and the REST API alike; that metric is public,
so reasons that would tell an unknown identity from a bad signature share one label
(`invalid-credential`, see `tether.security.principal.PUBLIC_REASONS`); the audit log keeps the exact
reason. Refusals before authentication (malformed CONNECTs, bad HTTP requests) go through `refuse()`:
counted, charged and audited like failed authentications.

Rules (Azure's):

* Device SAS without `skn` is signed with the device's (or module's) own primary or secondary key,
  the identity must use `sas` authentication, and the token may not be broader than
  `{host}/devices/{id}` — for a module not broader than `{host}/devices/{id}/modules/{mid}`: a device's
  token never authenticates one of its modules, nor one module's token another (`wrong-scope`).
* Device SAS with `skn` is signed with a shared access policy's key; the policy needs
  `DeviceConnect`; a device-scoped or a hub-level (`sr={host}`) resource is accepted.
* Service tokens always come from a policy (`skn`), are hub-level, and the policy must hold the
  required permission (`RegistryReadWrite` implies `RegistryRead`); a missing right is a 403
  (`not_authorized=True`), every other refusal a 401.
* The token's host must name this hub: compared case-insensitively, and a `:port` on either side
  is ignored (the service SDK signs `localhost:8443` while devices sign `localhost`).
* Modules authenticate only when a `ModuleLookup` is supplied (the hub passes its `ModuleService`);
  otherwise a module claim is refused with `unknown-module`. A module principal has
  `kind=PrincipalKind.module` and both `device_id` and `module_id`; its device must be enabled.

With `failure_rate` set (the hub passes `limits.auth_failures_per_second`), every refusal (401 and 403
alike; not internal errors) is charged to the peer's address (`tether.security.throttle`): a peer over
its budget is refused with `auth-rate-limited` (`AuthThrottled`, carrying `retry_after`) before any
lookup or HMAC, whatever it presents; while a peer is over budget all its refusals are audited in
aggregate (at most one record per second). Internal calls (`peer=None`) are never throttled.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from cryptography import x509

from tether.observability.metrics import AUTH_FAILURES
from tether.registry.models import DEVICE_ID_RE, AuthType, Device
from tether.security.audit import AuditSink
from tether.security.disclosure import rights_of
from tether.security.principal import (
    AuthAttempt,
    AuthRefused,
    CredentialKind,
    Permission,
    Principal,
    PrincipalKind,
)
from tether.security.sas import (
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_MAX_LIFETIME_S,
    SasError,
    SasToken,
    TokenVerifier,
    parse_token,
    same_hub_host,
    scope_covers,
)
from tether.security.throttle import DEFAULT_MAX_PEERS, RATE_LIMITED, AuthThrottle, AuthThrottled
from tether.storage.base import PolicyRecord

__all__ = [
    "AuditSink",
    "Authenticator",
    "CertificateVerifier",
    "DeviceLookup",
    "ModuleLookup",
    "PolicyLookup",
]

_LABEL_MAX = 128  # claimed names from tokens are attacker-controlled: keep audit rows small
_X509_TYPES = (AuthType.self_signed, AuthType.certificate_authority)
_DEVICE_PERMISSIONS = frozenset({Permission.device_connect})


class DeviceLookup(Protocol):
    """What the authenticator needs from `RegistryService`."""

    async def find(self, device_id: str) -> Device | None: ...


class ModuleLookup(Protocol):
    """Module identities (own keys/certificates) as identity views (`Module.identity()`, with
    `module_id` set), from `tether.registry.modules.ModuleService`."""

    async def find_module(self, device_id: str, module_id: str) -> Device | None: ...


class PolicyLookup(Protocol):
    """What the authenticator needs from `PolicyService`."""

    async def find(self, name: str) -> PolicyRecord | None: ...




class OperatorVerifier(Protocol):
    """People: OIDC bearer tokens, console sessions, local passwords (`security.identity`)."""

    async def verify(self, credential: Any, attempt: AuthAttempt) -> Principal: ...


class CertificateVerifier(Protocol):
    """Checks a client chain against a device (thumbprint or CA); raises `AuthRefused`."""

    async def verify(self, device: Device, chain: Sequence[x509.Certificate]) -> CredentialKind: ...


_Attempt = AuthAttempt


def _label(text: str) -> str:
    return text if len(text) <= _LABEL_MAX else text[:_LABEL_MAX] + "…"


class Authenticator:
    """Turns credentials into Principals; the single authentication path of the hub."""

    def __init__(
        self,
        *,
        hostname: str,
        devices: DeviceLookup,
        policies: PolicyLookup,
        audit: AuditSink,
        clock_skew_s: int = DEFAULT_CLOCK_SKEW_S,
        cert_verifier: CertificateVerifier | None = None,
        now: Callable[[], float] = time.time,
        max_token_lifetime_s: int = DEFAULT_MAX_LIFETIME_S,
        modules: ModuleLookup | None = None,
        operators: OperatorVerifier | None = None,
        failure_rate: float | None = None,
        throttle_clock: Callable[[], float] = time.monotonic,
        throttle_max_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        self.hostname = hostname
        self._devices = devices
        self._policies = policies
        self._audit = audit
        self._cert_verifier = cert_verifier
        self._modules = modules
        self.operators = operators
        self.tokens = TokenVerifier(clock_skew_s=clock_skew_s, max_lifetime_s=max_token_lifetime_s, now=now)
        self.throttle: AuthThrottle | None = (
            AuthThrottle(failure_rate, clock=throttle_clock, max_peers=throttle_max_peers)
            if failure_rate is not None
            else None
        )

    # Public API ---------------------------------------------------------------------------------
    async def device_sas(
        self,
        token: str,
        device_id: str,
        module_id: str | None = None,
        *,
        surface: str,
        peer: str | None = None,
    ) -> Principal:
        """Authenticate a device or module presenting a SAS token (MQTT password, HTTP header, …)."""
        attempt = _Attempt(principal=_label(_device_name(device_id, module_id)), target=_label(device_id))
        return await self._audited(
            surface, peer, attempt, lambda: self._device_sas(token, device_id, module_id, attempt)
        )

    async def device_certificate(
        self,
        chain: Sequence[x509.Certificate],
        device_id: str,
        module_id: str | None = None,
        *,
        surface: str,
        peer: str | None = None,
    ) -> Principal:
        """Authenticate a device or module by its TLS client certificate chain (leaf first)."""
        attempt = _Attempt(principal=_label(_device_name(device_id, module_id)), target=_label(device_id))
        return await self._audited(
            surface, peer, attempt, lambda: self._device_certificate(chain, device_id, module_id, attempt)
        )

    async def service(
        self,
        authorization: str | None,
        *,
        required: Permission | None,
        surface: str,
        peer: str | None = None,
        policy: str | None = None,
    ) -> Principal:
        """Authenticate a service call by its policy SAS token; 403 (`not_authorized`) when the
        policy lacks `required`. `required=None` accepts any right (AMQP checks each link's right when
        it attaches); `policy` names the policy the token must be signed by (AMQP SASL PLAIN's
        `{policy}@sas.root.{hub}`)."""
        attempt = _Attempt(principal=None, target=None)
        return await self._audited(
            surface, peer, attempt, lambda: self._service(authorization, required, attempt, policy)
        )

    async def operator(
        self,
        credential: Any,
        *,
        required: Permission | None,
        surface: str,
        peer: str | None = None,
    ) -> Principal:
        """Authenticate a person (`tether.security.identity.OperatorCredential`); 403
        (`not_authorized`) when their roles lack `required` (None: any role will do)."""
        attempt = _Attempt(principal=None, target=None)
        return await self._audited(
            surface, peer, attempt, lambda: self._operator(credential, required, attempt)
        )

    async def _operator(self, credential: Any, required: Permission | None, attempt: _Attempt) -> Principal:
        if self.operators is None:
            raise AuthRefused("operators-disabled", "operator sign-in is not configured")
        principal = await self.operators.verify(credential, attempt)
        attempt.principal = principal.name
        attempt.credential = principal.credential.value
        if required is not None and required not in principal.permissions:
            raise AuthRefused("missing-permission", f"no role grants {required.value}", not_authorized=True)
        return principal

    # Audit wrapper ------------------------------------------------------------------------------
    async def _audited(
        self,
        surface: str,
        peer: str | None,
        attempt: _Attempt,
        work: Callable[[], Awaitable[Principal]],
    ) -> Principal:
        action = f"auth.{surface}"
        held = await self._admit(surface, peer, attempt) if peer is not None else None
        try:
            principal = await work()
        except AuthRefused as exc:  # the peer's token stays spent (so does a cancelled attempt's)
            _count_failure(surface, exc.public_reason)
            verdict = (self.throttle.refused(held, peer, action, exc.reason)
                       if held is not None and self.throttle is not None and peer is not None else None)
            if verdict is None or verdict.record:
                await self._refused(action, peer, attempt, exc.reason, verdict.details() if verdict else None)
            raise
        except Exception:
            self._refund(held)  # our failure, not the peer's
            _count_failure(surface, "internal-error")
            await self._refused(action, peer, attempt, "internal-error")
            raise
        self._refund(held)
        await self._audit.record(
            action,
            "allowed",
            principal=principal.name,
            credential=principal.credential.value,
            peer=peer,
            target=attempt.target,
            details=attempt.details or None,
        )
        return principal

    async def _admit(self, surface: str, peer: str, attempt: _Attempt) -> str | None:
        """Take a token from the peer's failure budget (its key, to refund on success), or raise
        `AuthThrottled` before any work is done; the refusal is counted always but audited only when
        it is due."""
        throttle = self.throttle
        if throttle is None:
            return None
        action = f"auth.{surface}"
        admission = throttle.admit(peer, action)
        await self._write_summaries(throttle)
        if admission.allowed:
            return admission.key
        _count_failure(surface, RATE_LIMITED)
        if admission.record:
            await self._refused(action, peer, attempt, RATE_LIMITED, admission.verdict.details())
        raise AuthThrottled(admission.retry_after)

    async def refuse(
        self,
        action: str,
        reason: str,
        *,
        surface: str,
        peer: str | None,
        principal: str | None = None,
        target: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """A refusal before any authentication ran — a malformed or mismatched MQTT CONNECT, no
        CONNECT in time, an HTTP request that does not parse: counted in `tether_auth_failures`,
        charged to the peer's failure budget like a failed authentication (a peer that floods them is
        then throttled) and audited the same way: individually until the peer is over budget, then in
        aggregate (`tether.security.throttle`)."""
        _count_failure(surface, reason)
        throttle = self.throttle
        if throttle is not None and peer is not None:
            verdict = throttle.charge(peer, action, reason)
            await self._write_summaries(throttle)
            if not verdict.record:
                return
            extra = verdict.details()
            if extra:
                details = {**(details or {}), **extra}
        await self._audit.record(action, "refused", principal=principal, reason=reason, peer=peer,
                                 target=target, details=details or None)

    async def audit_throttled(self) -> None:
        """Audit the suppressed counts of floods that went quiet (the hub calls this every second;
        otherwise the last episode of a peer would be written only when it tries again)."""
        if self.throttle is not None:
            self.throttle.sweep()
            await self._write_summaries(self.throttle)

    async def _write_summaries(self, throttle: AuthThrottle) -> None:
        for summary in throttle.take_summaries():
            await self._audit.record(
                summary.action,
                "refused",
                reason=summary.reason,
                peer=summary.peer,
                details=summary.details(),
            )

    def _refund(self, held: str | None) -> None:
        if held is not None and self.throttle is not None:
            self.throttle.refund(held)

    async def _refused(
        self,
        action: str,
        peer: str | None,
        attempt: _Attempt,
        reason: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        details = {**attempt.details, **extra} if extra else attempt.details
        await self._audit.record(
            action,
            "refused",
            principal=attempt.principal,
            credential=attempt.credential,
            reason=reason,
            peer=peer,
            target=attempt.target,
            details=details or None,
        )

    # Device SAS ---------------------------------------------------------------------------------
    async def _device_sas(
        self, token: str, device_id: str, module_id: str | None, attempt: _Attempt
    ) -> Principal:
        if not token:
            raise AuthRefused("missing-credentials", "no token")
        _check_identity(device_id, module_id)
        sas = self._parse(token)
        attempt.credential = (
            CredentialKind.policy_device_token.value if sas.policy_name else CredentialKind.device_key.value
        )
        if sas.policy_name:
            attempt.details["policy"] = _label(sas.policy_name)
        host = self._hub_host(sas)
        device_root = f"{host}/devices/{device_id}"
        target = f"{device_root}/modules/{module_id}" if module_id else device_root
        if not scope_covers(sas.resource, target):
            attempt.details["tokenScope"] = _scope_kind(sas.resource)
            raise AuthRefused("wrong-scope", "token resource does not cover the identity")
        self._check_time(sas)

        if sas.policy_name is None:
            if not scope_covers(device_root, sas.resource):
                raise AuthRefused("wrong-scope", "a device key cannot sign a hub-level token")
            if module_id and not scope_covers(target, sas.resource):
                attempt.details["tokenScope"] = _scope_kind(sas.resource)
                raise AuthRefused("wrong-scope", "a device token cannot authenticate a module")
            device, identity = await self._identity(device_id, module_id)
            if identity.authentication.type is not AuthType.sas:
                raise AuthRefused("wrong-auth-type", "identity does not use SAS keys")
            keys = identity.authentication.symmetric_key
            self._check_signature(sas, [keys.primary_key, keys.secondary_key])
            credential, policy_name = CredentialKind.device_key, None
        else:
            policy = await self._policy(sas.policy_name)
            self._check_signature(sas, [policy.primary_key, policy.secondary_key])
            if Permission.device_connect not in rights_of(policy.permissions):
                raise AuthRefused("missing-permission", "policy lacks DeviceConnect", not_authorized=True)
            device, identity = await self._identity(device_id, module_id)
            credential, policy_name = CredentialKind.policy_device_token, policy.name
        if not (device.enabled and identity.enabled):
            raise AuthRefused("device-disabled", "identity is disabled")
        return Principal(
            kind=PrincipalKind.module if module_id else PrincipalKind.device,
            credential=credential,
            device_id=device_id,
            module_id=module_id,
            policy_name=policy_name,
            permissions=_DEVICE_PERMISSIONS,
            expires_at=float(sas.expiry),
        )

    # Device certificate -------------------------------------------------------------------------
    async def _device_certificate(
        self,
        chain: Sequence[x509.Certificate],
        device_id: str,
        module_id: str | None,
        attempt: _Attempt,
    ) -> Principal:
        if not chain:
            raise AuthRefused("no-client-certificate", "no client certificate was presented")
        _check_identity(device_id, module_id)
        device, identity = await self._identity(device_id, module_id)
        auth_type = identity.authentication.type
        if auth_type not in _X509_TYPES:
            raise AuthRefused("wrong-auth-type", "identity does not use X.509")
        attempt.credential = auth_type.value
        if self._cert_verifier is None:
            raise AuthRefused("x509-unavailable", "no certificate verifier is configured")
        credential = await self._cert_verifier.verify(identity, chain)
        attempt.credential = credential.value
        if not (device.enabled and identity.enabled):
            raise AuthRefused("device-disabled", "identity is disabled")
        return Principal(
            kind=PrincipalKind.module if module_id else PrincipalKind.device,
            credential=credential,
            device_id=device_id,
            module_id=module_id,
            permissions=_DEVICE_PERMISSIONS,
        )

    # Service ------------------------------------------------------------------------------------
    async def _service(self, authorization: str | None, required: Permission | None, attempt: _Attempt,
                       expected_policy: str | None = None) -> Principal:
        if not authorization:
            raise AuthRefused("missing-credentials", "no Authorization header")
        sas = self._parse(authorization)
        if sas.policy_name is None:
            raise AuthRefused("device-token-not-allowed", "service calls need a policy token (skn)")
        attempt.principal = _label(f"policy:{sas.policy_name}")
        attempt.credential = CredentialKind.policy.value
        if expected_policy is not None and expected_policy != sas.policy_name:
            raise AuthRefused("policy-mismatch", "the token is signed by another policy than the user name's")
        host = self._hub_host(sas)
        if not scope_covers(sas.resource, host):
            raise AuthRefused("wrong-scope", "service tokens must be hub-level")
        self._check_time(sas)
        policy = await self._policy(sas.policy_name)
        self._check_signature(sas, [policy.primary_key, policy.secondary_key])
        permissions = rights_of(policy.permissions)
        if required is not None and required not in permissions:
            raise AuthRefused("missing-permission", f"policy lacks {required.value}", not_authorized=True)
        return Principal(
            kind=PrincipalKind.service,
            credential=CredentialKind.policy,
            policy_name=policy.name,
            permissions=permissions,
            expires_at=float(sas.expiry),
        )

    # Helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _parse(token: str) -> SasToken:
        try:
            return parse_token(token)
        except SasError as exc:
            raise AuthRefused(exc.reason, exc.detail) from None

    def _hub_host(self, sas: SasToken) -> str:
        host = sas.host
        if not same_hub_host(host, self.hostname):
            raise AuthRefused("wrong-hub", "token is for another hub")
        return host

    def _check_time(self, sas: SasToken) -> None:
        try:
            self.tokens.check_time(sas)
        except SasError as exc:
            raise AuthRefused(exc.reason, exc.detail) from None

    def _check_signature(self, sas: SasToken, keys: Sequence[str | None]) -> None:
        try:
            self.tokens.check_signature(sas, keys)
        except SasError as exc:
            raise AuthRefused(exc.reason, exc.detail) from None

    async def _policy(self, name: str) -> PolicyRecord:
        policy = await self._policies.find(name)
        if policy is None:
            raise AuthRefused("unknown-policy", "no such shared access policy")
        return policy

    async def _identity(self, device_id: str, module_id: str | None) -> tuple[Device, Device]:
        """(device, identity): the identity is the module when one is claimed, else the device."""
        device = await self._devices.find(device_id)
        if device is None:
            raise AuthRefused("unknown-device", "no such device")
        if module_id is None:
            return device, device
        if self._modules is None:
            raise AuthRefused("unknown-module", "module identities are not available")
        module = await self._modules.find_module(device_id, module_id)
        if module is None:
            raise AuthRefused("unknown-module", "no such module")
        return device, module


def _count_failure(surface: str, reason: str) -> None:
    """One refusal in `tether_auth_failures{surface,reason}` (both are slugs chosen by Tether code,
    never by the peer, so the label sets stay small; authentication outcomes that depend on which
    identities exist are merged first: `AuthRefused.public_reason`)."""
    AUTH_FAILURES.labels(surface, reason).inc()


def _scope_kind(resource: str) -> str:
    """What a refused token was scoped to, for the audit record: "hub", "device" or "module" (never
    the ids in it, which the peer chose)."""
    parts = resource.rstrip("/").split("/")[1:]
    if len(parts) >= 4 and parts[0] == "devices" and parts[2] == "modules":
        return "module"
    return "device" if parts[:1] == ["devices"] else "hub"


def _device_name(device_id: str, module_id: str | None) -> str:
    return f"device:{device_id}/{module_id}" if module_id else f"device:{device_id}"


def _check_identity(device_id: str, module_id: str | None) -> None:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise AuthRefused("unknown-device", "invalid device id")
    if module_id is not None and not DEVICE_ID_RE.fullmatch(module_id):
        raise AuthRefused("unknown-module", "invalid module id")
