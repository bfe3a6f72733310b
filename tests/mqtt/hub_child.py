"""A hub with a plain-TCP MQTT listener in its own process, for the kill -9 durability test.

Usage: python hub_child.py DATA_DIR DEVICE_ID... — creates the devices if missing, prints one JSON
line {"port": …, "keys": {device: key}} once listening, and serves until SIGTERM (or SIGKILL).
With TETHER_TEST_CHECKPOINT=partition:sequence it also writes that `$Default` checkpoint first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
from pathlib import Path

from tether.config import load_settings
from tether.hub import Hub
from tether.messaging.events import DEFAULT_CONSUMER_GROUP
from tether.protocols.mqtt.server import start_mqtt, stop_mqtt


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def main(data_dir: Path, device_ids: list[str]) -> None:
    settings = load_settings(hub={"hostname": "localhost", "data_dir": data_dir},
                             limits={"device_messages_per_second": 100_000.0})
    hub = Hub(settings)
    await hub.open()
    keys: dict[str, str] = {}
    for device_id in device_ids:
        device = await hub.registry.find(device_id)
        if device is None:
            body = {"authentication": {"type": "sas", "symmetricKey": {
                "primaryKey": _key(), "secondaryKey": _key()}}}
            device = await hub.registry.create(device_id, body, actor="test")
        key = device.authentication.symmetric_key.primary_key
        assert key is not None
        keys[device_id] = key
    checkpoint = os.environ.get("TETHER_TEST_CHECKPOINT")
    if checkpoint:
        partition, sequence = (int(v) for v in checkpoint.split(":"))
        await hub.stream.checkpoint(DEFAULT_CONSUMER_GROUP, partition, sequence)
    server = await start_mqtt(hub, host="127.0.0.1", port=0, tls=False)
    print(json.dumps({"port": server.sockets[0].getsockname()[1], "keys": keys}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    await stop_mqtt(hub)
    await hub.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2:]))
