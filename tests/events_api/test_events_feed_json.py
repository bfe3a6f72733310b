"""The SSE feed's fast paths keep the wire identical: event JSON spliced from the stored property JSON
equals `json.dumps(event_doc(…))`, the ids equal the every-partition resume positions, and a backlog
larger than one read per partition arrives complete, in order, with resumable ids."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import httpx
from events_helpers import SseReader, append, sse

from tether.api.event_feed import Chunk, event_doc, event_json, iso_time, raw_event_json, render
from tether.hub import Hub
from tether.messaging.telemetry import build_properties
from tether.security.principal import CredentialKind, Principal, PrincipalKind
from tether.storage.stream.local import LocalEventStream

compact = functools.partial(json.dumps, separators=(",", ":"))

AWKWARD = "é ü \u2028 \x7f \x01 \" \\ / \n 🙂"
CASES: list[tuple[str, str | None, bytes, dict[str, str], dict[str, str]]] = [
    ("plain", None, b'{"t": 1}', {"iothub-connection-device-id": "plain"}, {"k": "v"}),
    ("no-props", None, b"", {}, {}),
    ("with-module", "m-1", b"hi", {"message-id": "1"}, {}),
    ("awkward", "m\u00e9", AWKWARD.encode(), {"message-id": AWKWARD, "content-type": "text/plain"},
     {AWKWARD: AWKWARD}),
    ("del-only", None, b"x", {"message-id": "a\x7fb"}, {"p": "\x7f"}),
    ("binary-type", None, b"utf-8 but declared binary", {"content-type": "application/octet-stream"}, {}),
    ("binary-with-charset", None, b"text", {"content-type": "application/octet-stream; charset=utf-8"}, {}),
    ("binary-utf8-encoding", None, b"text",
     {"content-type": "application/octet-stream", "content-encoding": "UTF-8"}, {}),
    ("escaped-type", None, b"text", {"content-type": 'application/"odd"\\x', "x": '"content-type":"a"'}, {}),
    ("invalid-utf8", None, b"\xff\xfe\x00", {}, {}),
    ("fake-type-then-real", None, b"text",
     {"message-id": '"content-type":"text/plain"', "content-type": "application/octet-stream"}, {}),
    ("fake-type-only", None, b"text", {"message-id": '"content-type":"application/octet-stream"'}, {}),
]


async def test_spliced_event_json_equals_the_document_encoding(tmp_path: Path) -> None:
    stream = LocalEventStream(tmp_path / "s", 2, 24.0, 1 << 30)
    await stream.start()
    try:
        for device, module, body, system, props in CASES:
            await stream.append(device, body, module_id=module, properties=props, system_properties=system)
        principal = Principal(PrincipalKind.device, CredentialKind.device_key, device_id="pipe",
                              module_id="m")
        app, system = build_properties(principal, {"$.mid": AWKWARD, "$.ct": "application/json", "$.x": "y"},
                                       {"a": "b"}, now=1_700_000_000.25, model_id="dtmi:x;1")
        await stream.append("pipe", b'{"v": 1}', module_id="m", properties=app, system_properties=system)
        checked = 0
        for p in range(stream.partition_count):
            events = await stream.read(p, max_count=100)
            raws = await stream.read_raw(p, max_count=100)
            assert len(events) == len(raws)
            for event, raw in zip(events, raws, strict=True):
                assert (raw.partition, raw.offset, raw.sequence_number, raw.device_id, raw.body) == (
                    event.partition, event.offset, event.sequence_number, event.device_id, event.body)
                line = raw_event_json(raw)
                assert line == event_json(event) == compact(event_doc(event))
                assert line.isascii() and "\n" not in line
                assert json.loads(line)["systemProperties"] == event.system_properties
                checked += 1
        assert checked == len(CASES) + 1
    finally:
        await stream.close()


def test_iso_time_matches_azure_format_across_seconds() -> None:
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1_700_000_000_999) == "2023-11-14T22:13:20.999Z"
    assert iso_time(1_700_000_001_000) == "2023-11-14T22:13:21.000Z"
    assert iso_time(1_700_000_000_005) == "2023-11-14T22:13:20.005Z"
    assert iso_time(-1) == "1969-12-31T23:59:59.999Z"


def test_render_ids_hold_every_partition_position() -> None:
    positions = {2: 7, 0: 3, 1: 0}  # Last-Event-ID order, not partition order
    out = render([Chunk(1, [(0, "{}"), (1, '{"a":1}')]), Chunk(2, [(9, "{}")])], positions).decode()
    assert out == ('id: 0:3,1:1,2:7\ndata: {}\n\n'
                   'id: 0:3,1:2,2:7\ndata: {"a":1}\n\n'
                   'id: 0:3,1:2,2:10\ndata: {}\n\n')
    assert positions == {0: 3, 1: 2, 2: 10}
    single = {4: 0}
    assert render([Chunk(4, [(5, "{}")])], single) == b"id: 4:6\ndata: {}\n\n"


async def test_feed_delivers_a_large_backlog_in_order(client: httpx.AsyncClient, hub: Hub) -> None:
    by_partition: dict[int, list[str]] = {}
    for n in range(64):
        by_partition.setdefault(hub.stream.partition_for(f"bulk-{n}"), []).append(f"bulk-{n}")
    busy, other = list(by_partition.values())[:2]
    devices = [busy[0], busy[1], other[0]]  # the busy partition gets 1,600 events: two reads
    total = 2400
    events = await asyncio.gather(*(append(hub, devices[i % 3], f"n{i}", props={"i": str(i)})
                                    for i in range(total)))
    sent: dict[str, list[int]] = {d: [] for d in devices}
    for event in events:
        sent[event.device_id].append(event.sequence_number)
    seen: dict[str, list[int]] = {d: [] for d in devices}
    last_id: str | None = None
    async with sse(client, **{"from": "start"}) as (_, reader):
        for _ in range(total - 100):
            last_id, doc = await reader.next_event()
            seen[doc["deviceId"]].append(doc["sequenceNumber"])
            assert doc["properties"]["i"] == doc["body"][1:]
    assert last_id is not None
    async with client.stream("GET", "/tether/events/stream", params={"from": "start"},
                             headers={"Last-Event-ID": last_id}) as response:
        reader = SseReader(response.aiter_lines())
        for _ in range(100):
            _, doc = await reader.next_event()
            seen[doc["deviceId"]].append(doc["sequenceNumber"])
    assert seen == sent


async def test_long_poll_body_is_the_documents_json(client: httpx.AsyncClient, hub: Hub) -> None:
    for device, module, body, system, props in CASES:
        await append(hub, device, body, module=module, props=props, system=system)
    for p in range(hub.stream.partition_count):
        events = await hub.stream.read(p, max_count=100)
        r = await client.get(f"/tether/events/partitions/{p}/messages", params={"timeout": 0})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json; charset=utf-8"
        assert r.text == compact([event_doc(e) for e in events])
