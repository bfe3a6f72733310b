"""The console's routes: static files and the summaries the REST API has no route for.

Static files are served from this package's `static/` (an allow-list: only files that exist there,
no directory listing) with a strict Content-Security-Policy (scripts, styles and connections from
this origin only; no inline script or style, no framing), `nosniff`, `no-referrer`.
"""

from __future__ import annotations

import time
from datetime import timedelta
from importlib import resources
from typing import Any, Final

from aiohttp import web

from tether.api.context import hub_of, principal_of
from tether.api.operator_auth import session_token
from tether.api.routes import Param, Route
from tether.api.security_routes import TrustState, trust_of
from tether.console.auth_routes import (
    PENDING_KEY,
    PendingLogins,
    login,
    logout,
    oidc_callback,
    oidc_start,
    providers,
)
from tether.errors import NotFound
from tether.observability.metrics import MESSAGES_IN
from tether.registry.models import utcnow
from tether.security.principal import Permission, Principal, PrincipalKind
from tether.security.roles import Access, Area, decide, may_see_keys
from tether.security.tls import TlsContextFactory

__all__ = ["CONSOLE_ROUTES", "SECURITY_HEADERS", "add_console_routes"]

CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
              "frame-ancestors 'none'; object-src 'none'")
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_STATIC = resources.files("tether.console") / "static"
MAX_FAILURE_HOURS = 24 * 7
READ = Permission.registry_read


def _static_names() -> frozenset[str]:
    return frozenset(p.name for p in _STATIC.iterdir() if (p.is_file() and p.name[-4:] in (".css", ".svg"))
                     or (p.is_file() and p.name.endswith((".js", ".html"))))


_FILES = _static_names()


async def console_index(request: web.Request) -> web.Response:
    if request.path == "/console":
        raise web.HTTPFound("/console/")
    return _file("index.html")


