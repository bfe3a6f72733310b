"""The Server-Sent Events feed: live delivery across partitions, device filter, heartbeats, resume
with Last-Event-ID, checkpointing, and ending cleanly (client leaves, shutdown, token expiry)."""

from __future__ import annotations

import asyncio
import time

import httpx
from aiohttp import web
from events_helpers import SseReader, append, serving, sse, token

from tether.api.event_routes import CONSUMERS_KEY, EventDoc
from tether.hub import Hub


def devices_on_distinct_partitions(hub: Hub, count: int) -> list[str]:
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        found.setdefault(hub.stream.partition_for(f"dev-{n}"), f"dev-{n}")
        n += 1
    return list(found.values())


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_feed_delivers_events_appended_after_connecting(client: httpx.AsyncClient, hub: Hub) -> None:
    await append(hub, "before", "too old")  # default `from=end`: not delivered
    devices = devices_on_distinct_partitions(hub, 3)
    async with sse(client) as (response, reader):
        assert response.headers["content-type"].startswith("text/event-stream")
        for device in devices:
            await append(hub, device, f"hello {device}", props={"k": device})
        received = [await reader.next_event() for _ in devices]
    docs = [doc for _, doc in received]
    assert sorted(d["deviceId"] for d in docs) == sorted(devices)
    assert {d["partition"] for d in docs} == {hub.stream.partition_for(d) for d in devices}
    for doc in docs:
        EventDoc.model_validate(doc)
        assert doc["body"] == f"hello {doc['deviceId']}" and doc["properties"] == {"k": doc["deviceId"]}
    ident = received[-1][0]
    assert ident is not None and len(ident.split(",")) == hub.stream.partition_count


async def test_feed_filters_by_device(client: httpx.AsyncClient, hub: Hub) -> None:
    target, other = devices_on_distinct_partitions(hub, 2)
    same_partition = next(f"x{n}" for n in range(10_000)
                          if hub.stream.partition_for(f"x{n}") == hub.stream.partition_for(target))
    async with sse(client, device=target) as (_, reader):
        await append(hub, other, "no")
        await append(hub, same_partition, "no either")
        await append(hub, target, "yes 1")
        await append(hub, target, "yes 2")
        received = [(await reader.next_event())[1] for _ in range(2)]
        assert [d["body"] for d in received] == ["yes 1", "yes 2"]
        assert {d["deviceId"] for d in received} == {target}


async def test_heartbeats_do_not_break_parsing(client: httpx.AsyncClient, hub: Hub) -> None:
    async with sse(client, heartbeat="1") as (_, reader):
        await reader.comment("heartbeat", timeout=5)
        await reader.comment("heartbeat", timeout=5)
        await append(hub, "dev-h", '{"after": "heartbeats"}')
        _, doc = await reader.next_event()
    assert doc["body"] == '{"after": "heartbeats"}'
    assert reader.comments.count("heartbeat") >= 2


async def test_from_start_and_resume_with_last_event_id(client: httpx.AsyncClient, hub: Hub) -> None:
    for i in range(4):
        await append(hub, "dev-r", f"e{i}")
    async with sse(client, **{"from": "start"}) as (_, reader):
        first = [await reader.next_event() for _ in range(2)]
    assert [d["body"] for _, d in first] == ["e0", "e1"]
    last_id = first[-1][0]
    assert last_id is not None
    async with client.stream("GET", "/tether/events/stream", params={"from": "start"},
                             headers={"Last-Event-ID": last_id}) as response:
        reader = SseReader(response.aiter_lines())
        rest = [(await reader.next_event())[1]["body"] for _ in range(2)]
    assert rest == ["e2", "e3"]
    bad = await client.get("/tether/events/stream", headers={"Last-Event-ID": "garbage"})
    assert bad.status_code == 400 and bad.json()["field"] == "Last-Event-ID"


async def test_from_time_starts_at_that_time(client: httpx.AsyncClient, hub: Hub) -> None:
    await append(hub, "dev-t", "old")
    await asyncio.sleep(0.05)
    cut = str(int(time.time() * 1000))
    await asyncio.sleep(0.05)
    await append(hub, "dev-t", "new")
    async with sse(client, **{"from": cut}) as (_, reader):
        assert (await reader.next_event())[1]["body"] == "new"


async def test_checkpoint_true_checkpoints_the_group(client: httpx.AsyncClient, hub: Hub,
                                                     served: tuple[str, web.AppRunner]) -> None:
    assert (await client.put("/tether/events/consumergroups/sse-jobs")).status_code == 201
    devices = devices_on_distinct_partitions(hub, 2)
    sent = [await append(hub, d, f"{d}-{i}") for i in range(2) for d in devices]
    async with sse(client, consumerGroup="sse-jobs", checkpoint="true") as (_, reader):
        # no checkpoint yet: from=checkpoint (the default with checkpoint=true) starts at the beginning
        for _ in sent:
            await reader.next_event()
    consumers = served[1].app[CONSUMERS_KEY]
    await wait_for(lambda: consumers.feeds == 0)
    listing = (await client.get("/tether/events/consumergroups/sse-jobs/checkpoints")).json()
    marks = {c["partition"]: c["sequenceNumber"] for c in listing}
    for d in devices:
        assert marks[hub.stream.partition_for(d)] == 1
    later = await append(hub, devices[0], "after")
    async with sse(client, consumerGroup="sse-jobs", checkpoint="true") as (_, reader):
        _, doc = await reader.next_event()
    assert (doc["body"], doc["sequenceNumber"]) == ("after", later.sequence_number)


async def test_checkpoint_with_device_filter_is_refused(client: httpx.AsyncClient) -> None:
    r = await client.get("/tether/events/stream", params={"checkpoint": "true", "device": "d1"})
    assert r.status_code == 400 and r.json()["field"] == "checkpoint"


async def test_unknown_group_and_bad_parameters_answer_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/tether/events/stream", params={"consumerGroup": "nobody"})
    assert r.status_code == 404 and r.json()["errorCode"] == "ConsumerGroupNotFound"
    for params, field in (({"from": "someday"}, "from"), ({"heartbeat": "0"}, "heartbeat"),
                          ({"device": "bad/id"}, "device")):
        r = await client.get("/tether/events/stream", params=params)
        assert r.status_code == 400 and r.json()["field"] == field, (params, r.text)


async def test_feed_stops_when_the_client_disconnects(hub: Hub, served: tuple[str, web.AppRunner]) -> None:
    url, runner = served
    consumers = runner.app[CONSUMERS_KEY]
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": await token(hub)}) as c:
        async with sse(c):
            assert consumers.feeds == 1
    await wait_for(lambda: consumers.feeds == 0, timeout=3)


async def test_shutdown_ends_the_feed_promptly(hub: Hub) -> None:
    async with serving(hub) as (url, runner):
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": await token(hub)}) as c:
            async with sse(c) as (_, reader):
                began = time.monotonic()
                cleanup = asyncio.create_task(runner.cleanup())
                await reader.comment("closing: hub shutting down", timeout=5)
                await asyncio.wait_for(cleanup, 5)
                assert time.monotonic() - began < 5


async def test_feed_ends_when_the_token_expires(hub: Hub, base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url,
                                 headers={"Authorization": await token(hub, ttl=2)}) as c:
        async with sse(c) as (_, reader):
            await reader.comment("closing: token expired", timeout=8)
