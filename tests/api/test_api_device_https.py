"""What the service API shows about a device's HTTPS traffic: the live `cloudToDeviceMessageCount`,
and the audit records of refused device telemetry (413 oversize, 429 rate limit)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from api_helpers import API, HOST, create, policy_token, serving

from tether.api.device_routes import RefusalDigest
from tether.config import load_settings
from tether.hub import Hub
from tether.security.sas import build_token


def device_token(device: dict[str, object]) -> str:
    keys = device["authentication"]["symmetricKey"]  # type: ignore[index]
    return build_token(f"{HOST}/devices/{device['deviceId']}", keys["primaryKey"], int(time.time()) + 3600)


async def test_message_count_is_the_live_c2d_queue_depth(hub: Hub, base_url: str) -> None:
    owner = {"Authorization": await policy_token(hub, "iothubowner")}
    async with httpx.AsyncClient(base_url=base_url, headers=owner, timeout=30) as service:
        device = await create(service, "dev1")
        assert device["cloudToDeviceMessageCount"] == 0
        for i in range(3):
            r = await service.post(f"/devices/dev1/messages/deviceBound{API}", content=f"m{i}".encode())
            assert r.status_code in (200, 201, 204), r.text

        async def counts() -> tuple[int, int]:
            d = (await service.get(f"/devices/dev1{API}")).json()
            t = (await service.get(f"/twins/dev1{API}")).json()
            return d["cloudToDeviceMessageCount"], t["cloudToDeviceMessageCount"]

        assert await counts() == (3, 3)
        etag = (await service.get(f"/devices/dev1{API}")).headers["ETag"]
        async with httpx.AsyncClient(base_url=base_url, timeout=30,
                                     headers={"Authorization": device_token(device)}) as dev:
            r = await dev.get(f"/devices/dev1/messages/deviceBound{API}")
            assert r.status_code == 200 and r.content == b"m0"
            assert await counts() == (3, 3)  # locked, not yet settled: still queued
            lock = r.headers["ETag"].strip('"')
            assert (await dev.delete(f"/devices/dev1/messages/deviceBound/{lock}{API}")).status_code == 204
        assert await counts() == (2, 2)
        # computed on read, never stored: the device etag did not move
        assert (await service.get(f"/devices/dev1{API}")).headers["ETag"] == etag
        r = await service.patch(f"/twins/dev1{API}", json={"tags": {"site": "a"}})
        assert r.status_code == 200 and r.json()["cloudToDeviceMessageCount"] == 2


@pytest.fixture
async def slow_hub(tmp_path: Path) -> AsyncIterator[Hub]:
    """A hub allowing one device message per ten seconds (burst 1)."""
    h = Hub(load_settings(hub={"hostname": HOST, "data_dir": tmp_path},
                          limits={"device_messages_per_second": 0.1}))
    await h.open()
    try:
        yield h
    finally:
        await h.close()


async def test_refused_telemetry_is_audited(slow_hub: Hub) -> None:
    hub = slow_hub
    async with serving(hub) as url:
        owner = {"Authorization": await policy_token(hub, "iothubowner")}
        async with httpx.AsyncClient(base_url=url, headers=owner, timeout=30) as service:
            device = await create(service, "meter")
        events = f"/devices/meter/messages/events{API}"
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": device_token(device)},
                                     timeout=30) as dev:
            r = await dev.post(events, content=b"x" * (hub.settings.limits.max_d2c_message_bytes + 1))
            assert r.status_code == 413
            statuses = [(await dev.post(events, content=b"t")).status_code for _ in range(5)]
    assert statuses == [204, 429, 429, 429, 429]

    await hub.audit.flush()
    records = await hub.audit.query(action_prefix="https.events", limit=100)
    by_reason = {r.reason: r for r in records}
    assert set(by_reason) == {"message-too-large", "rate-limited"}
    assert all(r.outcome == "refused" and r.principal == "device:meter" and r.target == "meter"
               and r.credential == "sas" and (r.peer or "").startswith("127.0.0.1:") for r in records)
    limit = hub.settings.limits.max_d2c_message_bytes
    assert (by_reason["message-too-large"].details or {})["limit"] == limit
    # four 429s in well under a second: one record (the digest), the rest counted as suppressed later
    assert len([r for r in records if r.reason == "rate-limited"]) == 1


def test_refusal_digest_reports_what_it_suppressed() -> None:
    now = [100.0]
    digest = RefusalDigest(1.0, clock=lambda: now[0], max_keys=2)
    assert digest.admit("device:a", "rate-limited") == 0  # first: recorded
    assert [digest.admit("device:a", "rate-limited") for _ in range(3)] == [None, None, None]
    assert digest.admit("device:a", "message-too-large") == 0  # another reason: its own record
    now[0] += 1.0
    assert digest.admit("device:a", "rate-limited") == 3  # next record carries the suppressed count
    assert digest.admit("device:b", "rate-limited") == 0  # table full: stale keys pruned, b admitted