async def console_file(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in _FILES:
        raise NotFound(f"no console file {name!r}", field="file")
    return _file(name)


def _file(name: str) -> web.Response:
    suffix = name[name.rfind("."):]
    body = (_STATIC / name).read_bytes()
    cache = "no-cache" if name == "index.html" else "public, max-age=300"
    return web.Response(body=body, content_type=_TYPES[suffix], charset="utf-8",
                        headers={**SECURITY_HEADERS, "Cache-Control": cache})


def _can(principal: Principal) -> dict[str, bool]:
    """What the console shows controls for (the API decides anyway)."""
    if principal.kind is not PrincipalKind.user:
        perms = principal.permissions
        write, service = Permission.registry_write in perms, Permission.service_connect in perms
        return {"registryWrite": write, "twinsWrite": write, "service": service, "telemetry": service,
                "audit": Permission.registry_read in perms, "admin": len(perms) == 4, "keys": write}
    grants = principal.grants

    def allowed(area: Area, access: Access) -> bool:
        return decide(grants, area, access).allowed

    return {"registryWrite": allowed(Area.registry, Access.write),
            "twinsWrite": allowed(Area.twins, Access.write),
            "service": allowed(Area.service, Access.write), "telemetry": allowed(Area.telemetry, Access.read),
            "audit": allowed(Area.audit, Access.read), "admin": allowed(Area.admin, Access.write),
            "keys": may_see_keys(grants).allowed}


async def me(request: web.Request) -> web.Response:
    """Who is signed in, their roles, what the console may offer them, and the session's CSRF token."""
    principal = principal_of(request)
    doc: dict[str, Any] = {"user": principal.name, "displayName": principal.display_name,
                           "issuer": principal.issuer, "kind": principal.kind.value,
                           "roles": [g.to_json() for g in principal.grants], "can": _can(principal)}
    token = session_token(request)
    if token is not None and principal.credential.value == "session":
        record = await hub_of(request).sessions.lookup(token)
        if record is not None:
            doc["csrf"] = record.csrf_token
            doc["expires"] = record.expires.isoformat()
    return web.json_response(doc, headers={"Cache-Control": "no-store"})


def _messages_total() -> float:
    return sum(s.value for m in MESSAGES_IN.collect() for s in m.samples if s.name.endswith("_total"))


async def overview(request: web.Request) -> web.Response:
    """Connections, device counts, the telemetry counter (the console derives messages/s) and the
    `$Default` consumer group's lag per partition."""
    hub = hub_of(request)
    stream = hub.stream
    partitions = []
    latest = getattr(stream, "latest_sequence", None)
    for p in range(stream.partition_count):
        end = await latest(p) if latest is not None else None
        checkpoint = await stream.get_checkpoint("$Default", p)
        lag = None if end is None else end - (0 if checkpoint is None else checkpoint + 1)
        partitions.append({"id": p, "next": end, "checkpoint": checkpoint, "lag": lag})
    stats = await hub.registry.statistics()
    return web.json_response({
        "time": time.time(), "connections": len(hub.connections), "messagesTotal": _messages_total(),
        "devices": stats.model_dump(mode="json", by_alias=True), "partitions": partitions,
    }, headers={"Cache-Control": "no-store"})


async def auth_failures(request: web.Request) -> web.Response:
    """Refused authentications per reason, in equal time buckets over the last `hours` (≤ 1,000
    newest refusals)."""
    raw = request.query.get("hours", "24")
    hours = int(raw) if raw.isdigit() and 1 <= int(raw) <= MAX_FAILURE_HOURS else 24
    buckets = 24
    now = utcnow()
    start = now - timedelta(hours=hours)
    width = hours * 3600 / buckets
    records = await hub_of(request).audit.query(limit=1000, since=start, outcome="refused",
                                                action_prefix="auth.")
    reasons: dict[str, list[int]] = {}
    for r in records:
        index = min(buckets - 1, int((r.time - start).total_seconds() // width))
        reasons.setdefault(r.reason or "unknown", [0] * buckets)[max(0, index)] += 1
    return web.json_response({"start": start.isoformat(), "bucketSeconds": width, "buckets": buckets,
                              "reasons": reasons, "total": len(records)},
                             headers={"Cache-Control": "no-store"})


async def security_status(request: web.Request) -> web.Response:
    """The served TLS certificate and the trust bundle's state (read-only; no keys)."""
    hub = hub_of(request)
    factory = hub.tls if isinstance(hub.tls, TlsContextFactory) else None
    served = factory.certificate if factory is not None else None
    try:
        status = await trust_of(request).status()
        trust: dict[str, object] | None = TrustState.of(status, changed=False, served=served).to_wire()
    except Exception as exc:  # no PKI in this data dir (tests, external certificates)
        trust = {"error": type(exc).__name__}
    return web.json_response({"tlsListener": factory is not None, "tls": (
        {"subject": served.subject.rfc4514_string(), "issuer": served.issuer.rfc4514_string(),
         "notAfter": served.not_valid_after_utc.isoformat(), "generation": factory.generation}
        if served is not None and factory is not None else None), "trust": trust},
        headers={"Cache-Control": "no-store"})


TAG = "tether-console"
CONSOLE_ROUTES: tuple[Route, ...] = (
    Route("GET", "/console", console_index, "The web console", None, TAG),
    Route("GET", "/console/", console_index, "The web console", None, TAG),
    Route("GET", "/console/{file}", console_file, "Console static files", None, TAG),
    Route("GET", "/console/auth/providers", providers, "Sign-in choices", None, TAG, response="object"),
    Route("POST", "/console/auth/login", login, "Sign in as a local operator (opens a session)", None, TAG,
          request="object", response="object",
          description='Body `{"username", "password", "code"?}`; sets the session cookie; answers the '
                      "CSRF token. Audited `auth.console`."),
    Route("POST", "/console/auth/logout", logout, "Sign out (ends the session)", None, TAG, response="object",
          params=(Param("X-CSRF-Token", "header", "The session's CSRF token."),)),
    Route("GET", "/console/auth/oidc/{provider}/start", oidc_start, "Sign in with an OIDC provider", None,
          TAG, status=302),
    Route("GET", "/console/auth/oidc/{provider}/callback", oidc_callback, "OIDC redirect URI", None, TAG,
          status=302),
    Route("GET", "/console/api/me", me, "The signed-in operator, roles and CSRF token", READ, TAG,
          response="object"),
    Route("GET", "/console/api/overview", overview, "Connections, devices, telemetry counter, stream lag",
          READ, TAG, response="object"),
    Route("GET", "/console/api/auth-failures", auth_failures, "Refused authentications by reason over time",
          READ, TAG, response="object", params=(Param("hours", "query", "1-168, default 24."),)),
    Route("GET", "/console/api/security-status", security_status, "TLS certificate and trust bundle state",
          READ, TAG, response="object"),
)


def add_console_routes(app: web.Application) -> None:
    from tether.api.app import mount  # not at import time: app.py imports this module

    app[PENDING_KEY] = PendingLogins()
    mount(app, CONSOLE_ROUTES)
