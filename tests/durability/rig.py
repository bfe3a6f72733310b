"""Crash-durability rig: QoS 1 load on a `tether run` process, `kill -9` mid-run, restart, read back.

A PUBACK promises durability, so after any number of kill/restart cycles every message a device got a
PUBACK for must be in the stream, in the device's order. Messages stored without a PUBACK (the
hub died between fsync and the ack) are allowed; the clients never retransmit, so any body stored
twice is a real duplicate and is reported. Shared by `test_kill9.py` (short) and `bench/run.py` (long).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.brokers import BENCH_KEY, HOSTNAME, TetherHub
from bench.mqttclient import MqttClient, open_client, sas_password
from tether.config import load_settings
from tether.storage.stream.local import LocalEventStream


@dataclass
class Outcome:
    cycles: int = 0
    sent: int = 0
    acked: dict[str, set[int]] = field(default_factory=dict)
    stored: dict[str, list[int]] = field(default_factory=dict)
    lost: dict[str, set[int]] = field(default_factory=dict)
    duplicates: int = 0
    unacked_stored: int = 0
    out_of_order: list[str] = field(default_factory=list)
    served_after_restart: bool = False

    @property
    def acked_total(self) -> int:
        return sum(len(a) for a in self.acked.values())

    @property
    def lost_total(self) -> int:
        return sum(len(x) for x in self.lost.values())

    def summary(self) -> str:
        return (f"{self.cycles} kill -9 cycle(s): {self.sent} sent, {self.acked_total} PUBACKed, "
                f"{self.lost_total} acknowledged messages lost, {self.duplicates} duplicates, "
                f"{self.unacked_stored} stored without PUBACK, out of order: {len(self.out_of_order)}")


async def _flood(hub: TetherHub, devices: list[str], counters: dict[str, int], outcome: Outcome,
                 kill_after: float, window: int) -> None:
    """Publish QoS 1 from every device until the hub is killed `kill_after` seconds in."""
    port = hub.ports["mqtt"]
    sent_body: dict[tuple[str, int], int] = {}  # (device, packet id) -> counter

    async def device_loop(device_id: str) -> MqttClient:
        client, code = await open_client(
            "127.0.0.1", port, device_id, username=f"{HOSTNAME}/{device_id}/?api-version=2021-04-12",
            password=sas_password(HOSTNAME, device_id, BENCH_KEY))
        assert code == 0, f"CONNACK {code} for {device_id}"
        topic = f"devices/{device_id}/messages/events/"
        acked = outcome.acked.setdefault(device_id, set())

        def send() -> None:
            n = counters[device_id]
            counters[device_id] = n + 1
            pid = client.queue_publish(topic, f"{device_id}:{n}".encode(), 1)
            assert pid is not None
            sent_body[(device_id, pid)] = n
            outcome.sent += 1

        def on_ack(c: MqttClient, pid: int) -> None:
            acked.add(sent_body.pop((device_id, pid)))
            if c.is_open():
                send()

        client.on_ack = on_ack
        for _ in range(window):
            send()
        client.flush()
        return client

    clients = await asyncio.gather(*(device_loop(d) for d in devices))
    await asyncio.sleep(kill_after)
    await asyncio.get_running_loop().run_in_executor(None, hub.kill9)
    deadline = time.monotonic() + 5
    while any(not c.closed.done() for c in clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for c in clients:
        c.abort()


async def _serves(hub: TetherHub, device_id: str) -> bool:
    client, code = await open_client(
        "127.0.0.1", hub.ports["mqtt"], device_id, username=f"{HOSTNAME}/{device_id}/?api-version=2021-04-12",
        password=sas_password(HOSTNAME, device_id, BENCH_KEY))
    if code != 0:
        return False
    client.keep_acks = True
    pid = client.queue_publish(f"devices/{device_id}/messages/events/", b"after-restart", 1)
    client.flush()
    deadline = time.monotonic() + 10
    while pid not in client.acks and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    client.disconnect()
    return pid in client.acks


async def read_stream(data_dir: Path) -> list[tuple[str, bytes]]:
    """Every (device id, body) in the stream, partition by partition in sequence order."""
    settings = load_settings(hub={"hostname": HOSTNAME, "data_dir": data_dir})
    stream = LocalEventStream(settings.stream_url.removeprefix("file://"), settings.storage.stream_partitions,
                              24.0, 1 << 40)
    await stream.start()
    out: list[tuple[str, bytes]] = []
    try:
        for partition in range(stream.partition_count):
            seq = 0
            while batch := await stream.read(partition, from_sequence=seq, max_count=5000):
                out += [(e.device_id, e.body) for e in batch]
                seq = batch[-1].sequence_number + 1
    finally:
        await stream.close()
    return out


def run_kill9(data_dir: Path, *, devices: int = 20, load_s: float = 10.0, cycles: int = 1,
              window: int = 20) -> Outcome:
    """Provision, then `cycles` x (start, flood for `load_s`, kill -9); restart once more, check it
    serves, stop it, and compare the stream with what was acknowledged."""
    ids = [f"durable-{i}" for i in range(devices)]
    hub = TetherHub(data_dir)
    hub.prepare(ids)
    outcome = Outcome()
    counters = dict.fromkeys(ids, 0)
    try:
        for _ in range(cycles):
            hub.start()
            asyncio.run(_flood(hub, ids, counters, outcome, load_s, window))
            outcome.cycles += 1
        hub.start()
        outcome.served_after_restart = asyncio.run(_serves(hub, ids[0]))
    finally:
        hub.stop()
    events = asyncio.run(read_stream(data_dir))
    bodies = Counter(body for _, body in events)
    outcome.duplicates = sum(n - 1 for n in bodies.values() if n > 1)
    for device_id in ids:
        stored = [int(body.split(b":")[1]) for dev, body in events
                  if dev == device_id and body != b"after-restart"]
        outcome.stored[device_id] = stored
        have = set(stored)
        acked = outcome.acked.get(device_id, set())
        outcome.lost[device_id] = acked - have
        outcome.unacked_stored += len(have - acked)
        if stored != sorted(stored):
            outcome.out_of_order.append(device_id)
    return outcome
