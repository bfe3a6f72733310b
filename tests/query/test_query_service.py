"""QueryService over real twins on SQLite and PostgreSQL: filters, aggregates and paging."""

from __future__ import annotations

from typing import Any

import pytest
from hub_app_helpers import device_body

from tether.errors import BadRequest
from tether.messaging.jobs import JobService
from tether.messaging.query import QueryService
from tether.messaging.twins import TwinService
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.jobs import SqlJobRepository

ACTOR = "policy:test"


async def fleet(registry: RegistryService, twins: TwinService, count: int, *, tag_every: int = 3) -> None:
    """`count` devices dev000…; every `tag_every`-th gets tags and a reported z = its index % 7."""
    await registry.import_devices([device_body(f"dev{i:03d}") for i in range(count)], actor=ACTOR)
    for i in range(0, count, tag_every):
        await twins.patch(
            f"dev{i:03d}",
            {"tags": {"site": "north" if i % 2 else "south", "i": i}},
            if_match=None,
            actor=ACTOR,
        )
        await twins.update_reported(f"dev{i:03d}", {"z": i % 7})


async def all_pages(queries: QueryService, text: str, page: int) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    pages = 0
    while True:
        result = await queries.run(text, max_items=page, continuation=token)
        pages += 1
        assert len(result.items) <= page
        items.extend(result.items)
        token = result.continuation
        if token is None:
            return items, pages


async def test_where_on_tags_and_reported(
    queries: QueryService, registry: RegistryService, twins: TwinService
) -> None:
    await fleet(registry, twins, 30)
    page = await queries.run("SELECT * FROM devices WHERE tags.site = 'south' AND properties.reported.z > 3")
    expected = [f"dev{i:03d}" for i in range(0, 30, 3) if i % 2 == 0 and i % 7 > 3]
    assert [t["deviceId"] for t in page.items] == expected and page.item_type == "twin"
    assert page.continuation is None
    assert all(t["properties"]["reported"]["$version"] == 2 for t in page.items)


async def test_count_group_by_and_projection(
    queries: QueryService, registry: RegistryService, twins: TwinService
) -> None:
    await fleet(registry, twins, 30)
    count = await queries.run("SELECT COUNT() AS n FROM devices WHERE IS_DEFINED(tags.site)")
    assert count.items == [{"n": 10}] and count.item_type == "raw"
    total = await queries.run("select count() as n from devices")
    assert total.items == [{"n": 30}]
    groups = await queries.run("SELECT tags.site, COUNT() AS n FROM devices GROUP BY tags.site")
    assert sorted(groups.items, key=lambda r: r.get("site", "")) == [
        {"n": 20},
        {"site": "north", "n": 5},
        {"site": "south", "n": 5},
    ]
    rows = await queries.run(
        "SELECT deviceId, tags.i FROM devices WHERE tags.i IN [3, 6, 7] OR deviceId = 'dev001'"
    )
    assert rows.items == [
        {"deviceId": "dev001"},
        {"deviceId": "dev003", "i": 3},
        {"deviceId": "dev006", "i": 6},
    ]


async def test_paging_over_250_devices_returns_each_exactly_once(
    queries: QueryService, registry: RegistryService, twins: TwinService
) -> None:
    await fleet(registry, twins, 250, tag_every=5)
    everything, pages = await all_pages(queries, "SELECT * FROM devices", 100)
    assert [t["deviceId"] for t in everything] == [f"dev{i:03d}" for i in range(250)] and pages == 3
    tagged, _ = await all_pages(queries, "SELECT deviceId FROM devices WHERE IS_DEFINED(tags.site)", 7)
    assert [r["deviceId"] for r in tagged] == [f"dev{i:03d}" for i in range(0, 250, 5)]
    top, _ = await all_pages(queries, "SELECT TOP 45 deviceId FROM devices", 20)
    assert [r["deviceId"] for r in top] == [f"dev{i:03d}" for i in range(45)]
    exact, pages = await all_pages(queries, "SELECT * FROM devices WHERE IS_DEFINED(tags.i)", 50)
    assert len(exact) == 50 and pages == 1  # a full last page says so: no empty extra page


async def test_paging_is_stable_while_devices_change(
    queries: QueryService, registry: RegistryService, twins: TwinService
) -> None:
    await fleet(registry, twins, 40, tag_every=100)
    first = await queries.run("SELECT deviceId FROM devices", max_items=15)
    await registry.delete("dev003", if_match="*", actor=ACTOR)  # already returned
    await registry.create("dev0000", device_body("dev0000"), actor=ACTOR)  # sorts before the cursor
    await registry.create("dev039a", device_body("dev039a"), actor=ACTOR)  # sorts after it
    rest, _ = await all_pages_from(queries, "SELECT deviceId FROM devices", 15, first.continuation)
    seen = [r["deviceId"] for r in first.items + rest]
    assert len(seen) == len(set(seen))
    assert set(seen) >= {f"dev{i:03d}" for i in range(40)} and "dev039a" in seen


