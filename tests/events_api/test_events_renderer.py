"""The feed's renderer processes (`storage.stream_reader_processes`): the same bytes as rendering in
the hub, reads really happen in another process, a killed helper is replaced, and a plan whose
segment retention deleted is planned again instead of failing the feed."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from events_helpers import HOST, append, serving, sse, token

from tether.api.event_feed import FeedRenderer, raw_event_json, render_plan
from tether.api.event_routes import CONSUMERS_KEY
from tether.config import load_settings
from tether.hub import Hub
from tether.storage.stream.local import LocalEventStream
from tether.storage.stream.segment import ReadPlan, SegmentSlice


def hub_with(data_dir: Path, processes: int) -> Hub:
    return Hub(load_settings(hub={"hostname": HOST, "data_dir": data_dir},
                             storage={"stream_reader_processes": processes}))


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = hub_with(tmp_path / "data", 1)
    await h.open()
    try:
        yield h
    finally:
        await h.close()


async def _feed_lines(hub: Hub, count: int, **params: str) -> list[str]:
    """The raw SSE text lines of the first `count` events of the feed (from the start)."""
    async with serving(hub) as (url, runner), httpx.AsyncClient(
            base_url=url, headers={"Authorization": await token(hub)}) as client:
        consumers = runner.app[CONSUMERS_KEY]
        async with client.stream("GET", "/tether/events/stream", params={"from": "start", **params},
                                 timeout=httpx.Timeout(10, read=30)) as response:
            lines: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith(("id:", "data:")):
                    lines.append(line)
                if len(lines) == 2 * count:
                    break
        assert (consumers.renderer is not None) == (hub.settings.storage.stream_reader_processes > 0)
        return lines


async def _fill(hub: Hub) -> int:
    bodies = ["plain", "ünïcode \u2028 line sep", '{"json": [1, 2]}']
    count = 0
    for i in range(30):
        device = f"dev-{i % 5}"
        await append(hub, device, bodies[i % 3], props={"i": str(i), "ö": "x"},
                     system={"iothub-connection-device-id": device, "content-type": "application/json"})
        count += 1
    await append(hub, "bin", bytes(range(256)), system={"content-type": "application/octet-stream"})
    return count + 1


async def test_helper_process_renders_the_same_bytes_as_the_hub(tmp_path: Path) -> None:
    outputs = []
    for processes in (1, 0):
        hub = hub_with(tmp_path / f"data-{processes}", processes)
        await hub.open()
        try:
            count = await _fill(hub)
            outputs.append(await _feed_lines(hub, count))
        finally:
            await hub.close()
    with_helper, in_hub = outputs
    assert len(with_helper) == 2 * 31
    # Offsets and times differ between the two logs; everything else must match byte for byte.
    assert [_stable(x) for x in with_helper] == [_stable(x) for x in in_hub]


def _stable(line: str) -> str:
    if not line.startswith("data:"):
        return "id"
    doc = json.loads(line[5:])
    doc.pop("enqueuedTime"), doc.pop("offset")
    doc["systemProperties"].pop("iothub-enqueuedtime", None)
    return json.dumps(doc, sort_keys=True)


async def test_a_killed_helper_is_replaced_and_the_feed_goes_on(hub: Hub, tmp_path: Path) -> None:
    async with serving(hub) as (url, runner), httpx.AsyncClient(
            base_url=url, headers={"Authorization": await token(hub)}) as client:
        renderer = runner.app[CONSUMERS_KEY].renderer
        assert renderer is not None
        async with sse(client) as (_, reader):
            await append(hub, "dev-a", "first")
            assert (await reader.next_event())[1]["body"] == "first"
            helpers = multiprocessing.active_children()
            assert helpers, "the event was read and rendered by a helper process"
            for helper in helpers:
                os.kill(helper.pid, signal.SIGKILL)
            await asyncio.sleep(0.3)
            await append(hub, "dev-a", "second")
            assert (await reader.next_event(timeout=20))[1]["body"] == "second"
            await append(hub, "dev-a", "third")
            assert (await reader.next_event())[1]["body"] == "third"
            replaced = {p.pid for p in multiprocessing.active_children()}
            assert replaced and not replaced & {h.pid for h in helpers}


async def test_a_plan_of_a_deleted_segment_reads_nothing(hub: Hub, tmp_path: Path) -> None:
    gone = SegmentSlice(str(tmp_path / "deleted.seg"), 40, 4096, 0)
    assert render_plan(ReadPlan(0, (gone,), 7, 100, 1 << 20), None) == (0, 7, [])


async def test_plans_cover_only_committed_events_and_render_like_read_raw(hub: Hub) -> None:
    stream = hub.stream
    assert isinstance(stream, LocalEventStream)
    await _fill(hub)
    partition = stream.partition_for("dev-1")
    plan = await stream.plan_raw(partition, from_sequence=1, max_count=3)
    assert plan is not None and plan.min_seq == 1 and plan.max_count == 3
    raw = await stream.read_raw(partition, from_sequence=1, max_count=3)
    renderer = FeedRenderer(1)
    try:
        count, following, rendered = await renderer.render(plan, None)
    finally:
        renderer.close()
    assert (count, following) == (len(raw), raw[-1].sequence_number + 1)
    assert rendered == [(e.sequence_number, raw_event_json(e)) for e in raw]
    nothing = await stream.plan_raw(partition, from_sequence=10_000, max_count=3, timeout_s=0.05)
    assert nothing is None
