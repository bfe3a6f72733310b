"""Shared access policies (Azure's hub-level `SharedAccessKeyName`s): names, rights and key pairs.

Every change is validated and audited (`policy.create`, `policy.delete`, `policy.regenerate-key`); keys
never appear in an audit record or a log line. On first start `ensure_defaults()` creates Azure's five
default policies, each with fresh random keys.

`find()`/`get()` serve every REST call's authentication, so all policies (a hub has a handful) are
kept in memory: dropped synchronously by every change made through this service, re-read after
`cache_ttl_s` so that changes made by another process on the same database (another hub node, the
CLI) are honoured within that bound — a regenerated or deleted key elsewhere keeps working for at
most `cache_ttl_s`. `list()` and the read-modify-write of `regenerate_key()` always read the database.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable

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
DEFAULT_CACHE_TTL_S = 2.0


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

    def __init__(
        self,
        repo: PolicyRepository,
        audit: AuditLog,
        *,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`cache_ttl_s`: how long `find()`/`get()` may serve the policies without re-reading them
        (the bound on how late other processes' changes are seen); 0 disables the cache."""
        self._repo = repo
        self._audit = audit
        self._lock = asyncio.Lock()  # read-check-write sequences (create/delete/regenerate) in-process
        self._ttl_s = cache_ttl_s
        self._clock = clock
        self._cached: dict[str, PolicyRecord] | None = None  # every policy by name, or not loaded
        self._expires = 0.0
        self._epoch = 0  # bumped by every invalidation: a load overlapping one is not kept
        self._loading = asyncio.Lock()  # one reload at a time; the others wait and use its result
        self._write_relays: list[Callable[[], None]] = []

    async def ensure_defaults(self) -> None:
        """Create Azure's five default policies when the hub has no policy at all (first start)."""
        async with self._lock:
            if await self._repo.list():
                return
            for name, rights in DEFAULT_POLICIES.items():
                try:
                    await self._repo.upsert(PolicyRecord(name, generate_key(), generate_key(), rights))
                finally:
                    self._written()
                await self._audit_change("policy.create", name, SYSTEM_ACTOR, {"rights": sorted(rights)})

    async def list(self) -> list[PolicyRecord]:
        return await self._repo.list()

    async def find(self, name: str) -> PolicyRecord | None:
        """None for unknown or malformed names (names arrive from untrusted tokens)."""
        if not isinstance(name, str) or not POLICY_NAME_RE.fullmatch(name):
            return None
        if self._ttl_s <= 0:
            return await self._repo.get(name)
        return (await self._all()).get(name)

    def add_write_relay(self, cb: Callable[[], None]) -> None:
        """`cb()` after every policy write made through this process (the cluster bus tells the
        other nodes to drop their cached policies)."""
        self._write_relays.append(cb)

    def _written(self) -> None:
        self.invalidate()
        for cb in self._write_relays:
            cb()

    def invalidate(self) -> None:
        """Forget the cached policies (e.g. when told that another node changed one); the next
        lookup reads the database."""
        self._epoch += 1
        self._cached = None

    async def _all(self) -> dict[str, PolicyRecord]:
        """Every policy by name, from memory while fresh."""
        cached = self._cached
        if cached is not None and self._clock() < self._expires:
            return cached
        async with self._loading:
            cached = self._cached
            if cached is not None and self._clock() < self._expires:
                return cached  # another caller reloaded while this one waited
            epoch = self._epoch
            loaded = {p.name: p for p in await self._repo.list()}
            if epoch == self._epoch:  # no change of ours overlapped the read
                self._cached, self._expires = loaded, self._clock() + self._ttl_s
            return loaded

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
            try:
                await self._repo.upsert(record)
            finally:
                self._written()
            await self._audit_change("policy.create", name, actor, {"rights": sorted(rights)})
        return record

    async def delete(self, name: str, *, actor: str) -> None:
        validate_policy_name(name)
        async with self._lock:
            try:
                deleted = await self._repo.delete(name)
            finally:
                self._written()
            if not deleted:
                raise NotFound(f"shared access policy {name!r} not found", code="KeyNameNotFound",
                               field="name")
            await self._audit_change("policy.delete", name, actor, None)

    async def regenerate_key(self, name: str, which: str, *, actor: str) -> PolicyRecord:
        """New random key(s): `which` is primary, secondary or both."""
        if which not in KEY_CHOICES:
            raise BadRequest(f"key must be one of {', '.join(KEY_CHOICES)}", field="which")
        async with self._lock:
            valid = isinstance(name, str) and POLICY_NAME_RE.fullmatch(name)
            current = await self._repo.get(name) if valid else None  # fresh: never regress a key
            if current is None:
                raise NotFound(f"shared access policy {name!r} not found", code="KeyNameNotFound",
                               field="name")
            record = PolicyRecord(
                name=current.name,
                primary_key=generate_key() if which in ("primary", "both") else current.primary_key,
                secondary_key=generate_key() if which in ("secondary", "both") else current.secondary_key,
                permissions=current.permissions,
            )
            try:
                await self._repo.upsert(record)
            finally:
                self._written()
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
