"""Bulk import (all-or-nothing ndjson) and streamed export."""

from __future__ import annotations

import json

import httpx
from api_helpers import API, create, device_body

from tether.hub import Hub

NDJSON = {"Content-Type": "application/x-ndjson"}


def ndjson(records: list[dict[str, object]]) -> bytes:
    return b"\n".join(json.dumps(r).encode() for r in records) + b"\n"


async def test_import_2000_devices_in_one_call_and_export_them(client: httpx.AsyncClient, hub: Hub) -> None:
    records = [device_body(f"bulk-{i:04d}") for i in range(2000)]
    r = await client.post(f"/tether/devices/import{API}", content=ndjson(records), headers=NDJSON)
    assert r.status_code == 200, r.text
    assert r.json() == {"imported": 2000}
    assert (await hub.registry.statistics()).total_device_count == 2000

    r = await client.get(f"/tether/devices/export{API}")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    exported = [json.loads(line) for line in r.content.splitlines() if line.strip()]
    assert len(exported) == 2000
    by_id = {d["deviceId"]: d for d in exported}
    for rec in records[::97]:
        keys = by_id[rec["deviceId"]]["authentication"]["symmetricKey"]
        assert keys == rec["authentication"]["symmetricKey"]


async def test_one_bad_line_imports_nothing_and_names_the_line(client: httpx.AsyncClient, hub: Hub) -> None:
    records = [device_body(f"b{i}") for i in range(10)]
    records[6]["authentication"]["symmetricKey"]["primaryKey"] = "***"
    r = await client.post(f"/tether/devices/import{API}", content=ndjson(records), headers=NDJSON)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"].startswith("line 7: ") and "primaryKey" in body["field"]
    assert (await hub.registry.statistics()).total_device_count == 0


async def test_malformed_line_and_duplicates_are_refused(client: httpx.AsyncClient, hub: Hub) -> None:
    raw = ndjson([device_body("m1")]) + b"{not json}\n"
    r = await client.post(f"/tether/devices/import{API}", content=raw, headers=NDJSON)
    assert r.status_code == 400 and r.json()["field"] == "line 2"
    raw = ndjson([device_body("m1"), device_body("m2"), device_body("m1")])
    r = await client.post(f"/tether/devices/import{API}", content=raw, headers=NDJSON)
    assert r.status_code in (400, 409) and r.json()["field"].startswith("line 3")
    assert (await hub.registry.statistics()).total_device_count == 0


async def test_import_conflicting_with_existing_device_imports_nothing(client: httpx.AsyncClient,
                                                                      hub: Hub) -> None:
    await create(client, "exists")
    raw = ndjson([device_body("new1"), device_body("exists")])
    r = await client.post(f"/tether/devices/import{API}", content=raw, headers=NDJSON)
    assert r.status_code == 409, r.text
    assert (await hub.registry.find("new1")) is None


async def test_empty_import_is_400_and_bulk_limit_is_16x(client: httpx.AsyncClient, hub: Hub) -> None:
    r = await client.post(f"/tether/devices/import{API}", content=b"\n\n", headers=NDJSON)
    assert r.status_code == 400
    limit = hub.settings.limits.max_request_body_bytes
    # bigger than one normal body, within the bulk limit: accepted
    records = [device_body(f"s{i:05d}") for i in range(limit // 150)]
    raw = ndjson(records)
    assert limit < len(raw) < 16 * limit
    r = await client.post(f"/tether/devices/import{API}", content=raw, headers=NDJSON)
    assert r.status_code == 200, r.text
    r = await client.post(f"/tether/devices/import{API}", content=b" " * (16 * limit + 1), headers=NDJSON)
    assert r.status_code == 413 and r.json()["errorCode"] == "MessageTooLarge"


async def test_export_of_empty_registry(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/tether/devices/export{API}")
    assert r.status_code == 200 and r.content == b""


async def test_error_line_numbers_count_blank_lines(client: httpx.AsyncClient, hub: Hub) -> None:
    bad = device_body("z3")
    bad["colour"] = "red"
    raw = ndjson([device_body("z1")]) + b"\n   \n" + ndjson([device_body("z2"), bad])
    r = await client.post(f"/tether/devices/import{API}", content=raw, headers=NDJSON)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "line 5: colour"
    assert r.json()["Message"].split(";", 1)[1].startswith("nothing imported: line 5: ")
    assert (await hub.registry.statistics()).total_device_count == 0
