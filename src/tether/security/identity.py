"""Operator identity: turns a person's credential into a `Principal` (kind `user`) with their roles.

Four credentials, all checked here and audited by the one `Authenticator` (`Authenticator.operator`):

* `BearerToken` — an access token from a configured OIDC provider (REST API clients); the provider is
  chosen by the token's claimed `iss`, then `OidcProvider.verify` checks everything (an unknown issuer
  is `wrong-issuer`).
* `SessionCookie` — a console session (`SessionService`); a request that changes state must carry the
  session's CSRF token (`csrf-mismatch`). A local operator disabled meanwhile loses the session at once.
* `PasswordLogin` — a local operator signing in (`OperatorService.check`: argon2id, TOTP, lockout).
* `IdTokenLogin` — the ID token of a console sign-in with a provider (authorization code + PKCE); its
  audience is the provider's `client_id` and its nonce must match the sign-in's.

Roles: from the provider's roles/groups claim (`claim_roles`) plus local assignments (`RoleService`)
for the same issuer and subject. No role at all is a refusal (`no-role`, 403): signing in grants
nothing by itself.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from tether.config import OidcProviderSettings
from tether.security.oidc import OidcProvider, claim_at, unverified_issuer
from tether.security.operators import LOCAL_ISSUER, OperatorService
from tether.security.principal import AuthAttempt, AuthRefused, CredentialKind, Principal, PrincipalKind
from tether.security.role_assignments import RoleService
from tether.security.roles import RoleGrant, parse_role, rights_of
from tether.security.sessions import SessionService

__all__ = [
    "BearerToken",
    "IdTokenLogin",
    "OperatorCredential",
    "OperatorIdentity",
    "PasswordLogin",
    "SessionCookie",
    "claim_grants",
]

_LABEL = 128


@dataclass(frozen=True, slots=True)
class BearerToken:
    token: str


@dataclass(frozen=True, slots=True)
class SessionCookie:
    token: str
    csrf: str | None = None
    changes_state: bool = False  # a POST/PUT/PATCH/DELETE: the CSRF token is required


@dataclass(frozen=True, slots=True)
class PasswordLogin:
    username: str
    password: str
    code: str | None = None


@dataclass(frozen=True, slots=True)
class IdTokenLogin:
    provider: str
    token: str
    nonce: str


OperatorCredential = BearerToken | SessionCookie | PasswordLogin | IdTokenLogin


def claim_grants(settings: OidcProviderSettings, claims: dict[str, Any]) -> tuple[RoleGrant, ...]:
    """Roles granted by the provider's roles/groups claim through `claim_roles`."""
    raw = claim_at(claims, settings.roles_claim)
    values = {raw} if isinstance(raw, str) else {v for v in raw if isinstance(v, str)} \
        if isinstance(raw, list) else set()
    return tuple(RoleGrant(parse_role(m.role), m.scope, "claim")
                 for m in settings.claim_roles if m.value in values)


def _label(text: str) -> str:
    return text if len(text) <= _LABEL else text[:_LABEL] + "…"


class OperatorIdentity:
    def __init__(self, providers: list[OidcProvider], operators: OperatorService, sessions: SessionService,
                 roles: RoleService) -> None:
        self.providers = {p.name: p for p in providers}
        self._by_issuer = {p.issuer: p for p in providers}
        self.operators = operators
        self.sessions = sessions
        self.roles = roles

    def provider(self, name: str) -> OidcProvider | None:
        return self.providers.get(name)

    async def verify(self, credential: OperatorCredential, attempt: AuthAttempt) -> Principal:
        if isinstance(credential, BearerToken):
            attempt.credential = CredentialKind.oidc.value
            issuer = unverified_issuer(credential.token)
            provider = self._by_issuer.get(issuer or "")
            if provider is None:
                if issuer:
                    attempt.details["issuer"] = _label(issuer)
                raise AuthRefused("wrong-issuer", "token from an issuer this hub does not trust")
            return await self._from_token(provider, credential.token, provider.settings.audience, None,
                                          CredentialKind.oidc, attempt)
        if isinstance(credential, IdTokenLogin):
            attempt.credential = CredentialKind.oidc.value
            provider = self.providers.get(credential.provider)
            if provider is None or provider.settings.client_id is None:
                raise AuthRefused("unknown-provider", "no such sign-in provider")
            return await self._from_token(provider, credential.token, [provider.settings.client_id],
                                          credential.nonce, CredentialKind.session, attempt)
        if isinstance(credential, PasswordLogin):
            return await self._password(credential, attempt)
        return await self._session(credential, attempt)

    async def _from_token(self, provider: OidcProvider, token: str, audiences: list[str], nonce: str | None,
                          kind: CredentialKind, attempt: AuthAttempt) -> Principal:
        attempt.details["issuer"] = provider.issuer
        claims = await provider.verify(token, audiences=audiences, nonce=nonce)
        subject = claims[provider.settings.subject_claim]
        attempt.principal = _label(f"user:{subject}")
        display = claims.get(provider.settings.name_claim)
        grants = claim_grants(provider.settings, claims)
        grants += await self.roles.grants_for(provider.issuer, subject)
        exp = claims.get("exp")
        return _principal(subject, provider.issuer, display if isinstance(display, str) else None, grants,
                          kind, float(exp) if isinstance(exp, int | float) else None)

    async def _password(self, credential: PasswordLogin, attempt: AuthAttempt) -> Principal:
        attempt.credential = CredentialKind.password.value
        attempt.details["issuer"] = LOCAL_ISSUER
        attempt.principal = _label(f"user:{credential.username}")
        record = await self.operators.check(credential.username, credential.password, credential.code)
        grants = await self.roles.grants_for(LOCAL_ISSUER, record.username)
        return _principal(record.username, LOCAL_ISSUER, record.username, grants, CredentialKind.password,
                          None)

    async def _session(self, credential: SessionCookie, attempt: AuthAttempt) -> Principal:
        attempt.credential = CredentialKind.session.value
        record = await self.sessions.lookup(credential.token)
        if record is None:
            raise AuthRefused("unknown-session", "no such session (signed out or expired)")
        attempt.principal = _label(f"user:{record.subject}")
        attempt.details["issuer"] = record.issuer
        if credential.changes_state and not (
            credential.csrf and hmac.compare_digest(credential.csrf.encode(), record.csrf_token.encode())
        ):
            raise AuthRefused("csrf-mismatch", "missing or wrong X-CSRF-Token", not_authorized=True)
        if record.issuer == LOCAL_ISSUER:
            operator = await self.operators.find(record.subject)
            if operator is None or operator.disabled:
                await self.sessions.end_all(record.issuer, record.subject)
                raise AuthRefused("operator-disabled", "this operator is disabled")
        stored = tuple(RoleGrant(parse_role(g["role"]), g.get("scope"), "claim") for g in record.grants)
        grants = stored + await self.roles.grants_for(record.issuer, record.subject)
        return _principal(record.subject, record.issuer, record.display_name, grants, CredentialKind.session,
                          record.expires.timestamp())


def _principal(subject: str, issuer: str, display: str | None, grants: tuple[RoleGrant, ...],
               kind: CredentialKind, expires_at: float | None) -> Principal:
    grants = tuple(dict.fromkeys(grants))
    if not grants:
        raise AuthRefused("no-role", "this operator holds no role on this hub", not_authorized=True)
    permissions = frozenset().union(*(rights_of(g.role) for g in grants))
    return Principal(kind=PrincipalKind.user, credential=kind, subject=subject, issuer=issuer,
                     display_name=display, grants=grants, permissions=permissions, expires_at=expires_at)
