"""`tether monitor` in local mode: events from the stream, printed like `az iot hub monitor-events`."""

from __future__ import annotations

import asyncio
import json

from tether.config import load_settings
from tether.messaging.events import open_stream

from .conftest import Cli, json_lines


def _append(cli: Cli, events: list[tuple[str, bytes, dict[str, str], dict[str, str]]]) -> None:
    settings = load_settings(hub={"data_dir": cli.data_dir})

    async def body() -> None:
        stream = open_stream(
            settings.stream_url,
            partitions=settings.storage.stream_partitions,
            retention_hours=settings.storage.stream_retention_hours,
            retention_bytes=settings.storage.stream_retention_bytes,
        )
        await stream.start()
        try:
            for device_id, payload, props, system in events:
                await stream.append(device_id, payload, properties=props, system_properties=system)
        finally:
            await stream.close()

    asyncio.run(body())


SYSTEM = {"message-id": "m1", "content-type": "application/json", "iothub-connection-device-id": "sensor-1"}


def test_monitor_prints_events_with_properties(cli: Cli, owner_cs: str) -> None:
    _append(
        cli,
        [
            ("sensor-1", b'{"temp": 21.5}', {"alert": "high"}, SYSTEM),
            ("sensor-2", b"plain text", {}, {"message-id": "m2"}),
            ("sensor-1", b"\xff\x00", {}, {}),
        ],
    )
    out = cli("monitor", "--from-start", "--max-events", "3", "--compact", "--timeout", "5").stdout
    events = json_lines(out)
    assert len(events) == 3
    by_id = {e["event"]["properties"]["system"].get("message-id"): e["event"] for e in events}
    first = by_id["m1"]
    assert first["origin"] == "sensor-1"
    assert first["payload"] == {"temp": 21.5}
    assert first["properties"]["application"] == {"alert": "high"}
    assert first["properties"]["system"]["content-type"] == "application/json"
    annotations = first["annotations"]
    assert annotations["iothub-connection-device-id"] == "sensor-1"
    assert annotations["x-opt-sequence-number"] == 0
    assert isinstance(annotations["x-opt-enqueued-time"], int)
    assert "x-opt-partition-id" in annotations and "x-opt-offset" in annotations
    assert by_id["m2"]["payload"] == "plain text"
    binary = next(e["event"] for e in events if e["event"].get("payload_encoding") == "base64")
    assert binary["payload"] == "/wA="

    out = cli("monitor", "--from-start", "--device", "sensor-2", "--compact", "--timeout", "1").stdout
    only = json_lines(out)
    assert [e["event"]["origin"] for e in only] == ["sensor-2"]


def test_monitor_starts_at_now_and_stops_when_idle(cli: Cli, owner_cs: str) -> None:
    _append(cli, [("old", b"{}", {}, {})])
    result = cli("monitor", "--timeout", "0.5")
    assert result.stdout == ""
    pretty = cli("monitor", "--from-start", "--max-events", "1").stdout
    assert json.loads(pretty)["event"]["origin"] == "old"  # indented JSON by default


def test_monitor_refuses_unknown_consumer_group(cli: Cli, owner_cs: str) -> None:
    result = cli("monitor", "--consumer-group", "nobody", "--timeout", "1", ok=False)
    assert result.exit_code == 1 and "nobody" in result.stderr
