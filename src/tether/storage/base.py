"""The narrow storage interface. Services depend on these protocols only; the embedded (SQLite +
local files) and scale-out (PostgreSQL + NATS JetStream) implementations both satisfy them.

Concurrency contract: `replace`/`delete` compare `expected_etag` atomically with the write
(`UPDATE … WHERE etag = :expected`), so two writers with the same stale etag cannot both win.
`insert_many` and `apply_batch` are all-or-nothing: one transaction, rolled back on the first error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from tether.registry.models import ConnectionState, Device, Module, RegistryStatistics


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    name: str
    primary_key: str
    secondary_key: str
    permissions: frozenset[str]  # values of tether.security.principal.Permission


@dataclass(frozen=True, slots=True)
class AuditRecord:
    time: datetime
    action: str  # e.g. "auth.mqtt", "auth.rest", "device.create", "policy.delete"
    outcome: str  # "allowed" | "refused" | "ok" | "failed"
    principal: str | None = None  # Principal.name or the claimed identity; never a secret
    credential: str | None = None  # CredentialKind value
    reason: str | None = None
    peer: str | None = None  # "ip:port"
    target: str | None = None  # device id / policy name acted on
    details: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True, slots=True)
class ActivityUpdate:
    """Coalesced connection-state/activity change, written in batches (not per message); with
    `module_id` it is the module identity's (a module has its own connection state)."""

    device_id: str
    connection_state: ConnectionState | None
    at: datetime
    module_id: str | None = None

    @property
    def identity(self) -> tuple[str, str | None]:
        return self.device_id, self.module_id


class DeviceRepository(Protocol):
    async def get(self, device_id: str) -> Device | None: ...
    async def get_many(self, device_ids: Sequence[str]) -> dict[str, Device]: ...  # unknown ids absent
    async def insert(self, device: Device) -> None: ...  # Conflict if it exists
    async def insert_many(self, devices: Sequence[Device]) -> None: ...  # all-or-nothing
    async def replace(self, device: Device, expected_etag: str | None) -> None: ...
    async def delete(self, device_id: str, expected_etag: str | None) -> None: ...
    async def apply_batch(
        self,
        inserts: Sequence[Device],
        replaces: Sequence[tuple[Device, str | None]],  # (new version, expected etag or None)
        deletes: Sequence[tuple[str, str | None]],  # (device id, expected etag or None)
    ) -> None: ...  # one transaction; Conflict / NotFound / PreconditionFailed write nothing
    async def list(self, *, top: int, after: str | None = None) -> list[Device]: ...
    def iter_all(self) -> AsyncIterator[Device]: ...
    async def statistics(self) -> RegistryStatistics: ...
    # Activity of devices and of their modules (`ActivityUpdate.module_id`), in one transaction.
    async def apply_activity(self, updates: Sequence[ActivityUpdate]) -> None: ...
    async def reset_connection_states(self, at: datetime) -> int: ...  # all Connected → Disconnected


ModuleKey = tuple[str, str]  # (device id, module id)


class ModuleRepository(Protocol):
    """Module identities. A module belongs to a stored device: deleting the device deletes its modules
    (and their twins); their activity columns are written by `DeviceRepository.apply_activity`."""

    async def get(self, device_id: str, module_id: str) -> Module | None: ...
    async def get_many(self, keys: Sequence[ModuleKey]) -> dict[ModuleKey, Module]: ...  # unknown absent
    async def for_device(self, device_id: str) -> list[Module]: ...  # its modules by module id
    async def scan(self, *, after: ModuleKey | None, limit: int) -> list[Module]: ...  # by (device, module)
    # NotFound (DeviceNotFound) without the device, Conflict if it exists, QuotaExceeded (403)
    # when the device already has `max_per_device` modules.
    async def insert(self, module: Module, *, max_per_device: int) -> None: ...
    async def replace(self, module: Module, expected_etag: str | None) -> None: ...  # NotFound / 412
    async def delete(self, device_id: str, module_id: str, expected_etag: str | None) -> None: ...


class PolicyRepository(Protocol):
    async def list(self) -> list[PolicyRecord]: ...
    async def get(self, name: str) -> PolicyRecord | None: ...
    async def upsert(self, policy: PolicyRecord) -> None: ...
    async def delete(self, name: str) -> bool: ...


class AuditRepository(Protocol):
    async def append(self, records: Sequence[AuditRecord]) -> None: ...
    async def query(
        self,
        *,
        limit: int = 100,
        since: datetime | None = None,
        outcome: str | None = None,
        action_prefix: str | None = None,
        principal: str | None = None,
    ) -> list[AuditRecord]: ...

    # retention (tether.security.audit_retention): read oldest first, deleted by id once exported
    async def first_beyond(self, keep: int) -> int | None: ...
    async def expired(self, *, before: datetime | None, through_id: int | None, limit: int
                      ) -> list[AuditRecord]: ...
    async def delete(self, ids: Sequence[int]) -> int: ...


class Storage(Protocol):
    """Aggregate of repositories over one backend; later issues add twins, c2d, checkpoints, CAs."""

    devices: DeviceRepository
    policies: PolicyRepository
    audit: AuditRepository

    async def start(self) -> None: ...  # connect + run Alembic migrations to head
    async def close(self) -> None: ...
