"""Shared access policies (Azure's hub-level `SharedAccessKeyName`s): names, rights and key pairs.

Every change is validated and audited (`policy.create`, `policy.delete`, `policy.regenerate-key`); keys
never appear in an audit record or a log line. On first start `ensure_defaults()` creates Azure's five
default policies, each with fresh random keys.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable

from tether.errors import BadRequest, Conflict, NotFound
from tether.registry.models import validate_key
from tether.security.audit import AuditLog
from tether.security.keys import generate_key
from tether.security.principal import Permission
from tether.storage.base import PolicyRecord, PolicyRepository

ALL_PERMISSIONS: frozenset[str] = frozenset(p.value for p in Permission)
DEFAULT_POLICIES: dict[str, frozenset[str]] = {
    "iothubowner": ALL_PERMISSIONS,
    "service": frozenset({Permission.service_connect.value}),
    "device": frozenset({Permission.device_connect.value}),
    "registryRead": frozenset({Permission.registry_read.value}),
    "registryReadWrite": frozenset({Permission.registry_read.value, Permission.registry_write.value}),
}
POLICY_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
KEY_CHOICES = ("primary", "secondary", "both")
SYSTEM_ACTOR = "system"


def validate_policy_name(name: str) -> str:
    if not isinstance(name, str) or not POLICY_NAME_RE.fullmatch(name):
        raise BadRequest("policy name must be 1-64 characters of letters, digits and _ . -", field="name")
    return name


def validate_permissions(permissions: Iterable[str]) -> frozenset[str]:
    if isinstance(permissions, str):
        permissions = [p for p in re.split(r"[,\s]+", permissions) if p]
    rights = frozenset(str(p) for p in permissions)
    unknown = sorted(rights - ALL_PERMISSIONS)
    if unknown:
        raise BadRequest(
            f"unknown rights {unknown}; allowed: {sorted(ALL_PERMISSIONS)}", field="rights"
        )
    if not rights:
        raise BadRequest("a policy needs at least one right", field="rights")
    return rights


def _checked_key(value: str | None, field: str) -> str:
    if value is None or value == "":
        return generate_key()
    try:
        return validate_key(value)
    except ValueError as exc:
        raise BadRequest(f"{field} {exc}", field=field) from None


class PolicyService:
    """Validated, audited access to the policy repository."""

    def __init__(self, repo: PolicyRepository, audit: AuditLog) -> None:
        self._repo = repo
        self._audit = audit
        self._lock = asyncio.Lock()  # read-check-write sequences (create/delete/regenerate) in-process

    async def ensure_defaults(self) -> None:
        """Create Azure's five default policies when the hub has no policy at all (first start)."""
        async with self._lock:
            if await self._repo.list():
                return
            for name, rights in DEFAULT_POLICIES.items():
                await self._repo.upsert(PolicyRecord(name, generate_key(), generate_key(), rights))
                await self._audit_change("policy.create", name, SYSTEM_ACTOR, {"rights": sorted(rights)})

    async def list(self) -> list[PolicyRecord]:
        return await self._repo.list()

    async def find(self, name: str) -> PolicyRecord | None:
        """None for unknown or malformed names (names arrive from untrusted tokens)."""
        if not isinstance(name, str) or not POLICY_NAME_RE.fullmatch(name):
            return None
        return await self._repo.get(name)

    async def get(self, name: str) -> PolicyRecord:
        policy = await self.find(name)
        if policy is None:
            raise NotFound(f"shared access policy {name!r} not found", code="KeyNameNotFound", field="name")
        return policy

    async def create(
        self,
        name: str,
        permissions: Iterable[str],
        *,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        actor: str,
    ) -> PolicyRecord:
        validate_policy_name(name)
        rights = validate_permissions(permissions)
        record = PolicyRecord(
            name=name,
            primary_key=_checked_key(primary_key, "primaryKey"),
            secondary_key=_checked_key(secondary_key, "secondaryKey"),
            permissions=rights,
        )
        async with self._lock:
            if await self._repo.get(name) is not None:
                raise Conflict(f"shared access policy {name!r} already exists", code="KeyNameAlreadyExists",
                               field="name")
            await self._repo.upsert(record)
            await self._audit_change("policy.create", name, actor, {"rights": sorted(rights)})
        return record

    async def delete(self, name: str, *, actor: str) -> None:
        validate_policy_name(name)
        async with self._lock:
            if not await self._repo.delete(name):
                raise NotFound(f"shared access policy {name!r} not found", code="KeyNameNotFound",
                               field="name")
            await self._audit_change("policy.delete", name, actor, None)

    async def regenerate_key(self, name: str, which: str, *, actor: str) -> PolicyRecord:
        """New random key(s): `which` is primary, secondary or both."""
        if which not in KEY_CHOICES:
            raise BadRequest(f"key must be one of {', '.join(KEY_CHOICES)}", field="which")
        async with self._lock:
            current = await self.get(name)
            record = PolicyRecord(
                name=current.name,
                primary_key=generate_key() if which in ("primary", "both") else current.primary_key,
                secondary_key=generate_key() if which in ("secondary", "both") else current.secondary_key,
                permissions=current.permissions,
            )
            await self._repo.upsert(record)
            await self._audit_change("policy.regenerate-key", name, actor, {"which": which})
        return record

    async def _audit_change(
        self, action: str, name: str, actor: str, details: dict[str, object] | None
    ) -> None:
        await self._audit.record(action, "ok", principal=actor, target=name, details=dict(details or {}))


__all__ = [
    "ALL_PERMISSIONS",
    "DEFAULT_POLICIES",
    "KEY_CHOICES",
    "POLICY_NAME_RE",
    "PolicyService",
    "validate_permissions",
    "validate_policy_name",
]
