"""Consumer REST API: partitions, long-poll reads from every kind of position, consumer groups,
checkpoints (durable across a restart), the JSON event shape, errors and authorization."""

from __future__ import annotations

import asyncio
import base64
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from events_helpers import append, make_hub, serving, token

from tether.api.event_routes import NEXT_SEQUENCE_HEADER, EventDoc
from tether.hub import Hub

MESSAGES = "/tether/events/partitions/{p}/messages"


def messages(partition: int) -> str:
    return MESSAGES.format(p=partition)


async def test_partitions_list_count_and_last_sequence(client: httpx.AsyncClient, hub: Hub) -> None:
    r = await client.get("/tether/events/partitions")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["partitionCount"] == hub.stream.partition_count == len(doc["partitions"])
    assert all(p["lastSequenceNumber"] == -1 for p in doc["partitions"])
    event = await append(hub, "dev-a")
    await append(hub, "dev-a")
    doc = (await client.get("/tether/events/partitions")).json()
    assert doc["partitions"][event.partition] == {"id": event.partition, "lastSequenceNumber": 1}


async def test_long_poll_returns_at_once_when_events_exist(client: httpx.AsyncClient, hub: Hub) -> None:
    sent = [await append(hub, "dev-a", f'{{"n": {i}}}') for i in range(3)]
    p = sent[0].partition
    began = time.monotonic()
    r = await client.get(messages(p), params={"timeout": 20})
    assert time.monotonic() - began < 2
    assert r.status_code == 200, r.text
    events = r.json()
    assert [e["sequenceNumber"] for e in events] == [0, 1, 2]
    assert r.headers[NEXT_SEQUENCE_HEADER] == "3"
    first = events[0]
    EventDoc.model_validate(first)
    assert first["deviceId"] == "dev-a" and first["moduleId"] is None and first["partition"] == p
    assert first["body"] == '{"n": 0}' and first["bodyEncoding"] == "utf-8"
    assert first["offset"] == str(sent[0].offset)
    assert first["enqueuedTime"].endswith("Z")
    parsed = datetime.fromisoformat(first["enqueuedTime"].replace("Z", "+00:00"))
    assert int(parsed.timestamp() * 1000 + 0.5) == sent[0].enqueued_time_ms
    assert first["systemProperties"] == {"iothub-connection-device-id": "dev-a"}


async def test_long_poll_waits_and_wakes_on_append(client: httpx.AsyncClient, hub: Hub) -> None:
    p = hub.stream.partition_for("dev-w")
    began = time.monotonic()
    poll = asyncio.create_task(client.get(messages(p), params={"timeout": 15}))
    await asyncio.sleep(0.5)
    assert not poll.done()
    await append(hub, "dev-w", "late", module="m1", props={"k": "v"})
    r = await asyncio.wait_for(poll, 5)
    waited = time.monotonic() - began
    assert 0.4 < waited < 5
    [event] = r.json()
    assert (event["body"], event["moduleId"], event["properties"]) == ("late", "m1", {"k": "v"})
    assert r.headers[NEXT_SEQUENCE_HEADER] == "1"


async def test_long_poll_times_out_with_empty_array(client: httpx.AsyncClient) -> None:
    began = time.monotonic()
    r = await client.get(messages(0), params={"timeout": "0.5", "fromSequence": 7})
    assert 0.45 <= time.monotonic() - began < 5
    assert r.status_code == 200 and r.json() == []
    assert r.headers[NEXT_SEQUENCE_HEADER] == "7"


async def test_from_sequence_and_max_count(client: httpx.AsyncClient, hub: Hub) -> None:
    p = (await append(hub, "dev-s")).partition
    for _ in range(5):
        await append(hub, "dev-s")
    r = await client.get(messages(p), params={"fromSequence": 2, "maxCount": 2, "timeout": 0})
    assert [e["sequenceNumber"] for e in r.json()] == [2, 3]
    assert r.headers[NEXT_SEQUENCE_HEADER] == "4"


