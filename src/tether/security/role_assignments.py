"""Local role assignments (`tether role assign`): which operator holds which role, optionally scoped.

An assignment names the operator by issuer and subject — `local` and the username for local operators,
the provider's `iss` and the token's subject claim for OIDC operators — so the same person keeps their
roles whether they arrive with a bearer token or a console session. Roles from token claims are added
by the identity layer; this service holds only the local ones.

`grants_for` serves every operator request, so assignments are cached for `cache_ttl_s` (dropped at
once by changes made through this service; changes made by another process, e.g. the CLI beside a
running hub, are seen within that bound). Changes are audited (`role.assign`, `role.remove`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tether.errors import BadRequest, NotFound
from tether.registry.models import utcnow
from tether.security.audit import AuditSink
from tether.security.roles import Role, RoleGrant, parse_role
from tether.storage.sql.operators import RoleAssignmentRecord, SqlOperatorRepository

__all__ = ["RoleService"]

DEFAULT_CACHE_TTL_S = 2.0
MAX_SCOPE_CHARS = 1024


class RoleService:
    def __init__(
        self,
        repo: SqlOperatorRepository,
        audit: AuditSink,
        *,
        validate_scope: Callable[[str], None] | None = None,
        cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`validate_scope(text)` raises BadRequest for a condition the query language refuses (the
        hub passes the query parser; security does not import messaging)."""
        self._repo = repo
        self._audit = audit
        self.validate_scope = validate_scope
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, tuple[RoleGrant, ...]]] = {}

    async def assign(self, issuer: str, subject: str, role: str | Role, scope: str | None = None, *,
                     actor: str) -> RoleAssignmentRecord:
        try:
            parsed = parse_role(role)
        except ValueError as exc:
            raise BadRequest(str(exc), field="role") from None
        if not issuer or not subject or len(issuer) > 512 or len(subject) > 255:
            raise BadRequest("issuer and subject are required (issuer `local` for local operators)",
                             field="subject")
        scope = scope.strip() if scope else None
        if scope is not None:
            if len(scope) > MAX_SCOPE_CHARS:
                raise BadRequest(f"scope is longer than {MAX_SCOPE_CHARS} characters", field="scope")
            if self.validate_scope is not None:
                self.validate_scope(scope)
        for existing in await self._repo.list_assignments(issuer, subject):
            if existing.role == parsed.value and existing.scope == scope:
                return existing  # idempotent
        record = await self._repo.insert_assignment(issuer, subject, parsed.value, scope, utcnow(), actor)
        self._cache.clear()
        await self._audit.record("role.assign", "ok", principal=actor, target=f"user:{subject}",
                                 details={"issuer": issuer, "role": parsed.value, "scope": scope,
                                          "id": record.id})
        return record

    async def remove(self, assignment_id: int, *, actor: str) -> RoleAssignmentRecord:
        record = await self._repo.delete_assignment(assignment_id)
        if record is None:
            raise NotFound(f"role assignment {assignment_id} not found", code="RoleAssignmentNotFound",
                           field="id")
        self._cache.clear()
        await self._audit.record("role.remove", "ok", principal=actor, target=f"user:{record.subject}",
                                 details={"issuer": record.issuer, "role": record.role,
                                          "scope": record.scope, "id": record.id})
        return record

    async def list(self, issuer: str | None = None, subject: str | None = None) -> list[RoleAssignmentRecord]:
        return await self._repo.list_assignments(issuer, subject)

    async def grants_for(self, issuer: str, subject: str) -> tuple[RoleGrant, ...]:
        key = (issuer, subject)
        hit = self._cache.get(key)
        if hit is not None and self._clock() < hit[0]:
            return hit[1]
        grants = tuple(RoleGrant(parse_role(r.role), r.scope, "local")
                       for r in await self._repo.list_assignments(issuer, subject))
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (self._clock() + self._ttl, grants)
        return grants

    def invalidate(self) -> None:
        self._cache.clear()
