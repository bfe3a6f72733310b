"""Tether extensions for operators: shared access policies and the audit log.

Policy management (create, delete, regenerate keys) needs a policy holding all four rights — an
owner such as `iothubowner` — because a policy key is a credential to the whole hub. Listing shows
names and rights; keys only with `?keys=true`, to a caller with RegistryReadWrite + ServiceConnect and
every right of the policy (`tether.security.disclosure`): no caller is shown a key that grants more than
it holds. Each key read is audited as `policy.keys.read` (allowed or refused, naming the policies).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tether.api.auth import OWNER_RIGHTS, require_all
from tether.api.bodies import query_bool, query_choice, query_datetime, query_int, read_json_object
from tether.api.context import hub_of, peer_of, principal_of
from tether.api.devices import KEY_CHOICES, validation_error
from tether.errors import Forbidden
from tether.registry.models import validate_key
from tether.security.disclosure import KEY_MANAGEMENT_RIGHTS, may_read_policy_keys, rights_of
from tether.security.principal import Permission
from tether.storage.base import AuditRecord, PolicyRecord

KEY_READ_RIGHTS = KEY_MANAGEMENT_RIGHTS
KEYS_READ = "policy.keys.read"
MAX_AUDIT = 1000


class Policy(BaseModel):
    """A shared access policy as the API shows it; keys are omitted unless asked for."""

    model_config = ConfigDict(populate_by_name=True)
    key_name: str = Field(alias="keyName")
    rights: list[Permission]
    primary_key: str | None = Field(None, alias="primaryKey")
    secondary_key: str | None = Field(None, alias="secondaryKey")

    @classmethod
    def of(cls, record: PolicyRecord, *, keys: bool) -> Policy:
        return cls(
            key_name=record.name,
            rights=sorted(Permission(p) for p in record.permissions),
            primary_key=record.primary_key if keys else None,
            secondary_key=record.secondary_key if keys else None,
        )

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class PolicyCreate(BaseModel):
    """Body of `PUT /tether/policies/{name}`; keys are generated when omitted."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    rights: list[Permission] = Field(min_length=1)
    primary_key: str | None = Field(None, alias="primaryKey")
    secondary_key: str | None = Field(None, alias="secondaryKey")

    @field_validator("primary_key", "secondary_key")
    @classmethod
    def _key_ok(cls, v: str | None) -> str | None:
        return None if v is None else validate_key(v)


class AuditEntry(BaseModel):
    id: int | None = None
    time: datetime
    action: str
    outcome: str
    principal: str | None = None
    credential: str | None = None
    reason: str | None = None
    peer: str | None = None
    target: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, record: AuditRecord) -> AuditEntry:
        return cls(
            id=record.id, time=record.time, action=record.action, outcome=record.outcome,
            principal=record.principal, credential=record.credential, reason=record.reason,
            peer=record.peer, target=record.target, details=dict(record.details),
        )


def _policy_response(record: PolicyRecord, *, keys: bool, status: int = 200) -> web.Response:
    return web.json_response(Policy.of(record, keys=keys).to_wire(), status=status)


async def _wants_keys(request: web.Request) -> bool:
    keys = query_bool(request, "keys")
    if keys:
        await require_all(request, principal_of(request), KEY_READ_RIGHTS, what="reading policy keys")
    return keys


async def _audit_key_read(request: web.Request, outcome: str, shown: list[str], withheld: list[str]) -> None:
    principal = principal_of(request)
    details: dict[str, Any] = {"policies": shown}
    if withheld:
        details["withheld"] = withheld
    await hub_of(request).audit.record(
        KEYS_READ, outcome, principal=principal.name, credential=str(principal.credential),
        reason="more-rights" if outcome == "refused" else None, peer=peer_of(request),
        target=shown[0] if len(shown) == 1 else None, details=details)


async def list_policies(request: web.Request) -> web.Response:
    """With `?keys=true`: the keys of the policies whose rights the caller holds; the others are
    listed without keys (and named under `withheld` in the audit record)."""
    keys = await _wants_keys(request)
    records = await hub_of(request).policies.list()
    records.sort(key=lambda r: r.name)
    if not keys:
        return web.json_response([Policy.of(r, keys=False).to_wire() for r in records])
    principal = principal_of(request)
    readable = {r.name for r in records if may_read_policy_keys(principal, r)}
    await _audit_key_read(request, "allowed", sorted(readable),
                          sorted(r.name for r in records if r.name not in readable))
    return web.json_response([Policy.of(r, keys=r.name in readable).to_wire() for r in records])


async def get_policy(request: web.Request) -> web.Response:
    """With `?keys=true`: 403 (audited) when the policy has a right the caller lacks."""
    keys = await _wants_keys(request)
    record = await hub_of(request).policies.get(request.match_info["name"])
    if keys:
        principal = principal_of(request)
        if not may_read_policy_keys(principal, record):
            await _audit_key_read(request, "refused", [record.name], [])
            missing = sorted(str(p) for p in rights_of(record.permissions) - principal.permissions)
            raise Forbidden(f"the keys of policy {record.name!r} grant rights this caller does not hold: "
                            f"{', '.join(missing)}", code="IotHubUnauthorizedAccess")
        await _audit_key_read(request, "allowed", [record.name], [])
    return _policy_response(record, keys=keys)


async def _require_owner(request: web.Request, what: str) -> str:
    principal = principal_of(request)
    await require_all(request, principal, OWNER_RIGHTS, what=what)
    return principal.name


async def create_policy(request: web.Request) -> web.Response:
    actor = await _require_owner(request, "policy management")
    name = request.match_info["name"]
    try:
        body = PolicyCreate.model_validate(await read_json_object(request))
    except ValidationError as exc:
        raise validation_error(exc) from None
    record = await hub_of(request).policies.create(
        name, [str(p) for p in body.rights], primary_key=body.primary_key,
        secondary_key=body.secondary_key, actor=actor,
    )
    return _policy_response(record, keys=True, status=201)


async def delete_policy(request: web.Request) -> web.Response:
    actor = await _require_owner(request, "policy management")
    await hub_of(request).policies.delete(request.match_info["name"], actor=actor)
    return web.Response(status=204)


async def regenerate_policy_key(request: web.Request) -> web.Response:
    actor = await _require_owner(request, "policy management")
    which = query_choice(request, "key", KEY_CHOICES, default="primary")
    record = await hub_of(request).policies.regenerate_key(request.match_info["name"], which, actor=actor)
    return _policy_response(record, keys=True)


async def query_audit(request: web.Request) -> web.Response:
    """Newest first (as the audit log returns them), filtered like `AuditLog.query`."""
    hub = hub_of(request)
    limit = query_int(request, "limit", default=100, low=1, high=MAX_AUDIT)
    since = query_datetime(request, "since")
    await hub.audit.flush()  # records are written in batches; show everything recorded so far
    records = await hub.audit.query(
        limit=limit,
        since=since,
        outcome=request.query.get("outcome") or None,
        action_prefix=request.query.get("action") or None,
        principal=request.query.get("principal") or None,
    )
    return web.json_response([AuditEntry.of(r).model_dump(mode="json") for r in records])