async def test_from_enqueued_time_iso_and_epoch_ms(client: httpx.AsyncClient, hub: Hub) -> None:
    p = (await append(hub, "dev-t", "old")).partition
    await asyncio.sleep(0.05)
    cut_ms = int(time.time() * 1000)
    await asyncio.sleep(0.05)
    await append(hub, "dev-t", "new1")
    await append(hub, "dev-t", "new2")
    iso = datetime.fromtimestamp(cut_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    for value in (iso, str(cut_ms)):
        r = await client.get(messages(p), params={"fromEnqueuedTime": value, "timeout": 0})
        assert [e["body"] for e in r.json()] == ["new1", "new2"], value
    future = await client.get(messages(p), params={"fromEnqueuedTime": str(cut_ms + 3_600_000),
                                                   "timeout": 0})
    assert future.json() == [] and future.headers[NEXT_SEQUENCE_HEADER] == "3"
    bad = await client.get(messages(p), params={"fromEnqueuedTime": "yesterday"})
    assert bad.status_code == 400 and bad.json()["field"] == "fromEnqueuedTime"


async def test_from_offset_is_exclusive(client: httpx.AsyncClient, hub: Hub) -> None:
    sent = [await append(hub, "dev-o", f"e{i}") for i in range(6)]
    p = sent[0].partition
    for i, event in enumerate(sent):
        r = await client.get(messages(p), params={"fromOffset": str(event.offset), "timeout": 0})
        assert [e["body"] for e in r.json()] == [f"e{j}" for j in range(i + 1, 6)], i
    start = await client.get(messages(p), params={"fromOffset": "-1", "timeout": 0})
    assert len(start.json()) == 6
    latest = await client.get(messages(p), params={"fromOffset": "@latest", "timeout": 0})
    assert latest.json() == [] and latest.headers[NEXT_SEQUENCE_HEADER] == "6"
    bad = await client.get(messages(p), params={"fromOffset": "abc"})
    assert bad.status_code == 400 and bad.json()["field"] == "fromOffset"


async def test_from_checkpoint(client: httpx.AsyncClient, hub: Hub) -> None:
    p = (await append(hub, "dev-c", "a")).partition
    await append(hub, "dev-c", "b")
    await append(hub, "dev-c", "c")
    none_yet = await client.get(messages(p), params={"fromCheckpoint": "true", "timeout": 0})
    assert [e["body"] for e in none_yet.json()] == ["a", "b", "c"]
    put = await client.put(f"/tether/events/consumergroups/$Default/checkpoints/{p}",
                           json={"sequenceNumber": 1})
    assert put.status_code == 200, put.text
    assert put.json() == {"consumerGroup": "$Default", "partition": p, "sequenceNumber": 1}
    r = await client.get(messages(p), params={"fromCheckpoint": "true", "timeout": 0})
    assert [e["body"] for e in r.json()] == ["c"]


async def test_only_one_start_position(client: httpx.AsyncClient) -> None:
    r = await client.get(messages(0), params={"fromSequence": 1, "fromOffset": "-1"})
    assert r.status_code == 400 and "at most one" in r.json()["Message"]


async def test_binary_and_declared_binary_bodies_are_base64(client: httpx.AsyncClient, hub: Hub) -> None:
    p = (await append(hub, "dev-b", b"\xff\x00\x01")).partition
    await append(hub, "dev-b", b"ascii", system={"content-type": "application/octet-stream"})
    await append(hub, "dev-b", b'{"t": 1}', system={"content-type": "application/json",
                                                   "content-encoding": "utf-8"})
    docs = (await client.get(messages(p), params={"timeout": 0})).json()
    assert [(d["body"], d["bodyEncoding"]) for d in docs] == [
        (base64.b64encode(b"\xff\x00\x01").decode(), "base64"),
        (base64.b64encode(b"ascii").decode(), "base64"),
        ('{"t": 1}', "utf-8"),
    ]


@pytest.mark.parametrize(("partition", "status"), [("99", 404), ("abc", 400), ("-1", 400)])
async def test_invalid_partition_is_named(client: httpx.AsyncClient, partition: str, status: int) -> None:
    r = await client.get(f"/tether/events/partitions/{partition}/messages", params={"timeout": 0})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == "partition" and partition.lstrip("-") in body["Message"]


async def test_read_needs_an_existing_consumer_group(client: httpx.AsyncClient) -> None:
    r = await client.get(messages(0), params={"consumerGroup": "ghosts", "timeout": 0})
    assert r.status_code == 404 and r.json()["errorCode"] == "ConsumerGroupNotFound"
    assert "ghosts" in r.json()["Message"]


async def test_query_limits_are_checked(client: httpx.AsyncClient) -> None:
    for params, field in (({"timeout": 61}, "timeout"), ({"timeout": "soon"}, "timeout"),
                          ({"maxCount": 0}, "maxCount"), ({"maxCount": 1001}, "maxCount"),
                          ({"fromSequence": -2}, "fromSequence")):
        r = await client.get(messages(0), params=params)
        assert r.status_code == 400 and r.json()["field"] == field, (params, r.text)


async def test_consumer_group_crud_and_default_protection(client: httpx.AsyncClient, hub: Hub) -> None:
    groups = "/tether/events/consumergroups"
    assert (await client.get(groups)).json() == [{"name": "$Default"}]
    created = await client.put(f"{groups}/analytics")
    assert created.status_code == 201 and created.json() == {"name": "analytics"}
    again = await client.put(f"{groups}/analytics")
    assert again.status_code == 200
    assert (await client.put(f"{groups}/$Default")).status_code == 200
    assert [g["name"] for g in (await client.get(groups)).json()] == ["$Default", "analytics"]
    bad = await client.put(f"{groups}/bad name!")
    assert bad.status_code == 400 and bad.json()["field"] == "group"

    default = await client.delete(f"{groups}/$Default")
    assert default.status_code == 400 and default.json()["errorCode"] == "ConsumerGroupNotDeletable"
    assert (await client.delete(f"{groups}/analytics")).status_code == 204
    gone = await client.delete(f"{groups}/analytics")
    assert gone.status_code == 404 and gone.json()["errorCode"] == "ConsumerGroupNotFound"
    assert (await client.get(groups)).json() == [{"name": "$Default"}]

    await hub.audit.flush()
    actions = [r.action for r in await hub.audit.query(action_prefix="consumer-group.")]
    assert sorted(actions) == ["consumer-group.create", "consumer-group.delete"]


async def test_checkpoints_validate_and_list(client: httpx.AsyncClient, hub: Hub) -> None:
    event = await append(hub, "dev-k")
    await append(hub, "dev-k")
    p = event.partition
    url = f"/tether/events/consumergroups/$Default/checkpoints/{p}"
    assert (await client.get(url)).json()["sequenceNumber"] is None
    seq = "sequenceNumber"
    for body, field in (({seq: "1"}, seq), ({seq: -1}, seq), ({seq: 5}, seq), ({}, seq),
                        ({seq: 1.0}, seq), ({seq: True}, seq), ({seq: 1, "x": 1}, "x")):
        r = await client.put(url, json=body)
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)
    assert (await client.put(url, json={"sequenceNumber": 1})).status_code == 200
    listing = (await client.get("/tether/events/consumergroups/$Default/checkpoints")).json()
    assert len(listing) == hub.stream.partition_count
    assert {c["partition"]: c["sequenceNumber"] for c in listing}[p] == 1
    missing = await client.get("/tether/events/consumergroups/nobody/checkpoints")
    assert missing.status_code == 404 and missing.json()["field"] == "group"


