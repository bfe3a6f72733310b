"""How a person's credential arrives over HTTP: `Authorization: Bearer {OIDC access token}` or the
console's session cookie (plus `X-CSRF-Token` on requests that change state), and the cookie itself.

Cookies: `__Host-tether-session` — HttpOnly, Secure, SameSite=Strict, Path=/, no Domain (the
`__Host-` prefix makes the browser enforce the last three). Only with `operators.cookie_secure = false`
(plain-HTTP tests on loopback) is it `tether-session` without Secure.
"""

from __future__ import annotations

from aiohttp import web

from tether.security.identity import BearerToken, OperatorCredential, SessionCookie

__all__ = ["CSRF_HEADER", "SAFE_METHODS", "clear_cookie", "operator_credential", "session_cookie_name",
           "session_token", "set_cookie"]

CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SECURE_NAME = "__Host-tether-session"
_PLAIN_NAME = "tether-session"


def session_cookie_name(secure: bool) -> str:
    return _SECURE_NAME if secure else _PLAIN_NAME


def session_token(request: web.Request) -> str | None:
    return request.cookies.get(_SECURE_NAME) or request.cookies.get(_PLAIN_NAME) or None


def operator_credential(request: web.Request) -> OperatorCredential | None:
    """The person's credential on this request, or None (then it is a SAS call, or nothing).
    An `Authorization` header always wins over a cookie."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        return BearerToken(token.strip()) if scheme.lower() == "bearer" else None
    cookie = session_token(request)
    if cookie is None:
        return None
    return SessionCookie(cookie, request.headers.get(CSRF_HEADER),
                         changes_state=request.method not in SAFE_METHODS)


def set_cookie(response: web.StreamResponse, name: str, value: str, *, secure: bool, max_age: int,
               same_site: str = "Strict") -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=secure, httponly=True,
                        samesite=same_site)


def clear_cookie(response: web.StreamResponse, name: str, *, secure: bool) -> None:
    response.set_cookie(name, "", max_age=0, path="/", secure=secure, httponly=True, samesite="Strict")
