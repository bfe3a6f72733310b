"""The consumer API on a NATS JetStream-backed hub (offsets equal sequences there, checkpoints live in
a KV bucket): the same answers as on the embedded log. Skips only when nothing listens on 4222."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from events_helpers import HOST, append, serving, sse, token

from tether.api.event_routes import NEXT_SEQUENCE_HEADER
from tether.config import load_settings
from tether.hub import Hub
from tether.storage.stream.jetstream import JetStreamEventStream

NATS_URL = os.environ.get("TETHER_TEST_NATS_URL", "nats://127.0.0.1:4222")


@pytest.fixture
async def js_hub(tmp_path: Path) -> AsyncIterator[Hub]:
    host, _, port = NATS_URL.split("://", 1)[1].rsplit("@", 1)[-1].partition(":")
    try:
        socket.create_connection((host, int(port or 4222)), timeout=1).close()
    except OSError as exc:
        pytest.skip(f"NATS unreachable at {NATS_URL}: {exc}")
    suffix = secrets.token_hex(4)
    url = f"{NATS_URL}?stream=TEV_{suffix.upper()}&bucket=tev_cp_{suffix}"
    hub = Hub(load_settings(hub={"hostname": HOST, "data_dir": tmp_path / "data"},
                            storage={"stream_url": url}))
    await hub.open()
    try:
        yield hub
    finally:
        stream = hub.stream
        assert isinstance(stream, JetStreamEventStream)
        await stream.delete_storage()
        await hub.close()


@pytest.fixture
async def js_client(js_hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(js_hub) as (url, _), httpx.AsyncClient(
            base_url=url, headers={"Authorization": await token(js_hub)}, timeout=30) as c:
        yield c


async def test_jetstream_reads_positions_and_checkpoints(js_client: httpx.AsyncClient, js_hub: Hub) -> None:
    sent = [await append(js_hub, "js-dev", f"e{i}") for i in range(4)]
    p = sent[0].partition
    url = f"/tether/events/partitions/{p}/messages"
    assert [e["body"] for e in (await js_client.get(url, params={"timeout": 0})).json()] == [
        "e0", "e1", "e2", "e3"]
    after = await js_client.get(url, params={"fromOffset": str(sent[1].offset), "timeout": 0})
    assert [e["body"] for e in after.json()] == ["e2", "e3"]
    parts = (await js_client.get("/tether/events/partitions")).json()["partitions"]
    assert parts[p]["lastSequenceNumber"] == 3
    cp = await js_client.put(f"/tether/events/consumergroups/$Default/checkpoints/{p}",
                             json={"sequenceNumber": 2})
    assert cp.status_code == 200, cp.text
    rest = await js_client.get(url, params={"fromCheckpoint": "true", "timeout": 0})
    assert [e["body"] for e in rest.json()] == ["e3"] and rest.headers[NEXT_SEQUENCE_HEADER] == "4"


async def test_jetstream_long_poll_wakes_and_feed_delivers(js_client: httpx.AsyncClient, js_hub: Hub) -> None:
    p = js_hub.stream.partition_for("js-live")
    began = time.monotonic()
    poll = asyncio.create_task(js_client.get(f"/tether/events/partitions/{p}/messages",
                                             params={"timeout": 15}))
    await asyncio.sleep(0.5)
    await append(js_hub, "js-live", "woke")
    assert [e["body"] for e in (await asyncio.wait_for(poll, 10)).json()] == ["woke"]
    assert time.monotonic() - began < 10
    async with sse(js_client, device="js-live") as (_, reader):
        await append(js_hub, "js-live", "streamed")
        _, doc = await reader.next_event()
    assert (doc["body"], doc["sequenceNumber"]) == ("streamed", 1)
