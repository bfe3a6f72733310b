"""`SqlDeviceRepository.apply_batch` on real SQLite and PostgreSQL: inserts, etag-guarded replaces and
deletes in one transaction. Any failure writes nothing, and a device the batch would have deleted
keeps its twin and C2D rows (they cascade on delete, so a compensating re-insert could not restore
them)."""

from __future__ import annotations

import pytest

from tether.errors import Conflict, NotFound, PreconditionFailed, TetherError
from tether.registry.models import Device
from tether.storage.sql import SqlStorage
from tether.storage.sql.c2d import NewC2DMessage, SqlC2DRepository
from tether.storage.sql.twins import TwinRecord

NOW_MS = 1_900_000_000_000


def dev(device_id: str, etag: str = "e1", **extra: object) -> Device:
    return Device.model_validate({"deviceId": device_id, "etag": etag, **extra})


def twin(device_id: str) -> TwinRecord:
    return TwinRecord(device_id, "t1", 2, {"site": "x"}, {}, {}, 1, 1, {"desired": {}, "reported": {}})


def c2d(storage: SqlStorage) -> SqlC2DRepository:
    return SqlC2DRepository(storage.db, lambda _ack, _status: False)


async def seed(storage: SqlStorage) -> None:
    """`keep` (to update), `gone` (to delete; has a twin and a queued C2D message), `last` (guarded)."""
    await storage.devices.insert_many([dev("keep"), dev("gone"), dev("last")])
    assert await storage.twins.insert(twin("gone"))
    queued = await c2d(storage).enqueue(
        NewC2DMessage("gone", "m1", b"hi"), now_ms=NOW_MS, expiry_ms=NOW_MS + 3_600_000, max_depth=50
    )
    assert queued is not None and not isinstance(queued, int)


async def assert_untouched(storage: SqlStorage) -> None:
    """Nothing of the failed batch is visible: no new device, the old ones as seeded, with their rows."""
    assert await storage.devices.get("new-1") is None and await storage.devices.get("new-2") is None
    for device_id in ("keep", "gone", "last"):
        loaded = await storage.devices.get(device_id)
        assert loaded is not None and (loaded.etag, loaded.status_reason) == ("e1", None), device_id
    assert await storage.twins.get("gone") == twin("gone")
    assert [m.message_id for m in await c2d(storage).peek("gone")] == ["m1"]
    assert (await storage.devices.statistics()).total_device_count == 3


async def test_mixed_batch_applies_everything(storage: SqlStorage) -> None:
    await seed(storage)
    await storage.devices.apply_batch(
        [dev("new-1", etag="n1"), dev("new-2", etag="n2")],
        [(dev("keep", etag="e2", statusReason="bulk"), "e1"), (dev("last", etag="e2"), None)],
        [("gone", "e1")],
    )
    new1, keep, last = [await storage.devices.get(i) for i in ("new-1", "keep", "last")]
    assert new1 is not None and new1.etag == "n1"
    assert keep is not None and (keep.etag, keep.status_reason) == ("e2", "bulk")
    assert last is not None and last.etag == "e2"
    assert await storage.devices.get("gone") is None
    # The delete cascaded within the batch, as a single delete does.
    assert await storage.twins.get("gone") is None and await c2d(storage).peek("gone") == []
    assert (await storage.devices.statistics()).total_device_count == 4


@pytest.mark.parametrize(
    ("replaces", "deletes", "error"),
    [
        # A stale etag on the last guarded entry, after the update and delete before it succeeded.
        ([(dev("keep", etag="e2", statusReason="bulk"), "e1")], [("gone", "e1"), ("last", "stale")],
         PreconditionFailed),
        ([(dev("keep", etag="e2"), "e1"), (dev("last", etag="e2"), "stale")], [("gone", "e1")],
         PreconditionFailed),
        ([(dev("keep", etag="e2"), "e1")], [("gone", "e1"), ("missing", None)], NotFound),
        ([(dev("keep", etag="e2"), "e1"), (dev("ghost", etag="e2"), "e1")], [("gone", None)], NotFound),
    ],
    ids=["stale-delete", "stale-replace", "missing-delete", "missing-replace"],
)
async def test_a_failing_guarded_write_rolls_back_the_whole_batch(
    storage: SqlStorage,
    replaces: list[tuple[Device, str | None]],
    deletes: list[tuple[str, str | None]],
    error: type[TetherError],
) -> None:
    await seed(storage)
    with pytest.raises(error):
        await storage.devices.apply_batch([dev("new-1"), dev("new-2")], replaces, deletes)
    await assert_untouched(storage)


async def test_an_existing_id_among_the_inserts_rolls_back_the_whole_batch(storage: SqlStorage) -> None:
    """The duplicate is the last insert, so every guarded write and earlier insert had already run."""
    await seed(storage)
    await storage.devices.insert(dev("taken", etag="t1"))
    with pytest.raises(Conflict) as info:
        await storage.devices.apply_batch(
            [dev("new-1"), dev("new-2"), dev("taken", etag="t2")],
            [(dev("keep", etag="e2", statusReason="bulk"), "e1"), (dev("last", etag="e2"), "e1")],
            [("gone", "e1")],
        )
    assert info.value.code == "DeviceAlreadyExists" and "taken" in info.value.message
    taken = await storage.devices.get("taken")
    assert taken is not None and taken.etag == "t1"
    await storage.devices.delete("taken", "t1")
    await assert_untouched(storage)


@pytest.mark.parametrize(
    ("inserts", "replaces", "deletes"),
    [
        ([dev("new-1"), dev("new-1")], [], []),
        ([dev("new-1")], [], [("new-1", None)]),
        ([], [(dev("keep", etag="e2"), "e1")], [("keep", "e1")]),
    ],
    ids=["insert-twice", "insert-and-delete", "replace-and-delete"],
)
async def test_an_id_repeated_in_the_batch_is_refused_before_writing(
    storage: SqlStorage,
    inserts: list[Device],
    replaces: list[tuple[Device, str | None]],
    deletes: list[tuple[str, str | None]],
) -> None:
    await seed(storage)
    with pytest.raises(Conflict):
        await storage.devices.apply_batch(inserts, replaces, deletes)
    await assert_untouched(storage)


async def test_empty_batch_is_a_no_op(storage: SqlStorage) -> None:
    await storage.devices.apply_batch([], [], [])
    assert (await storage.devices.statistics()).total_device_count == 0
