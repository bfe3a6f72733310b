"""Console sign-in and sign-out.

* `POST /console/auth/login` `{"username", "password", "code"?}` — a local operator; through the one
  authenticator (`auth.console` audit records, the per-address failure throttle, lockout, TOTP). JSON
  only: a cross-site form cannot post JSON without a CORS preflight, which Tether never grants (login
  CSRF).
* `GET /console/auth/oidc/{provider}/start` → the provider's authorization endpoint (authorization
  code + PKCE S256, `state` and `nonce`); `…/callback` exchanges the code, verifies the ID token
  (audience = client id, nonce) and opens a session. The pending sign-in is bound to the browser by an
  HttpOnly SameSite=Lax cookie and lives at most 10 minutes (at most 1,000 pending, oldest dropped),
  in this hub process: behind a load balancer, keep sign-ins on one node (sticky sessions).
* `POST /console/auth/logout` — ends the session (needs the CSRF header).

A session cookie is set only after a full sign-in; its token never appears in a URL or a log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlencode

from aiohttp import web

from tether.api.auth import refusal_error
from tether.api.bodies import read_json_object
from tether.api.context import hub_of, peer_of
from tether.api.operator_auth import (
    CSRF_HEADER,
    clear_cookie,
    session_cookie_name,
    session_token,
    set_cookie,
)
from tether.errors import BadRequest, NotFound, Unauthorized
from tether.security.identity import IdTokenLogin, PasswordLogin
from tether.security.principal import AuthRefused, Principal

__all__ = ["LOGIN_COOKIE", "PendingLogins", "login", "logout", "oidc_callback", "oidc_start", "providers"]

SURFACE = "console"
LOGIN_COOKIE = "tether-login"
PENDING_TTL_S = 600.0
MAX_PENDING = 1000
NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True, slots=True)
class _Pending:
    provider: str
    verifier: str
    nonce: str
    browser: str  # the value of the login cookie that started it
    created: float


class PendingLogins:
    """OIDC sign-ins between start and callback, by `state`."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, _Pending] = OrderedDict()

    def add(self, state: str, pending: _Pending) -> None:
        self._items[state] = pending
        while len(self._items) > MAX_PENDING:
            self._items.popitem(last=False)

    def take(self, state: str) -> _Pending | None:
        pending = self._items.pop(state, None)
        if pending is None or time.monotonic() - pending.created > PENDING_TTL_S:
            return None
        return pending


PENDING_KEY: web.AppKey[PendingLogins] = web.AppKey("console_pending_logins", PendingLogins)


def _secure(request: web.Request) -> bool:
    return hub_of(request).settings.operators.cookie_secure


async def _open_session(request: web.Request, principal: Principal, response: web.StreamResponse) -> str:
    """Store a session for `principal`, set its cookie on `response`; returns the CSRF token."""
    hub = hub_of(request)
    assert principal.issuer is not None and principal.subject is not None
    claims = tuple(g for g in principal.grants if g.source == "claim")
    token, record = await hub.sessions.create(issuer=principal.issuer, subject=principal.subject,
                                              display_name=principal.display_name, claim_grants=claims)
    secure = _secure(request)
    set_cookie(response, session_cookie_name(secure), token, secure=secure,
               max_age=hub.settings.operators.session_ttl_s)
    await hub.audit.record("session.create", "ok", principal=principal.name,
                           credential=principal.credential.value, peer=peer_of(request),
                           details={"issuer": principal.issuer, "expires": record.expires.isoformat()})
    return record.csrf_token


