"""Leadership for background work that must run once per cluster (jobs, the configuration sweep).

One row per role in the `leases` table (PostgreSQL in a cluster, SQLite for one node): the holder
renews it every third of its lifetime; when the holder stops (crash, `kill -9`, network loss) the
lease runs out and the next node to ask takes it. A node that fails to renew in time stops
leading at once (`leading` turns False and `lost` fires), so two nodes never both believe they lead
for longer than the clock skew between them. Work done under a lease must stay safe to repeat
(every job step is guarded in SQL), since a leader can stop between doing and recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from tether.storage.sql.jobs import SqlLeaseRepository

__all__ = ["Leadership"]

log = logging.getLogger("tether.lease")


class Leadership:
    def __init__(self, leases: SqlLeaseRepository, name: str, holder: str, *, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._leases = leases
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self._clock = clock
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    @property
    def leading(self) -> bool:
        return self._clock() < self._valid_until

    async def try_acquire(self) -> bool:
        now = self._clock()
        try:
            ok = await self._leases.acquire(self.name, self.holder, now_ms=int(now * 1000),
                                            ttl_ms=int(self.ttl_s * 1000))
        except Exception:
            log.exception("lease %s: renewal failed", self.name)
            ok = False
        was = self.leading
        # Stop a little before the stored expiry so a successor never overlaps us.
        self._valid_until = now + self.ttl_s * 0.8 if ok else 0.0
        if ok != was:
            log.info("lease %s: %s", self.name, "leading" if ok else "not leading")
            self.changed.set()
            self.changed = asyncio.Event()
        return ok

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lease-{self.name}")

    async def _run(self) -> None:
        while True:
            await self.try_acquire()
            await asyncio.sleep(self.ttl_s / 3)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.leading:
            self._valid_until = 0.0
            with contextlib.suppress(Exception):
                await self._leases.release(self.name, self.holder)
