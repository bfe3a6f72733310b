"""Who one AMQP connection may act as: its grants, from SASL PLAIN, CBS put-token or the TLS client
certificate — every credential checked by the one `Authenticator`.

A grant is keyed by scope: `("device", id, module)` or `("hub",)`. One connection may hold several
(the SDKs multiplex, CBS renews); a put-token for a scope it already holds replaces that grant
(renewal). A device link is authorized by, in order: the device's own grant, a hub-level grant whose
policy has DeviceConnect (the token is checked again for that device, as Azure accepts DeviceConnect
policy tokens for any device), or the TLS client certificate (the Node SDK's X.509 devices send no
token at all). Service links need a hub-level grant with the right permission.

Audiences and SASL PLAIN user names name the identity; the token must cover it (the authenticator
checks scope, signature, expiry and the device's state, and writes `auth.amqp` / `auth.amqpws`).

A device grant remembers the identity's presence epoch (`ConnectionRegistry.epoch`, bumped when the
device is disabled or deleted, or the module deleted) from before its credential was checked; a grant
from an older epoch is checked again before it authorizes another link, so a credential accepted once
does not outlive its identity's disabling.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509

from tether.security.authenticator import Authenticator
from tether.security.principal import AuthRefused, Permission, Principal
from tether.security.sas import same_hub_host

from .addresses import parse_audience

__all__ = ["TOKEN_TYPES", "ConnectionAuth", "Grant", "Scope", "hub_names"]

Scope = tuple[Any, ...]
HUB: Final[Scope] = ("hub",)
TOKEN_TYPES: Final = frozenset({"servicebus.windows.net:sastoken", "azure-devices.net:sastoken"})
_PLAIN_USER: Final = re.compile(
    r"^(?P<id>.+?)(?:/modules/(?P<module>[^/@]+))?@sas\.(?P<root>root\.)?(?P<hub>.+)$", re.IGNORECASE)


def hub_names(hostname: str) -> frozenset[str]:
    """What `{hubName}` in a SASL user name may be: the host name (without port) or its first label."""
    host = hostname.rsplit(":", 1)[0] if hostname.count(":") == 1 else hostname
    return frozenset({host.lower(), host.split(".", 1)[0].lower()})


@dataclass(slots=True)
class Grant:
    scope: Scope
    principal: Principal
    token: str | None  # kept to authorize devices under a hub-level DeviceConnect token
    expires_at: float | None  # unix seconds, clock skew included; None: no expiry (X.509)
    epoch: int = 0  # the identity's presence epoch before the credential was checked (device scopes)


def device_scope(device_id: str, module_id: str | None) -> Scope:
    return ("device", device_id, module_id)


class ConnectionAuth:
    """The grants of one connection (see the module docstring)."""

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        hostname: str,
        surface: str,
        peer: str | None,
        peer_chain: Callable[[], Sequence[x509.Certificate]],
        clock_skew_s: float,
        epoch: Callable[[str, str | None], int] = lambda device_id, module_id: 0,
    ) -> None:
        self._authenticator = authenticator
        self._epoch = epoch
        self.hostname = hostname
        self.surface = surface
        self.peer = peer
        self._peer_chain = peer_chain
        self._skew = clock_skew_s
        self.grants: dict[Scope, Grant] = {}
        self.sasl_external = False

    @property
    def any_identity(self) -> bool:
        return bool(self.grants)

    def _grant(self, scope: Scope, principal: Principal, token: str | None, epoch: int = 0) -> Grant:
        expires = None if principal.expires_at is None else principal.expires_at + self._skew
        grant = Grant(scope, principal, token, expires, epoch)
        self.grants[scope] = grant
        return grant

    # --- credentials ----------------------------------------------------------------------------
    async def sasl_plain(self, username: str, password: str) -> Grant:
        """SASL PLAIN: `{deviceId}@sas.{hub}`, `{deviceId}/modules/{moduleId}@sas.{hub}` or
        `{policy}@sas.root.{hub}` with a SAS token as the password."""
        match = _PLAIN_USER.match(username)
        if match is None:
            raise AuthRefused("bad-username", "expected {id}@sas.{hub} or {policy}@sas.root.{hub}")
        if match["hub"].lower() not in hub_names(self.hostname):
            raise AuthRefused("wrong-hub", "the user name names another hub")
        auth = self._authenticator
        if match["root"]:
            principal = await auth.service(password, required=None, surface=self.surface, peer=self.peer,
                                           policy=match["id"])
            return self._grant(HUB, principal, password)
        device, module = match["id"], match["module"]
        epoch = self._epoch(device, module)
        principal = await auth.device_sas(password, device, module, surface=self.surface, peer=self.peer)
        return self._grant(device_scope(device, module), principal, password, epoch)

    def audience_check(self, audience: str) -> Scope:
        """The scope a CBS audience names, or `AuthRefused` when it names another hub (checked before
        any token work; the caller audits it)."""
        parsed = parse_audience(audience)
        if not parsed.host or not same_hub_host(parsed.host, self.hostname):
            raise AuthRefused("wrong-audience", "the audience names another hub")
        if parsed.device_id is not None:
            return device_scope(parsed.device_id, parsed.module_id)
        if parsed.path:
            raise AuthRefused("wrong-audience", "the audience names no identity of this hub")
        return HUB

    async def put_token(self, token: str, scope: Scope) -> Grant:
        """CBS put-token for `scope` (from `audience_check`)."""
        auth = self._authenticator
        if scope == HUB:
            principal = await auth.service(token, required=None, surface=self.surface, peer=self.peer)
            return self._grant(HUB, principal, token)
        _, device, module = scope
        epoch = self._epoch(device, module)
        principal = await auth.device_sas(token, device, module, surface=self.surface, peer=self.peer)
        return self._grant(scope, principal, token, epoch)

    # --- authorization ----------------------------------------------------------------------------
    async def device(self, device_id: str, module_id: str | None, now: float) -> tuple[Principal, Scope]:
        """The principal a device link acts as, and the scope it depends on; `AuthRefused`
        (`not_authorized`) when the connection holds nothing for that device."""
        scope = device_scope(device_id, module_id)
        epoch = self._epoch(device_id, module_id)
        grant = self._live(scope, now)
        if grant is not None and grant.epoch == epoch:
            return grant.principal, scope
        if grant is not None:  # the identity was disabled or deleted since: check the credential again
            del self.grants[scope]
            if grant.token is not None:
                principal = await self._authenticator.device_sas(grant.token, device_id, module_id,
                                                                 surface=self.surface, peer=self.peer)
                return self._grant(scope, principal, grant.token, epoch).principal, scope
        hub = self._live(HUB, now)
        if hub is not None and hub.principal.has(Permission.device_connect) and hub.token:
            principal = await self._authenticator.device_sas(hub.token, device_id, module_id,
                                                             surface=self.surface, peer=self.peer)
            return principal, HUB
        chain = self._peer_chain()
        if chain and not self._holds_device_token():
            principal = await self._authenticator.device_certificate(chain, device_id, module_id,
                                                                     surface=self.surface, peer=self.peer)
            self._grant(scope, principal, None, epoch)
            return principal, scope
        raise AuthRefused("not-authorized", "this connection holds no credential for that device",
                          not_authorized=True)

    def service(self, permission: Permission, now: float) -> tuple[Principal, Scope]:
        hub = self._live(HUB, now)
        if hub is None:
            raise AuthRefused("not-authorized", "no service token on this connection", not_authorized=True)
        if not hub.principal.has(permission):
            raise AuthRefused("missing-permission", f"policy lacks {permission.value}", not_authorized=True)
        return hub.principal, HUB

    def _live(self, scope: Scope, now: float) -> Grant | None:
        grant = self.grants.get(scope)
        if grant is not None and grant.expires_at is not None and grant.expires_at <= now:
            return None
        return grant

    def other_identity(self, device_id: str) -> str:
        """The audit reason for a link naming an identity this connection holds nothing for:
        `other-module` when it holds the same device's (or one of its modules') credential — a module
        acts only as itself, and the device is not its module —, else `other-device`."""
        held = {g.scope[1] for g in self.grants.values() if g.scope != HUB}
        return "other-module" if device_id in held else "other-device"

    def _holds_device_token(self) -> bool:
        return any(g.token is not None and g.scope != HUB for g in self.grants.values())

    def expire(self, scope: Scope, grant: Grant) -> bool:
        """Drop `grant` if it is still the scope's (not renewed meanwhile); True when dropped."""
        if self.grants.get(scope) is grant:
            del self.grants[scope]
            return True
        return False
