"""Read-through cache of device identities for `RegistryService.find` (the authentication path).

Every MQTT CONNECT and every device HTTP call authenticates against the registry; reading the device
from SQL each time cost ~1.5 ms of hub CPU per connect. This module keeps the stored documents in a
bounded LRU instead:

- `DeviceCache`: found devices (LRU, `max_entries`) and unknown ids (a separate, smaller LRU, so a
  flood of made-up ids cannot evict real devices), each entry valid for a TTL measured on an
  injectable monotonic clock. Writes made by other processes sharing the database (other hub nodes,
  the CLI) are therefore seen after at most `ttl_s` (unknown ids: `negative_ttl_s`).
- `InvalidatingRepository`: wraps the registry's repository so that EVERY write the registry makes
  drops the ids it touched as soon as the write returns or fails (a failed write's outcome may be
  unknown), without each write path having to remember it. Activity (connection state, last
  activity) does not invalidate: the written values are patched into the cached copies instead.
- Loads that overlap an invalidation are not stored (an epoch counter): a read that started before a
  write committed can never put the old version back after the write dropped it.
- Disabled devices are never cached: the cache only speeds up accepting enabled devices, and a device
  re-enabled on another node (which relays only disables and deletes) can connect here at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from tether.registry.models import Device, DeviceStatus, Module, RegistryStatistics
from tether.storage.base import ActivityUpdate, DeviceRepository

DEFAULT_TTL_S = 2.0
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_NEGATIVE_TTL_S = 1.0
DEFAULT_MAX_NEGATIVE = 10_000

Clock = Callable[[], float]
Identity = TypeVar("Identity", Device, Module)


def with_activity(device: Identity, update: ActivityUpdate) -> Identity:
    """`device` (or module) as it reads once `update` is written (same rules as `apply_activity`)."""
    fields: dict[str, Any] = {"last_activity_time": max(update.at, device.last_activity_time)}
    if update.connection_state is not None and update.connection_state != device.connection_state:
        fields["connection_state"] = update.connection_state
        fields["connection_state_updated_time"] = update.at
    return device.model_copy(update=fields)


def merge_activity(older: ActivityUpdate | None, newer: ActivityUpdate | None) -> ActivityUpdate:
    """Coalesce two pending activity updates of one device (`newer` wins where it says something)."""
    if older is None:
        assert newer is not None
        return newer
    if newer is None:
        return older
    state = newer.connection_state if newer.connection_state is not None else older.connection_state
    return ActivityUpdate(newer.device_id, state, max(older.at, newer.at), newer.module_id)


class DeviceCache:
    """Bounded TTL cache of stored devices (and of unknown ids). `ttl_s <= 0` disables it."""

    def __init__(
        self,
        *,
        ttl_s: float,
        clock: Clock,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        negative_ttl_s: float = DEFAULT_NEGATIVE_TTL_S,
        max_negative: int = DEFAULT_MAX_NEGATIVE,
    ) -> None:
        self.enabled = ttl_s > 0 and max_entries > 0
        self._ttl_s = ttl_s
        self._negative_ttl_s = min(negative_ttl_s, ttl_s)
        self._max_entries = max_entries
        self._max_negative = max_negative
        self._clock = clock
        self._found: OrderedDict[str, tuple[Device, float]] = OrderedDict()  # id -> (device, expires)
        self._missing: OrderedDict[str, float] = OrderedDict()  # id -> expires
        self._epoch = 0  # bumped by every invalidation; loads overlapping one are not stored
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._found) + len(self._missing)

    def lookup(self, device_id: str) -> tuple[bool, Device | None]:
        """(hit, device): (True, None) is a cached "no such device"; (False, None) a miss."""
        now = self._clock()
        entry = self._found.get(device_id)
        if entry is not None:
            if now < entry[1]:
                self._found.move_to_end(device_id)
                self.hits += 1
                return True, entry[0]
            del self._found[device_id]
        expires = self._missing.get(device_id)
        if expires is not None:
            if now < expires:
                self.hits += 1
                return True, None
            del self._missing[device_id]
        self.misses += 1
        return False, None

    def token(self) -> int:
        """Taken before a load; `store` ignores the result if anything was invalidated since."""
        return self._epoch

    def store(self, device_id: str, device: Device | None, token: int) -> None:
        if not self.enabled or token != self._epoch:
            return
        now = self._clock()
        if device is None:
            self._found.pop(device_id, None)
            if self._negative_ttl_s > 0 and self._max_negative > 0:
                self._missing[device_id] = now + self._negative_ttl_s
                self._missing.move_to_end(device_id)
                while len(self._missing) > self._max_negative:
                    self._missing.popitem(last=False)
            return
        self._missing.pop(device_id, None)
        if device.status is not DeviceStatus.enabled:  # re-read on every lookup (see module doc)
            self._found.pop(device_id, None)
            return
        self._found[device_id] = (device, now + self._ttl_s)
        self._found.move_to_end(device_id)
        while len(self._found) > self._max_entries:
            self._found.popitem(last=False)

    def invalidate(self, device_ids: Iterable[str] | None) -> None:
        """Drop these ids (None: everything)."""
        self._epoch += 1
        if device_ids is None:
            self._found.clear()
            self._missing.clear()
            return
        for device_id in device_ids:
            self._found.pop(device_id, None)
            self._missing.pop(device_id, None)

    def patch_activity(self, updates: Sequence[ActivityUpdate]) -> None:
        """Activity was just written: show it in the cached copies (their expiry is unchanged), so
        connection state does not go back in time once the registry's pending overlay is flushed."""
        self._epoch += 1  # a load that read the rows before this write must not be stored
        for update in updates:
            if update.module_id is not None:  # modules are not in this cache
                continue
            entry = self._found.get(update.device_id)
            if entry is not None:
                self._found[update.device_id] = (with_activity(entry[0], update), entry[1])


