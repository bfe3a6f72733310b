"""Connection state and last activity of identities (devices and modules), coalesced in memory and
written in batches, without changing an etag (as in Azure).

Every device (and module) message would otherwise be a registry write; `ActivityBuffer.touch` keeps
the latest state per identity instead, and `flush()` (the hub runs it every few seconds, and at once
when `MAX_PENDING_ACTIVITY` identities are waiting) writes them all in one repository transaction.
Reads overlay what is still pending (`overlay`), so the REST API is as fresh as the hub's own view.
"""

from __future__ import annotations

import asyncio

from tether.registry import cache as dcache
from tether.registry.cache import Identity
from tether.registry.models import ConnectionState, utcnow
from tether.storage.base import ActivityUpdate, DeviceRepository

__all__ = ["MAX_PENDING_ACTIVITY", "ActivityBuffer"]

MAX_PENDING_ACTIVITY = 10_000  # flush early rather than let the buffer grow without bound
Key = tuple[str, str | None]  # (device id, module id)


class ActivityBuffer:
    """Pending activity per identity, written through `repo.apply_activity` in order."""

    def __init__(self, repo: DeviceRepository) -> None:
        self._repo = repo
        self._pending: dict[Key, ActivityUpdate] = {}
        self._flush_lock = asyncio.Lock()  # batches are written in order

    def __len__(self) -> int:
        return len(self._pending)

    async def touch(self, device_id: str, module_id: str | None = None, *,
                    connected: bool | None = None) -> None:
        state = None if connected is None else (
            ConnectionState.connected if connected else ConnectionState.disconnected
        )
        key = (device_id, module_id)
        update = ActivityUpdate(device_id, state, utcnow(), module_id)
        self._pending[key] = dcache.merge_activity(self._pending.get(key), update)
        if len(self._pending) >= MAX_PENDING_ACTIVITY:
            await self.flush()

    async def flush(self) -> None:
        async with self._flush_lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            try:
                await self._repo.apply_activity(list(batch.values()))
            except BaseException:
                for key, older in batch.items():  # kept for the next flush; newer entries win
                    self._pending[key] = dcache.merge_activity(older, self._pending.get(key))
                raise

    def forget(self, device_id: str, module_id: str | None = None) -> None:
        """Drop what is pending for a deleted identity (a device: its modules' too)."""
        if module_id is not None:
            self._pending.pop((device_id, module_id), None)
            return
        for key in [key for key in self._pending if key[0] == device_id]:
            del self._pending[key]

    def overlay(self, identity: Identity) -> Identity:
        """`identity` (a `Device` or `Module`) as it reads once its pending activity is written."""
        update = self._pending.get((identity.device_id, identity.module_id))
        return identity if update is None else dcache.with_activity(identity, update)
