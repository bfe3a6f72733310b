"""The one seam between CLI commands and a hub: local services on the data dir, or REST on a running hub.

Which backend serves a command is decided in one place, `cli.factory.choose_backend`; the backends
(`local`, `remote`, `running`) know nothing of the command layer (`cli.context`).

Commands only use this protocol, so each works in both modes. Devices come back as `Device`, policies
as `PolicyRecord`, audit entries as `AuditRecord` — the same types the services use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Protocol

from tether.registry.models import Device
from tether.storage.base import AuditRecord, PolicyRecord

__all__ = ["LOCAL_ACTOR", "Backend"]

LOCAL_ACTOR = "cli:local"  # the audit actor of changes made on the data dir directly


class Backend(Protocol):
    mode: str  # "local" | "remote"

    @property
    def hostname(self) -> str:
        """The hub host name devices use (token scope, connection strings)."""
        ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # devices
    async def create_device(self, device_id: str, body: dict[str, Any]) -> Device: ...
    async def get_device(self, device_id: str) -> Device: ...
    async def list_devices(self, top: int) -> list[Device]: ...
    async def replace_device(self, device_id: str, body: dict[str, Any], etag: str | None) -> Device: ...
    async def delete_device(self, device_id: str, etag: str | None) -> None: ...
    async def set_status(self, device_id: str, enabled: bool, reason: str | None) -> Device: ...
    async def regenerate_device_key(self, device_id: str, which: str) -> Device: ...
    async def import_devices(self, records: Sequence[dict[str, Any]]) -> int: ...
    def export_devices(self) -> AsyncIterator[Device]: ...

    # shared access policies
    async def list_policies(self, *, keys: bool = False) -> list[PolicyRecord]:
        """Policies; without `keys` a remote hub leaves the key fields empty."""
        ...

    async def get_policy(self, name: str) -> PolicyRecord:
        """One policy with its keys (needed for tokens and connection strings)."""
        ...

    async def create_policy(self, name: str, rights: Sequence[str]) -> PolicyRecord: ...
    async def delete_policy(self, name: str) -> None: ...
    async def regenerate_policy_key(self, name: str, which: str) -> PolicyRecord: ...

    # audit
    async def audit(
        self,
        *,
        limit: int,
        since: datetime | None,
        outcome: str | None,
        action_prefix: str | None,
        principal: str | None,
    ) -> list[AuditRecord]: ...