class InvalidatingRepository:
    """A `DeviceRepository` whose writes invalidate `cache` for the ids they touch (reads pass through
    uncached: callers decide what to cache)."""

    def __init__(self, repo: DeviceRepository, cache: DeviceCache) -> None:
        self.inner = repo
        self._cache = cache
        # Called with the ids of every write made here (not for invalidations from elsewhere), so the
        # cluster bus can tell other nodes to forget their cached copies.
        self.write_listeners: list[Callable[[list[str]], None]] = []

    def _written(self, ids: Iterable[str]) -> None:
        written = list(ids)
        self._cache.invalidate(written)
        for listener in self.write_listeners:
            listener(written)

    async def get(self, device_id: str) -> Device | None:
        return await self.inner.get(device_id)

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, Device]:
        return await self.inner.get_many(device_ids)

    async def insert(self, device: Device) -> None:
        try:
            await self.inner.insert(device)
        finally:
            self._written([device.device_id])

    async def insert_many(self, devices: Sequence[Device]) -> None:
        try:
            await self.inner.insert_many(devices)
        finally:
            self._written(d.device_id for d in devices)

    async def replace(self, device: Device, expected_etag: str | None) -> None:
        try:
            await self.inner.replace(device, expected_etag)
        finally:
            self._written([device.device_id])

    async def delete(self, device_id: str, expected_etag: str | None) -> None:
        try:
            await self.inner.delete(device_id, expected_etag)
        finally:
            self._written([device_id])

    async def apply_batch(
        self,
        inserts: Sequence[Device],
        replaces: Sequence[tuple[Device, str | None]],
        deletes: Sequence[tuple[str, str | None]],
    ) -> None:
        try:
            await self.inner.apply_batch(inserts, replaces, deletes)
        finally:
            ids = [*(d.device_id for d in inserts), *(d.device_id for d, _ in replaces)]
            self._written([*ids, *(device_id for device_id, _ in deletes)])

    async def list(self, *, top: int, after: str | None = None) -> list[Device]:
        return await self.inner.list(top=top, after=after)

    def iter_all(self) -> AsyncIterator[Device]:
        return self.inner.iter_all()

    async def statistics(self) -> RegistryStatistics:
        return await self.inner.statistics()

    async def reset_connection_states(self, at: datetime) -> int:
        reset = await self.inner.reset_connection_states(at)
        self._cache.invalidate(None)
        return reset

    async def apply_activity(self, updates: Sequence[ActivityUpdate]) -> None:
        await self.inner.apply_activity(updates)
        self._cache.patch_activity(updates)


__all__ = ["DEFAULT_MAX_ENTRIES", "DEFAULT_NEGATIVE_TTL_S", "DEFAULT_TTL_S", "DeviceCache",
           "InvalidatingRepository", "merge_activity", "with_activity"]