async def login(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise BadRequest("sign in with a JSON body", field="body")
    body = await read_json_object(request)
    username, password, code = body.get("username"), body.get("password"), body.get("code")
    if not isinstance(username, str) or not isinstance(password, str) or \
            not (code is None or isinstance(code, str)):
        raise BadRequest("username and password are strings", field="body")
    hub = hub_of(request)
    try:
        principal = await hub.authenticator.operator(PasswordLogin(username, password, code or None),
                                                     required=None, surface=SURFACE, peer=peer_of(request))
    except AuthRefused as exc:
        raise refusal_error(exc) from None
    response = web.Response(headers=NO_STORE, content_type="application/json")
    csrf = await _open_session(request, principal, response)
    response.text = json.dumps({"user": principal.name, "displayName": principal.display_name, "csrf": csrf})
    return response


async def logout(request: web.Request) -> web.Response:
    hub = hub_of(request)
    token = session_token(request)
    response = web.json_response({"signedOut": True}, headers=NO_STORE)
    if token is not None:
        record = await hub.sessions.lookup(token)
        csrf = request.headers.get(CSRF_HEADER, "")
        if record is not None:
            if not hmac.compare_digest(csrf.encode(), record.csrf_token.encode()):
                raise Unauthorized("missing or wrong X-CSRF-Token", code="IotHubUnauthorizedAccess")
            await hub.sessions.end(token)
            await hub.audit.record("session.end", "ok", principal=f"user:{record.subject}",
                                   peer=peer_of(request), details={"issuer": record.issuer})
    clear_cookie(response, session_cookie_name(_secure(request)), secure=_secure(request))
    return response


async def providers(request: web.Request) -> web.Response:
    """Sign-in choices for the console's sign-in page (no secrets)."""
    hub = hub_of(request)
    names = [p.name for p in hub.settings.operators.oidc if p.client_id]
    return web.json_response({"providers": names, "local": True}, headers=NO_STORE)


def _redirect_uri(request: web.Request, provider: str) -> str:
    public = hub_of(request).settings.operators.public_url
    base = public.rstrip("/") if public else f"{request.scheme}://{request.host}"
    return f"{base}/console/auth/oidc/{provider}/callback"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


async def oidc_start(request: web.Request) -> web.StreamResponse:
    hub = hub_of(request)
    name = request.match_info["provider"]
    provider = hub.identity.provider(name)
    if provider is None or not provider.settings.client_id:
        raise NotFound(f"no sign-in provider {name!r}", field="provider")
    try:
        authorize = await provider.endpoint("authorization_endpoint")
    except AuthRefused as exc:
        raise refusal_error(exc) from None
    state, nonce, verifier, browser = (secrets.token_urlsafe(32) for _ in range(4))
    challenge = _b64(hashlib.sha256(verifier.encode("ascii")).digest())
    request.app[PENDING_KEY].add(state, _Pending(name, verifier, nonce, browser, time.monotonic()))
    query = urlencode({"response_type": "code", "client_id": provider.settings.client_id,
                       "redirect_uri": _redirect_uri(request, name), "scope": provider.settings.scopes,
                       "state": state, "nonce": nonce, "code_challenge": challenge,
                       "code_challenge_method": "S256"})
    response = web.HTTPFound(f"{authorize}{'&' if '?' in authorize else '?'}{query}", headers=NO_STORE)
    set_cookie(response, LOGIN_COOKIE, browser, secure=_secure(request), max_age=int(PENDING_TTL_S),
               same_site="Lax")  # sent on the provider's top-level redirect back
    raise response


async def oidc_callback(request: web.Request) -> web.StreamResponse:
    hub = hub_of(request)
    name = request.match_info["provider"]
    state, code = request.query.get("state", ""), request.query.get("code", "")
    pending = request.app[PENDING_KEY].take(state) if state else None
    browser = request.cookies.get(LOGIN_COOKIE, "")
    if pending is None or pending.provider != name or not code or \
            not hmac.compare_digest(browser.encode(), pending.browser.encode()):
        await hub.audit.record("auth.console", "refused", reason="bad-sign-in-state", peer=peer_of(request),
                               details={"provider": name, "error": request.query.get("error", "")[:64]})
        raise Unauthorized("this sign-in is unknown, expired or was started in another browser; start again",
                           code="IotHubUnauthorizedAccess")
    provider = hub.identity.provider(name)
    try:
        if provider is None:
            raise AuthRefused("unknown-provider", "no such sign-in provider")
        id_token = await provider.exchange_code(code, redirect_uri=_redirect_uri(request, name),
                                                code_verifier=pending.verifier)
        principal = await hub.authenticator.operator(IdTokenLogin(name, id_token, pending.nonce),
                                                     required=None, surface=SURFACE, peer=peer_of(request))
    except AuthRefused as exc:
        raise refusal_error(exc) from None
    response = web.HTTPFound("/console/", headers=NO_STORE)
    await _open_session(request, principal, response)
    clear_cookie(response, LOGIN_COOKIE, secure=_secure(request))
    raise response
