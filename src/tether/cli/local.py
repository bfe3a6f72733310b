"""Local mode: the CLI opens the data dir's storage itself and calls the same services the hub uses.

Changes go through `RegistryService`/`PolicyService`, so they are validated and audited exactly like
REST calls, with the actor "cli:local".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tether.cli.context import LOCAL_ACTOR
from tether.config import ConfigError, Settings
from tether.registry.models import Device, Module
from tether.storage.base import AuditRecord, PolicyRecord

if TYPE_CHECKING:
    from tether.registry.modules import ModuleService
    from tether.registry.service import RegistryService
    from tether.security.audit import AuditLog
    from tether.security.policies import PolicyService
    from tether.storage.sql import SqlStorage


class LocalServices:
    """Storage plus the audit, policy and registry services over it (no listeners)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._storage: SqlStorage | None = None
        self._audit: AuditLog | None = None
        self._policies: PolicyService | None = None
        self._registry: RegistryService | None = None
        self._modules: ModuleService | None = None

    def check_data_dir(self) -> None:
        """Embedded storage needs the data dir; say how to create it instead of a SQLite error."""
        if self.settings.storage.database_url is None and not self.settings.data_dir.is_dir():
            raise ConfigError(
                f"invalid setting hub.data_dir: {self.settings.data_dir} does not exist; "
                "run `tether init` (or pass --data-dir / --hub-url)"
            )

    async def open(self, *, ensure_defaults: bool = True) -> None:
        from tether.registry.modules import ModuleService
        from tether.registry.service import RegistryService
        from tether.security.audit import AuditLog
        from tether.security.policies import PolicyService
        from tether.storage.factory import open_storage

        storage = open_storage(self.settings)
        await storage.start()
        self._storage = storage
        self._audit = AuditLog(storage.audit)
        self._policies = PolicyService(storage.policies, self._audit)
        self._registry = RegistryService(storage.devices, self._audit)
        self._modules = ModuleService(storage.modules, self._registry, self._audit)
        if ensure_defaults:
            await self._policies.ensure_defaults()

    async def close(self) -> None:
        if self._registry is not None:
            await self._registry.flush_activity()
        if self._audit is not None:
            await self._audit.close()
        if self._storage is not None:
            await self._storage.close()
        self._storage = self._audit = self._policies = self._registry = None
        self._modules = None

    @property
    def storage(self) -> SqlStorage:
        assert self._storage is not None, "services not open"
        return self._storage

    @property
    def audit(self) -> AuditLog:
        assert self._audit is not None, "services not open"
        return self._audit

    @property
    def policies(self) -> PolicyService:
        assert self._policies is not None, "services not open"
        return self._policies

    @property
    def registry(self) -> RegistryService:
        assert self._registry is not None, "services not open"
        return self._registry

    @property
    def modules(self) -> ModuleService:
        assert self._modules is not None, "services not open"
        return self._modules


class LocalBackend:
    """`Backend` over `LocalServices`."""

    mode = "local"

    def __init__(self, settings: Settings, *, ensure_defaults: bool = True) -> None:
        self.settings = settings
        self.services = LocalServices(settings)
        self._ensure_defaults = ensure_defaults  # off when only reading beside a running hub

    @property
    def hostname(self) -> str:
        return self.settings.hub.hostname

    async def open(self) -> None:
        self.services.check_data_dir()
        await self.services.open(ensure_defaults=self._ensure_defaults)

    async def close(self) -> None:
        await self.services.close()

    # devices ---------------------------------------------------------------------------------
    async def create_device(self, device_id: str, body: dict[str, Any]) -> Device:
        return await self.services.registry.create(device_id, body, actor=LOCAL_ACTOR)

    async def get_device(self, device_id: str) -> Device:
        return await self.services.registry.get(device_id)

    async def list_devices(self, top: int) -> list[Device]:
        return await self.services.registry.list(top=top)

    async def replace_device(self, device_id: str, body: dict[str, Any], etag: str | None) -> Device:
        return await self.services.registry.replace(
            device_id, body, if_match=etag or "*", actor=LOCAL_ACTOR
        )

    async def delete_device(self, device_id: str, etag: str | None) -> None:
        await self.services.registry.delete(device_id, if_match=etag or "*", actor=LOCAL_ACTOR)

    async def set_status(self, device_id: str, enabled: bool, reason: str | None) -> Device:
        return await self.services.registry.set_status(
            device_id, enabled, reason=reason, actor=LOCAL_ACTOR
        )

    async def regenerate_device_key(self, device_id: str, which: str) -> Device:
        return await self.services.registry.regenerate_key(device_id, which, actor=LOCAL_ACTOR)

    async def import_devices(self, records: Sequence[dict[str, Any]]) -> int:
        return await self.services.registry.import_devices(records, actor=LOCAL_ACTOR)

    async def export_devices(self) -> AsyncIterator[Device]:
        async for device in self.services.registry.export_devices():
            yield device

    # modules ---------------------------------------------------------------------------------
    async def create_module(self, device_id: str, module_id: str, body: dict[str, Any]) -> Module:
        return await self.services.modules.create(device_id, module_id, body, actor=LOCAL_ACTOR)

    async def get_module(self, device_id: str, module_id: str) -> Module:
        return await self.services.modules.get(device_id, module_id)

    async def list_modules(self, device_id: str) -> list[Module]:
        return await self.services.modules.list(device_id)

    async def replace_module(self, device_id: str, module_id: str, body: dict[str, Any],
                             etag: str | None) -> Module:
        return await self.services.modules.replace(device_id, module_id, body, if_match=etag or "*",
                                                   actor=LOCAL_ACTOR)

    async def delete_module(self, device_id: str, module_id: str, etag: str | None) -> None:
        await self.services.modules.delete(device_id, module_id, if_match=etag or "*", actor=LOCAL_ACTOR)

    async def regenerate_module_key(self, device_id: str, module_id: str, which: str) -> Module:
        return await self.services.modules.regenerate_key(device_id, module_id, which, actor=LOCAL_ACTOR)

    # policies --------------------------------------------------------------------------------
    async def list_policies(self, *, keys: bool = False) -> list[PolicyRecord]:
        return await self.services.policies.list()

    async def get_policy(self, name: str) -> PolicyRecord:
        return await self.services.policies.get(name)

    async def create_policy(self, name: str, rights: Sequence[str]) -> PolicyRecord:
        return await self.services.policies.create(name, rights, actor=LOCAL_ACTOR)

    async def delete_policy(self, name: str) -> None:
        await self.services.policies.delete(name, actor=LOCAL_ACTOR)

    async def regenerate_policy_key(self, name: str, which: str) -> PolicyRecord:
        return await self.services.policies.regenerate_key(name, which, actor=LOCAL_ACTOR)

    # audit -----------------------------------------------------------------------------------
    async def audit(
        self,
        *,
        limit: int,
        since: datetime | None,
        outcome: str | None,
        action_prefix: str | None,
        principal: str | None,
    ) -> list[AuditRecord]:
        await self.services.audit.flush()
        return await self.services.audit.query(
            limit=limit, since=since, outcome=outcome, action_prefix=action_prefix, principal=principal
        )