async def all_pages_from(
    queries: QueryService, text: str, page: int, token: str | None
) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    pages = 0
    while token is not None:
        result = await queries.run(text, max_items=page, continuation=token)
        items.extend(result.items)
        token = result.continuation
        pages += 1
    return items, pages


async def test_aggregate_pages(queries: QueryService, registry: RegistryService, twins: TwinService) -> None:
    await fleet(registry, twins, 30)
    rows, pages = await all_pages(queries, "SELECT tags.i, COUNT() AS n FROM devices GROUP BY tags.i", 4)
    assert len(rows) == 11 and pages == 3  # ten tagged values plus the untagged group
    assert sum(r["n"] for r in rows) == 30


async def test_bad_continuation_tokens(
    queries: QueryService, registry: RegistryService, twins: TwinService
) -> None:
    await fleet(registry, twins, 10, tag_every=100)
    page = await queries.run("SELECT * FROM devices", max_items=3)
    assert page.continuation is not None
    for token in ("garbage!", "e30", page.continuation[:-2]):
        with pytest.raises(BadRequest) as err:
            await queries.run("SELECT * FROM devices", max_items=3, continuation=token)
        assert err.value.field == "x-ms-continuation"
    with pytest.raises(BadRequest) as err:
        await queries.run("SELECT deviceId FROM devices", max_items=3, continuation=page.continuation)
    assert err.value.field == "x-ms-continuation"
    with pytest.raises(BadRequest) as err:
        await queries.run("SELECT * FROM devices", max_items=0)
    assert err.value.field == "x-ms-max-item-count"


async def test_devices_jobs_is_a_source_with_compound_keys_rebased_paths_and_device_scopes(
    storage: SqlStorage, audit: AuditLog, registry: RegistryService, twins: TwinService
) -> None:
    """FROM devices.jobs through the real JobService: (job, device) keys page exactly once across scan
    pages, `devices.jobs.` paths mean the row's fields, `x-ms-item-type` is deviceJob, aggregates scan
    every row, and a scoped caller sees the rows of the devices its scopes match."""
    await fleet(registry, twins, 100)
    repo = SqlJobRepository(storage.db)
    jobs = JobService(repo, audit)
    update = {"type": "scheduleUpdateTwin", "queryCondition": "*", "updateTwin": {"tags": {"x": 1}}}
    ids = [f"dev{i:03d}" for i in range(100)]
    for job_id in ("j1", "j2"):
        await jobs.create_device_job(job_id, dict(update), actor=ACTOR)
        job = await repo.get(job_id)
        assert job is not None and await repo.start(job_id, ids, doc=job.doc, now_ms=1)
    queries = QueryService(twins, scan_page=64, sources={"devices.jobs": jobs.query_source()})
    rows, pages = await all_pages(queries, "SELECT * FROM devices.jobs", 30)
    assert [(r["jobId"], r["deviceId"]) for r in rows] == [(j, d) for j in ("j1", "j2") for d in ids]
    assert pages == 7
    first = await queries.run("SELECT * FROM devices.jobs", max_items=1)
    assert first.item_type == "deviceJob"
    text = ("SELECT deviceId FROM devices.jobs "
            "WHERE devices.jobs.jobId = 'j2' AND devices.jobs.status = 'pending'")
    picked, _ = await all_pages(queries, text, 40)
    assert picked == [{"deviceId": d} for d in ids]
    counted = await queries.run(
        "SELECT devices.jobs.jobId, COUNT() AS n FROM devices.jobs GROUP BY devices.jobs.jobId")
    assert counted.items == [{"jobId": "j1", "n": 100}, {"jobId": "j2", "n": 100}]
    south = [f"dev{i:03d}" for i in range(0, 100, 3) if i % 2 == 0]
    scoped = await queries.run("SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'j1'", max_items=1000,
                               scopes=("tags.site = 'south'",))
    assert [r["deviceId"] for r in scoped.items] == south
    with pytest.raises(BadRequest, match=r"FROM devices\.jobs is not available"):
        await QueryService(twins).run("SELECT * FROM devices.jobs")
    token = (await queries.run("SELECT * FROM devices.jobs", max_items=1)).continuation
    assert token is not None
    with pytest.raises(BadRequest, match="x-ms-continuation"):  # a devices.jobs token on device twins
        await queries.run("SELECT * FROM devices", continuation=token)
