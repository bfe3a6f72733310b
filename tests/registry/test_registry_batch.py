"""Concurrent authentication lookups share one query (`tether.registry.batch`), on real storage."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tether.registry.batch import CoalescingLoader
from tether.registry.models import Device
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.devices import SqlDeviceRepository
from tether.storage.sql.engine import Database

ACTOR = "policy:iothubowner"


class CountingRepository(SqlDeviceRepository):
    """The real repository, recording each `get_many` call; `hold` pauses the next one."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.calls: list[list[str]] = []
        self.hold: asyncio.Event | None = None
        self.fail_next = False

    async def get_many(self, device_ids: Sequence[str]) -> dict[str, Device]:
        self.calls.append(list(device_ids))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("database went away")
        found = await super().get_many(device_ids)
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
        return found


@pytest.fixture
def repo(storage: SqlStorage) -> CountingRepository:
    return CountingRepository(storage.db)


async def _create(registry: RegistryService, count: int) -> list[str]:
    ids = [f"storm-{i}" for i in range(count)]
    for device_id in ids:
        await registry.create(device_id, {}, actor=ACTOR)
    return ids


async def test_a_storm_of_distinct_devices_is_read_in_one_query(
    repo: CountingRepository, audit: AuditLog
) -> None:
    registry = RegistryService(repo, audit)
    ids = await _create(registry, 40)
    registry.invalidate()  # every find() below misses the cache
    found = await asyncio.gather(*(registry.find(i) for i in [*ids, "nobody", ids[0]]))
    assert [d.device_id if d else None for d in found] == [*ids, None, ids[0]]
    assert len(repo.calls) == 1 and sorted(repo.calls[0]) == sorted([*ids, "nobody"])


async def test_a_lookup_never_joins_a_query_already_running(
    repo: CountingRepository, audit: AuditLog
) -> None:
    registry = RegistryService(repo, audit)
    await _create(registry, 2)
    registry.invalidate()
    repo.hold = hold = asyncio.Event()
    first = asyncio.create_task(registry.find("storm-0"))
    while not repo.calls:
        await asyncio.sleep(0.001)
    await registry.set_status("storm-1", False, actor=ACTOR)  # REST path: not held up by the batch
    second = asyncio.create_task(registry.find("storm-1"))
    await asyncio.sleep(0.05)
    assert not second.done()  # waits for the next query: the running one started before it asked
    hold.set()
    assert (await first) is not None
    late = await second
    assert late is not None and not late.enabled
    assert repo.calls == [["storm-0"], ["storm-1"]]


async def test_a_failed_query_fails_its_batch_only(repo: CountingRepository, audit: AuditLog) -> None:
    registry = RegistryService(repo, audit)
    await _create(registry, 3)
    registry.invalidate()
    repo.fail_next = True
    results = await asyncio.gather(registry.find("storm-0"), registry.find("storm-1"), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    again = await registry.find("storm-2")
    assert again is not None and again.device_id == "storm-2"


async def test_a_cancelled_caller_leaves_the_others_their_answer(
    storage: SqlStorage, audit: AuditLog
) -> None:
    repo = CountingRepository(storage.db)
    registry = RegistryService(repo, audit)
    await _create(registry, 1)
    loader = CoalescingLoader(repo.get_many)
    repo.hold = hold = asyncio.Event()
    quitter = asyncio.create_task(loader.load("storm-0"))
    stayer = asyncio.create_task(loader.load("storm-0"))
    while not repo.calls:
        await asyncio.sleep(0.001)
    quitter.cancel()
    hold.set()
    device = await stayer
    assert device is not None and device.device_id == "storm-0"
    assert quitter.cancelled() and loader.queries == 1


async def test_batches_are_capped(storage: SqlStorage, audit: AuditLog) -> None:
    repo = CountingRepository(storage.db)
    registry = RegistryService(repo, audit)
    ids = await _create(registry, 7)
    loader = CoalescingLoader(repo.get_many, max_batch=3)
    found = await asyncio.gather(*(loader.load(i) for i in ids))
    assert [d.device_id for d in found if d] == ids
    assert [len(c) for c in repo.calls] == [3, 3, 1]
