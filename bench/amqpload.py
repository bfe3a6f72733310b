"""AMQP load for scenario (e): N devices over TLS, each SASL PLAIN with its SAS token, one telemetry sender
link, `window` unsettled messages in flight; a message counts once the hub settled it `accepted` (which
Tether does only after the event is durable). Also an idle mode: N connections opened and held.

Not a test. python-qpid-proton's engine (C) does the AMQP, asyncio the sockets and TLS (stdlib ssl).
Usage: python -m bench.amqpload '{"host":…,"port":…,"ca_file":…,"key":…,"hostname":…,"devices":[…],
"mode":"publish"|"idle","warmup":1.5,"duration":6,"window":20,"payload":256}' — prints one JSON line
with the results (and, in idle mode, `{"ready": n}` first, then waits for a line on stdin).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from typing import Any

import proton

from tether.security.sas import build_token

READ = 65536


def _tag(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode()
    return str(value)


class AmqpDevice:
    """One device connection driven by proton's engine over an asyncio TLS stream."""

    def __init__(self, device_id: str, spec: dict[str, Any]) -> None:
        self.device_id = device_id
        self.spec = spec
        self.transport = proton.Transport(proton.Transport.CLIENT)
        self.connection = proton.Connection()
        self.connection.container = device_id
        self.connection.hostname = spec["hostname"]
        self.connection.user = f"{device_id}@sas.{spec['hostname']}"
        self.connection.password = build_token(f"{spec['hostname']}/devices/{device_id}", spec["key"],
                                               int(time.time()) + 3600)
        self.collector = proton.Collector()
        self.connection.collect(self.collector)
        self.transport.bind(self.connection)
        sasl = self.transport.sasl()
        sasl.allowed_mechs("PLAIN")
        sasl.allow_insecure_mechs = True  # TLS is below proton, in asyncio
        self.sender: Any = None
        self.sent: dict[str, int] = {}
        self.acked = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.ready = asyncio.Event()
        self.changed = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self._tag = 0

    async def connect(self, ctx: ssl.SSLContext) -> None:
        reader, self.writer = await asyncio.open_connection(self.spec["host"], self.spec["port"], ssl=ctx,
                                                            server_hostname=self.spec["hostname"])
        self.connection.open()
        session = self.connection.session()
        session.open()
        self.sender = session.sender(f"tx-{self.device_id}")
        self.sender.target.address = f"/devices/{self.device_id}/messages/events"
        self.sender.open()
        self.flush()
        asyncio.get_running_loop().create_task(self._read(reader))
        await asyncio.wait_for(self.ready.wait(), 60)

    def flush(self) -> None:
        pending = self.transport.pending()
        if pending > 0 and self.writer is not None:
            self.writer.write(bytes(self.transport.peek(pending)))
            self.transport.pop(pending)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(READ)
            if not data:
                self.errors += 1
                self.changed.set()
                return
            self.transport.push(data)
            self._events()
            self.flush()

    def _events(self) -> None:
        now = time.perf_counter_ns()
        while (event := self.collector.peek()) is not None:
            if event.type == proton.Event.LINK_FLOW and self.sender is not None and self.sender.credit:
                self.ready.set()
            elif event.type == proton.Event.DELIVERY:
                delivery = event.delivery
                if delivery.remote_state and delivery.settled:
                    started = self.sent.pop(_tag(delivery.tag), None)
                    if delivery.remote_state == proton.Delivery.ACCEPTED and started is not None:
                        self.acked += 1
                        self.latencies.append((now - started) / 1e6)
                    else:
                        self.errors += 1
                    delivery.settle()
            self.collector.pop()
        self.changed.set()

    def send(self, body: bytes) -> None:
        self._tag += 1
        tag = str(self._tag)
        self.sender.delivery(tag)
        self.sender.send(body)
        self.sender.advance()
        self.sent[tag] = time.perf_counter_ns()

    async def publish(self, body: bytes, window: int, end: float) -> None:
        while time.monotonic() < end:
            while len(self.sent) < window and self.sender.credit > 0:
                self.send(body)
            self.flush()
            self.changed.clear()
            await self.changed.wait()


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=spec["ca_file"])
    devices = [AmqpDevice(d, spec) for d in spec["devices"]]
    sem = asyncio.Semaphore(50)

    async def connect(device: AmqpDevice) -> None:
        async with sem:
            await device.connect(ctx)

    await asyncio.gather(*(connect(d) for d in devices))
    if spec["mode"] == "idle":
        print(json.dumps({"ready": len(devices)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        return {"connected": len(devices)}
    body = proton.Message(body=b"x" * spec.get("payload", 256), content_type="application/octet-stream",
                          properties={"alert": "high"}, inferred=True).encode()
    start = time.monotonic()
    end = start + spec["warmup"] + spec["duration"]
    tasks = [asyncio.create_task(d.publish(body, spec.get("window", 20), end)) for d in devices]
    await asyncio.sleep(spec["warmup"])
    acked0 = sum(d.acked for d in devices)
    lat0 = [len(d.latencies) for d in devices]
    cpu0 = time.process_time()
    await asyncio.sleep(spec["duration"])
    acked1 = sum(d.acked for d in devices)
    cpu1 = time.process_time()
    latencies = sorted(x for d, skip in zip(devices, lat0, strict=True) for x in d.latencies[skip:])
    for task in tasks:
        task.cancel()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 2)

    window = spec["duration"]
    return {"settled_per_s": round((acked1 - acked0) / window), "p50_ms": pct(50), "p99_ms": pct(99),
            "errors": sum(d.errors for d in devices),
            "client_cpu_pct": round(100 * (cpu1 - cpu0) / window, 1),
            "devices": len(devices)}


if __name__ == "__main__":
    result = asyncio.run(main(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)
