"""The route guard's second half for people: after the rights check every caller goes through
(`api.auth.authenticate`: the route's permission against the union of the person's role rights), a
person's call is checked against the *area* of the route and the device *scopes* of their roles.

* Each route belongs to an area (`security.roles.Area`) and needs read or write access there
  (`classify`); a route this table does not know needs admin write, i.e. Owner — new routes are
  closed to people until classified.
* A scoped grant (`tags.site = 'plant-1'`) covers a route only when the route names a device that
  matches (per-device routes: the twin is read and the scope evaluated with the query language), or
  when the route lists devices: `POST /devices/query` runs narrowed to the scopes, `GET /devices`
  answers only matching devices. Any other route (bulk operations, statistics, the feedback queue,
  the whole telemetry stream, the audit log) is refused to a scoped-only operator.
* Device keys: answers that carry device keys have them removed for roles that may not see them.

Refusals answer 403 and write an audit record (`auth.rest`, `refused`, `missing-role` or
`out-of-scope`); a successful call runs with `audit.acting_as`, so change records name the person's
issuer as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tether.api.context import hub_of, peer_of
from tether.api.operator_auth import session_token
from tether.errors import Forbidden, NotFound, TetherError
from tether.messaging.query.scope import in_scope
from tether.registry.models import DEVICE_ID_RE
from tether.security.audit import acting_as
from tether.security.principal import Principal
from tether.security.roles import Access, Area, Decision, decide, may_see_keys

__all__ = ["SCOPES_KEY", "Operation", "classify", "operator_call", "scopes_of"]

SCOPES_KEY: web.RequestKey[tuple[str, ...]] = web.RequestKey("operator_scopes")
_R, _W = Access.read, Access.write
SESSION_RECHECK_S = 5.0


@dataclass(frozen=True, slots=True)
class Operation:
    area: Area | None  # None: any role will do (the console's own "who am I")
    access: Access
    device: bool = False  # names one device in {id} (or ?device=)
    lists: bool = False  # answers devices: scoped callers get the matching ones
    keys: bool = False  # answers every device key: needs unscoped key visibility


def _template(request: web.Request) -> str:
    info = request.match_info
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    return str(getattr(resource, "canonical", request.path))


def classify(request: web.Request) -> Operation:
    """The area and access a request needs (by method and route template)."""
    method, path = request.method, _template(request)
    write = _W if method not in ("GET", "HEAD") else _R
    if path == "/console/api/me":
        return Operation(None, _R)
    if path == "/console/api/overview":
        return Operation(Area.registry, _R)
    if path in ("/console/api/auth-failures", "/console/api/security-status", "/tether/audit"):
        return Operation(Area.audit, _R)
    if path == "/devices/query":
        return Operation(Area.twins, _R, lists=True)
    if path == "/twins/{id}/modules/{mid}":  # module twins: the device's scope decides
        return Operation(Area.twins, write, device=True)
    if path.startswith("/twins/{id}/"):  # direct methods (device or module)
        return Operation(Area.service, _W, device=True)
    if path == "/twins/{id}":
        return Operation(Area.twins, write, device=True)
    if path in ("/devices/{id}/messages/deviceBound", "/devices/{id}/commands"):
        return Operation(Area.service, _W, device=True)
    if path.startswith("/messages/serviceBound/filenotifications"):
        # Azure grants fileUpload/notifications/action to Data Reader too: read like telemetry.
        return Operation(Area.telemetry, _R)
    if path.startswith("/messages/serviceBound/"):
        return Operation(Area.service, _W)
    if path.startswith("/jobs"):  # jobs v2 and import/export: GET reads, the rest schedules or cancels
        return Operation(Area.jobs, write)
    if path == "/configurations/testQueries":  # Azure: configurations/testQueries/action, not a read
        return Operation(Area.configurations, _W)
    if path.startswith("/configurations"):
        return Operation(Area.configurations, write)
    if path in ("/devices/{id}/applyConfigurationContent", "/devices/applyConfigurationContent/{id}"):
        return Operation(Area.configurations, _W, device=True)
    if path == "/tether/files/settings":
        return Operation(Area.admin, _R)
    if path == "/devices":
        return Operation(Area.registry, write, lists=method == "GET")
    if path == "/devices/{id}" or path.startswith(("/tether/devices/{id}/", "/devices/{id}/modules")):
        return Operation(Area.registry, write, device=True)
    if path in ("/statistics/devices", "/tether/devices/import"):
        return Operation(Area.registry, write)
    if path == "/tether/devices/export":
        return Operation(Area.registry, _R, keys=True)
    if path.startswith("/tether/events/"):
        if path == "/tether/events/stream":
            checkpointing = request.query.get("checkpoint", "").lower() in ("true", "1", "yes")
            return Operation(Area.telemetry, _W if checkpointing else _R,
                             device=bool(request.query.get("device")))
        return Operation(Area.telemetry, write)
    if path.startswith("/tether/policies"):
        keys = request.query.get("keys", "").lower() in ("true", "1", "yes")
        return Operation(Area.admin, _W if keys else write)  # policy keys: owner only
    if path.startswith("/tether/admin/"):
        return Operation(Area.admin, write)
    return Operation(Area.admin, _W)  # unknown to this table: owners only


def _device_id(request: web.Request) -> str | None:
    value = request.match_info.get("id") or request.query.get("device")
    return value if value and DEVICE_ID_RE.fullmatch(value) else None


async def _twin(request: web.Request, device_id: str) -> dict[str, Any]:
    """The twin a scope is evaluated on; a device that does not exist matches as an empty twin."""
    try:
        return await hub_of(request).twins.get(device_id)
    except NotFound:
        return {"deviceId": device_id}


async def _refuse(request: web.Request, principal: Principal, reason: str, message: str,
                  details: dict[str, Any]) -> TetherError:
    await hub_of(request).audit.record(
        "auth.rest", "refused", principal=principal.name, credential=principal.credential.value,
        reason=reason, peer=peer_of(request), target=_device_id(request),
        details={"issuer": principal.issuer, "route": f"{request.method} {_template(request)}", **details},
    )
    return Forbidden(message, code="IotHubUnauthorizedAccess")


def scopes_of(request: web.Request) -> tuple[str, ...] | None:
    """The device scopes a listing route must narrow to (None: every device)."""
    return request.get(SCOPES_KEY)


async def operator_call(request: web.Request, principal: Principal, handler: Handler) -> web.StreamResponse:
    op = classify(request)
    grants = principal.grants
    if op.area is not None:
        decision = decide(grants, op.area, op.access)
        if not decision.allowed:
            raise await _refuse(request, principal, "missing-role",
                                f"your roles do not allow {op.access.name} access to {op.area.value}",
                                {"area": op.area.value, "access": op.access.name})
        if decision.scoped:
            await _check_scope(request, principal, op, decision)
    keys = may_see_keys(grants)
    if op.keys and not (keys.allowed and keys.scopes is None):  # no key role, or only scoped ones
        raise await _refuse(request, principal, "missing-role", "exporting every device key needs an "
                            "unscoped Owner, Data Contributor or Registry Contributor role", {"keys": True})
    watcher = _watch_session(request) if _template(request) == "/tether/events/stream" else None
    try:
        with acting_as(principal.name, {"issuer": principal.issuer}):
            response = await handler(request)
    finally:
        if watcher is not None:
            watcher.cancel()
    if op.lists and SCOPES_KEY in request and request.path.rstrip("/") == "/devices":
        await _filter_devices(request, response, request[SCOPES_KEY])
    if keys.scopes is not None or not keys.allowed:
        await _redact_keys(request, response, keys)
    return response


def _watch_session(request: web.Request) -> asyncio.Task[None] | None:
    """A feed lives as long as the connection: for a console session, end it when the session ends
    (sign-out, operator disabled, expiry), checked every `SESSION_RECHECK_S`."""
    token = session_token(request) if "Authorization" not in request.headers else None
    if token is None:
        return None
    sessions = hub_of(request).sessions

    async def watch() -> None:
        while True:
            await asyncio.sleep(SESSION_RECHECK_S)
            with contextlib.suppress(Exception):  # a database hiccup is not a sign-out
                if await sessions.lookup(token) is None:
                    break
        if request.transport is not None:
            request.transport.close()

    return asyncio.create_task(watch(), name="operator-session-watch")


async def _check_scope(request: web.Request, principal: Principal, op: Operation, decision: Decision) -> None:
    assert decision.scopes is not None
    device_id = _device_id(request) if op.device else None
    if device_id is not None:
        if not in_scope(decision.scopes, await _twin(request, device_id)):
            raise await _refuse(request, principal, "out-of-scope", f"device {device_id} is outside the "
                                "device scope of your roles", {"scopes": list(decision.scopes)})
        return
    if op.lists:
        request[SCOPES_KEY] = decision.scopes
        return
    raise await _refuse(request, principal, "out-of-scope", "this operation spans every device; your "
                        "roles are scoped to some devices", {"scopes": list(decision.scopes)})


def _json_body(response: web.StreamResponse) -> Any:
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    body = response.body
    if not isinstance(body, bytes | bytearray) or not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _replace(response: web.StreamResponse, doc: Any) -> None:
    assert isinstance(response, web.Response)
    response.body = json.dumps(doc).encode()


async def _filter_devices(request: web.Request, response: web.StreamResponse,
                          scopes: tuple[str, ...]) -> None:
    doc = _json_body(response)
    if not isinstance(doc, list):
        return
    kept = [d for d in doc if isinstance(d, dict) and isinstance(d.get("deviceId"), str)
            and in_scope(scopes, await _twin(request, d["deviceId"]))]
    _replace(response, kept)


async def _redact_keys(request: web.Request, response: web.StreamResponse, keys: Decision) -> None:
    """Remove symmetric keys from device documents the caller's roles may not see keys of."""
    doc = _json_body(response)
    devices = doc if isinstance(doc, list) else [doc]
    changed = False
    for device in devices:
        if not isinstance(device, dict):
            continue
        auth = device.get("authentication")
        sym = auth.get("symmetricKey") if isinstance(auth, dict) else None
        if not isinstance(sym, dict) or not any(sym.get(k) for k in ("primaryKey", "secondaryKey")):
            continue
        if keys.allowed and keys.scopes is not None and isinstance(device.get("deviceId"), str) and \
                in_scope(keys.scopes, await _twin(request, device["deviceId"])):
            continue
        sym["primaryKey"] = sym["secondaryKey"] = None
        changed = True
    if changed:
        _replace(response, doc)
