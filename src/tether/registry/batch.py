"""Coalesces concurrent point lookups of devices into one `get_many` query.

A connect storm of distinct devices misses the identity cache on every CONNECT; one SQL round trip
each (transaction, statement, thread hop to the driver) cost ~1.5 ms of hub CPU per connect. Here the
lookups that arrive while a query runs wait for the next one, which reads all of them at once
(`WHERE device_id IN (...)`), so the per-round-trip cost is shared by every connect of the batch.

Freshness is that of a plain read: a lookup never joins a query that has already started, so its
answer was read after the lookup was asked (REST reads rely on that to see their own writes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from tether.registry.models import Device

LoadMany = Callable[[Sequence[str]], Awaitable[dict[str, Device]]]
_Waiters = dict[str, list[asyncio.Future[Device | None]]]  # device id -> the lookups waiting for it
DEFAULT_MAX_BATCH = 500


class CoalescingLoader:
    """`load(id)` → the stored device or None; at most one `load_many` call runs at a time."""

    def __init__(self, load_many: LoadMany, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self._load_many = load_many
        self._max_batch = max_batch
        self._waiting: _Waiters = {}
        self._running: asyncio.Task[None] | None = None
        self.queries = 0  # load_many calls made (tests read it)

    async def load(self, device_id: str) -> Device | None:
        future: asyncio.Future[Device | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(device_id, []).append(future)
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Query batch after batch until nobody waits (lookups arriving meanwhile form the next one)."""
        try:
            while self._waiting:
                batch = self._take_batch()
                ids = [device_id for device_id, futures in batch.items() if _wanted(futures)]
                if not ids:
                    continue
                self.queries += 1
                try:
                    found = await self._load_many(ids)
                except asyncio.CancelledError:
                    _cancel(batch)
                    raise
                except Exception as exc:  # every waiter of this batch gets the error
                    _settle(batch, None, exc)
                    continue
                _settle(batch, found, None)
        except asyncio.CancelledError:  # shutting down: nobody will answer the others either
            waiting, self._waiting = self._waiting, {}
            _cancel(waiting)
            raise
        finally:
            self._running = None

    def _take_batch(self) -> _Waiters:
        if len(self._waiting) <= self._max_batch:
            batch, self._waiting = self._waiting, {}
            return batch
        ids = list(self._waiting)[: self._max_batch]
        return {device_id: self._waiting.pop(device_id) for device_id in ids}


def _wanted(futures: list[asyncio.Future[Device | None]]) -> bool:
    return any(not f.done() for f in futures)


def _cancel(batch: _Waiters) -> None:
    for futures in batch.values():
        for future in futures:
            future.cancel()


def _settle(
    batch: _Waiters,
    found: dict[str, Device] | None,
    error: BaseException | None,
) -> None:
    for device_id, futures in batch.items():
        for future in futures:
            if future.done():  # the caller was cancelled
                continue
            if error is not None:
                future.set_exception(error)
            else:
                assert found is not None
                future.set_result(found.get(device_id))
