"""A PUBACK means durable: kill -9 the hub process mid-flood, restart it on the same data directory,
and every message any device got a PUBACK for is in the stream, in each device's order."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
from mqtt_helpers import PahoDevice

from tether.config import load_settings
from tether.hub import Hub
from tether.messaging.events import DEFAULT_CONSUMER_GROUP, EventData
from tether.security.sas import build_token

CHILD = Path(__file__).with_name("hub_child.py")


def start_child(data_dir: Path, device_ids: list[str], checkpoint: str | None = None
                ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = dict(os.environ)
    env.pop("TETHER_TEST_CHECKPOINT", None)
    if checkpoint:
        env["TETHER_TEST_CHECKPOINT"] = checkpoint
    proc = subprocess.Popen([sys.executable, str(CHILD), str(data_dir), *device_ids],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the hub process exited before listening"
    return proc, json.loads(line)


class Flooder:
    """A paho client on paho's own network thread (`loop_start`), so only that thread writes to the
    socket and the wire order is the publish order; reconnects are pushed far out."""

    def __init__(self, port: int, device_id: str, key: str) -> None:
        self.device_id = device_id
        self.client = mqtt.Client(client_id=device_id, clean_session=False, protocol=mqtt.MQTTv311)
        token = build_token(f"localhost/devices/{device_id}", key, int(time.time()) + 3600)
        self.client.username_pw_set(f"localhost/{device_id}/?api-version=2021-04-12", token)
        self.client.max_inflight_messages_set(200)
        self.client.reconnect_delay_set(300, 300)
        self.sent: dict[int, str] = {}
        self.acked: set[int] = set()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc: rc == 0 and self.connected.set()
        self.client.on_disconnect = lambda c, u, rc: self.disconnected.set()
        self.client.on_publish = lambda c, u, mid: self.acked.add(mid)
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()
        assert self.connected.wait(10)

    def flood(self, stop: threading.Event) -> None:
        """Publish QoS 1 until the hub dies; `sent` maps paho message id → body."""
        i = 0
        while not stop.is_set() and not self.disconnected.is_set():
            if len(self.sent) - len(self.acked) >= 150:  # stay inside paho's in-flight window
                time.sleep(0.001)
                continue
            body = f"{self.device_id}:{i}"
            info = self.client.publish(f"devices/{self.device_id}/messages/events/%24.mid={i}", body, qos=1)
            if info.rc != 0:
                return
            self.sent[info.mid] = body
            i += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def read_back(data_dir: Path) -> tuple[list[EventData], int | None]:
    hub = Hub(load_settings(hub={"hostname": "localhost", "data_dir": data_dir}))
    await hub.open()
    try:
        events: list[EventData] = []
        for partition in range(hub.stream.partition_count):
            seq = 0
            while batch := await hub.stream.read(partition, from_sequence=seq, max_count=1000):
                events += batch
                seq = batch[-1].sequence_number + 1
        return events, await hub.stream.get_checkpoint(DEFAULT_CONSUMER_GROUP, 0)
    finally:
        await hub.close()


def test_every_pubacked_message_survives_kill_9_and_restart(tmp_path: Path) -> None:
    ids = [f"durable-{i}" for i in range(4)]
    proc, info = start_child(tmp_path, ids, checkpoint="0:41")
    devices = [Flooder(info["port"], d, info["keys"][d]) for d in ids]
    stop = threading.Event()
    threads = [threading.Thread(target=dev.flood, args=(stop,)) for dev in devices]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        proc.send_signal(signal.SIGKILL)  # mid-run: appends and PUBACKs in flight
        proc.wait(10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for dev in devices:
            dev.close()
        if proc.poll() is None:
            proc.kill()
    acked = {dev.device_id: {dev.sent[mid] for mid in dev.acked if mid in dev.sent} for dev in devices}
    assert sum(len(a) for a in acked.values()) > 100, "the flood did not get going"

    # The restarted process serves again on the same data directory.
    proc, info = start_child(tmp_path, ids)
    try:
        target = SimpleNamespace(hostname="localhost", tls=False, ip="127.0.0.1", port=info["port"])
        token = build_token(f"localhost/devices/{ids[0]}", info["keys"][ids[0]], int(time.time()) + 3600)
        dev = PahoDevice(target, ids[0], token)  # type: ignore[arg-type]
        assert dev.connect() == 0
        dev.wait_acked([dev.publish(b"after-restart")])
        dev.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)

    events, checkpoint = asyncio.run(read_back(tmp_path))
    assert checkpoint == 41
    for device_id in ids:
        bodies = [e.body.decode() for e in events if e.device_id == device_id]
        assert acked[device_id] <= set(bodies), "a PUBACKed message was lost"
        counters = [int(b.split(":")[1]) for b in bodies if b != "after-restart"]
        assert counters == sorted(counters) and len(counters) == len(set(counters))  # device order kept
    assert "after-restart" in {e.body.decode() for e in events}
