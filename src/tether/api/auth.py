"""Service authentication for REST routes: every guarded route goes through `authenticate`.

The authenticator verifies the `Authorization: SharedAccessSignature …` header and writes the audit
record; this module only maps its refusal to 401 (bad credential), 403 (valid but lacking the
right) or 429 (the peer is over its authentication-failure budget). Messages carry the refusal slug,
never the token.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from tether.api.context import hub_of, peer_of
from tether.api.operator_auth import operator_credential
from tether.errors import Forbidden, TetherError, Throttled, Unauthorized
from tether.security.principal import AuthRefused, Permission, Principal
from tether.security.throttle import RATE_LIMITED, AuthThrottled

SURFACE = "rest"
OWNER_RIGHTS = frozenset(Permission)  # policy management needs all four rights


# Refusal reasons a client may learn; others (unknown policy vs bad signature) would let a caller
# probe which policy names exist, so they share one generic message.
_TELLABLE = frozenset({"missing-credentials", "malformed", "expired", "lifetime-too-long",
                       "device-token-not-allowed", "wrong-scope", "wrong-hub",
                       # operators (OIDC tokens, sessions): nothing here helps guess a secret
                       "wrong-issuer", "wrong-audience", "not-yet-valid", "alg-not-allowed", "unknown-key",
                       "key-mismatch", "missing-claim", "unknown-session", "operator-disabled",
                       "locked-out", "totp-required", "operators-disabled", "provider-unavailable"})


class AuthRateLimited(Throttled):
    """429 for a peer over its authentication-failure budget; `headers` carries `Retry-After`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed authentications from this address: retry in {retry_after_s} s",
                         code="ThrottlingException")
        self.headers = {"Retry-After": str(retry_after_s)}


def refusal_error(exc: AuthRefused) -> TetherError:
    if exc.reason == RATE_LIMITED:
        return AuthRateLimited(exc.retry_after_s if isinstance(exc, AuthThrottled) else 1)
    if exc.not_authorized:
        return Forbidden(f"not authorized: {exc.detail or exc.reason}", code="IotHubUnauthorizedAccess")
    if exc.reason in _TELLABLE:
        return Unauthorized(f"unauthorized: {exc.reason}: {exc.detail}".rstrip(": "),
                            code="IotHubUnauthorizedAccess")
    return Unauthorized("unauthorized: invalid credential", code="IotHubUnauthorizedAccess")


async def authenticate(request: web.Request, required: Permission) -> Principal:
    hub = hub_of(request)
    credential = operator_credential(request)  # a person: OIDC bearer token or console session
    try:
        if credential is not None:
            return await hub.authenticator.operator(credential, required=required, surface=SURFACE,
                                                    peer=peer_of(request))
        return await hub.authenticator.service(
            request.headers.get("Authorization"), required=required, surface=SURFACE, peer=peer_of(request)
        )
    except AuthRefused as exc:
        raise refusal_error(exc) from None


async def require_all(request: web.Request, principal: Principal, rights: Iterable[Permission],
                      *, what: str) -> None:
    """Extra rights beyond the route's one `required` permission (e.g. owner-only operations).

    The authenticator already recorded the credential as valid; a refusal here is a separate
    authorization decision, so it gets its own audit record."""
    missing = sorted(str(p) for p in frozenset(rights) - principal.permissions)
    if not missing:
        return
    await hub_of(request).audit.record(
        f"auth.{SURFACE}",
        "refused",
        principal=principal.name,
        credential=str(principal.credential),
        reason="missing-permission",
        peer=peer_of(request),
        details={"operation": what, "missing": missing},
    )
    raise Forbidden(f"{what} requires the rights {', '.join(missing)}", code="IotHubUnauthorizedAccess")