async def test_checkpoints_survive_a_hub_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    hub = make_hub(data)
    await hub.open()
    try:
        event = await append(hub, "dev-r")
        await append(hub, "dev-r")
        async with serving(hub) as (url, _), httpx.AsyncClient(
                base_url=url, headers={"Authorization": await token(hub)}) as c:
            assert (await c.put("/tether/events/consumergroups/jobs")).status_code == 201
            for group, seq in (("$Default", 0), ("jobs", 1)):
                r = await c.put(f"/tether/events/consumergroups/{group}/checkpoints/{event.partition}",
                                json={"sequenceNumber": seq})
                assert r.status_code == 200, r.text
    finally:
        await hub.close()

    hub = make_hub(data)
    await hub.open()
    try:
        async with serving(hub) as (url, _), httpx.AsyncClient(
                base_url=url, headers={"Authorization": await token(hub)}) as c:
            for group, seq in (("$Default", 0), ("jobs", 1)):
                r = await c.get(f"/tether/events/consumergroups/{group}/checkpoints/{event.partition}")
                assert r.json()["sequenceNumber"] == seq, group
            r = await c.get(messages(event.partition),
                            params={"consumerGroup": "jobs", "fromCheckpoint": "true", "timeout": 0})
            assert r.json() == [] and r.headers[NEXT_SEQUENCE_HEADER] == "2"
    finally:
        await hub.close()


ROUTES = [("GET", "/tether/events/partitions"), ("GET", "/tether/events/consumergroups"),
          ("PUT", "/tether/events/consumergroups/x"), ("DELETE", "/tether/events/consumergroups/x"),
          ("GET", "/tether/events/consumergroups/$Default/checkpoints"),
          ("PUT", "/tether/events/consumergroups/$Default/checkpoints/0"),
          ("GET", "/tether/events/partitions/0/messages?timeout=0"), ("GET", "/tether/events/stream")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_registry_read_policy_is_forbidden(hub: Hub, base_url: str, method: str, path: str) -> None:
    headers = {"Authorization": await token(hub, "registryRead")}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as c:
        r = await c.request(method, path, json={"sequenceNumber": 0} if method == "PUT" else None)
    assert r.status_code == 403, r.text
    assert r.json()["errorCode"] == "IotHubUnauthorizedAccess"


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_no_token_is_unauthorized(base_url: str, method: str, path: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        r = await c.request(method, path)
    assert r.status_code == 401 and r.json()["errorCode"] == "IotHubUnauthorizedAccess"


async def test_owner_policy_may_read(hub: Hub, base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url,
                                 headers={"Authorization": await token(hub, "iothubowner")}) as c:
        assert (await c.get(messages(0), params={"timeout": 0})).status_code == 200


async def test_openapi_lists_the_event_routes(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as c:
        spec = (await c.get("/openapi.json")).json()
    stream = spec["paths"]["/tether/events/stream"]["get"]
    assert stream["x-required-permission"] == "ServiceConnect" and stream["x-tether-extension"] is True
    read = spec["paths"]["/tether/events/partitions/{partition}/messages"]["get"]
    assert NEXT_SEQUENCE_HEADER in read["responses"]["200"]["headers"]
    assert "/devices/{id}" in spec["paths"]  # the core table is still there


async def test_shutdown_ends_a_pending_long_poll(hub: Hub, tmp_path: Path) -> None:
    async with serving(hub) as (url, runner):
        c = httpx.AsyncClient(base_url=url, headers={"Authorization": await token(hub)})
        poll = asyncio.create_task(c.get(messages(0), params={"timeout": 60}))
        await asyncio.sleep(0.3)
        began = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - began < 5
        r = await asyncio.wait_for(poll, 5)
        assert r.status_code == 200 and r.json() == []
        await c.aclose()
