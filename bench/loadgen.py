"""MQTT load generator: many devices over plain TCP or TLS, SAS passwords or none, QoS 0/1.

Runs as worker processes (`python -m bench.loadgen --worker`, one JSON spec on stdin) driven by
`LoadRun` in the bench process, so the same load goes to Tether, Mosquitto and amqtt. Modes:

- `publish`: each device keeps `window` QoS 1 messages in flight (as fast as possible) or the worker
  paces `rate` messages/s; measures PUBACKs/s and publish→PUBACK latency.
- `subscribe`: one client on `topic_filter` (QoS 1, PUBACKs every delivery); measures deliveries/s
  and publish→delivery latency (monotonic clock in the payload, same host).
- `idle`: connect every device and hold the connections until told to stop (RSS scenario).
- `storm`: `concurrency` loops of connect → CONNACK → abort (connect-rate scenario).
- `sse`: Tether's consumer API (`GET /tether/events/stream`, Server-Sent Events over HTTPS with a
  service SAS token), the Tether counterpart of the subscriber: deliveries/s and publish→consumer latency.

Only the interval [start + warmup, start + duration) counts; each worker reports its own CPU
seconds over that interval (`time.process_time`), so client overhead is visible in the results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.mqttclient import (
    STAMP,
    Counters,
    Histogram,
    MqttClient,
    client_context,
    open_client,
    sas_password,
    stamped_payload,
    telemetry_topic,
)

ROOT = Path(__file__).resolve().parents[1]
API_VERSION = "2021-04-12"


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (10,000 sockets need it); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --------------------------------------------------------------------------------------- worker side


_B64_BODY = b',"body":"'
_B64_TAIL = b'","bodyEncoding":"base64"}'


def _sent_ns(line: bytes) -> int | None:
    """The send time stamped in an SSE event's body: base64 bodies (the bench's binary payloads) are
    read from the body's first 12 characters; any other shape is parsed as JSON."""
    at = line.rfind(_B64_BODY)
    if at >= 0 and line.endswith(_B64_TAIL):
        head = base64.b64decode(line[at + len(_B64_BODY) : at + len(_B64_BODY) + 12])
        return int(STAMP.unpack_from(head + bytes(STAMP.size))[0]) if len(head) >= 8 else None
    doc = json.loads(line[6:])
    body = doc["body"]
    raw = base64.b64decode(body) if doc.get("bodyEncoding") == "base64" else body.encode()
    return int(STAMP.unpack_from(raw)[0]) if len(raw) >= STAMP.size else None


class Worker:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.counters = Counters()
        self.clients: list[MqttClient] = []
        self.ssl: ssl.SSLContext | None = client_context(spec.get("ca_file")) if spec.get("tls") else None
        self.running = False
        self.connect_hist = Histogram()
        self.topics: dict[int, str] = {}  # id(client) -> its telemetry topic

    def credentials(self, device_id: str) -> tuple[str | None, bytes | None]:
        auth = self.spec.get("auth") or {}
        hostname = auth.get("hostname", "localhost")
        username = f"{hostname}/{device_id}/?api-version={API_VERSION}"
        if auth.get("kind") == "sas":
            return username, sas_password(hostname, device_id, auth["key"])
        return username, auth.get("password", "").encode() or None

    async def connect_one(self, index: int, device_id: str, counters: Counters | None = None
                          ) -> MqttClient | None:
        spec = self.spec
        username, password = self.credentials(device_id)
        ips = spec.get("source_ips") or [None]
        started = time.monotonic_ns()
        try:
            client, code = await open_client(
                spec["host"], spec["port"], device_id, username=username, password=password,
                ssl_context=self.ssl, server_hostname=spec.get("server_hostname"),
                local_ip=ips[index % len(ips)], keepalive=spec.get("keepalive", 60),
                counters=counters or self.counters, timeout=spec.get("connect_timeout", 30.0),
            )
        except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
            self.counters.error(f"connect-{type(exc).__name__}")
            return None
        if code != 0:
            self.counters.error(f"connack-{code}")
            client.abort()
            return None
        self.connect_hist.add_ns(time.monotonic_ns() - started)
        return client

    async def connect_all(self) -> None:
        devices: list[str] = self.spec["devices"]
        gate = asyncio.Semaphore(self.spec.get("connect_concurrency", 100))

        async def one(i: int, device_id: str) -> None:
            async with gate:
                client = await self.connect_one(i, device_id)
                if client is not None:
                    self.clients.append(client)
                    self.topics[id(client)] = telemetry_topic(device_id)

        await asyncio.gather(*(one(i, d) for i, d in enumerate(devices)))

    # --- run phases -------------------------------------------------------------------------------
    async def run_publish(self, end: int) -> None:
        spec = self.spec
        qos, size, window = spec.get("qos", 1), spec.get("payload", 256), spec.get("window", 20)
        rate = spec.get("rate")
        topics = self.topics
        seq = [0]

        def send(client: MqttClient) -> None:
            seq[0] += 1
            client.queue_publish(topics[id(client)], stamped_payload(size, seq[0]), qos)

        def on_ack(client: MqttClient, _pid: int) -> None:
            if self.running and rate is None:
                send(client)

        for client in self.clients:
            client.on_ack = on_ack
        self.running = True
        if rate is None and qos:
            for client in self.clients:
                for _ in range(window):
                    send(client)
                client.flush()
            await asyncio.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
        else:
            await self._paced(send, rate, qos, window, end)
        self.running = False
        deadline = time.monotonic() + 3.0
        while any(c.inflight and c.is_open() for c in self.clients) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.counters.errors["unacked_at_end"] = sum(len(c.inflight) for c in self.clients)

    async def _paced(self, send: Any, rate: float | None, qos: int, window: int, end: int) -> None:
        """`rate` messages/s over all devices (None with QoS 0: as fast as the socket drains)."""
        started = time.monotonic_ns()
        sent = 0
        turn = 0
        clients = self.clients
        while time.monotonic_ns() < end and clients:
            if rate is None:
                budget = 200 * len(clients)
            else:
                budget = int(rate * (time.monotonic_ns() - started) / 1e9) - sent
            for _ in range(max(0, budget)):
                client = clients[turn % len(clients)]
                turn += 1
                if not client.is_open():
                    continue
                if qos and len(client.inflight) >= window:
                    continue
                if client.transport is not None and client.transport.get_write_buffer_size() > 1 << 16:
                    continue
                send(client)
                sent += 1
            for client in clients:
                client.flush()
            await asyncio.sleep(0.005 if rate is not None else 0)

    async def run_storm(self, end: int, window_start: int) -> None:
        devices: list[str] = self.spec["devices"]
        counter = [0]
        rate_counters = Counters()

        async def loop_one(slot: int) -> None:
            while time.monotonic_ns() < end:
                i = counter[0]
                counter[0] += 1
                started = time.monotonic_ns()
                client = await self.connect_one(i, devices[i % len(devices)], rate_counters)
                if client is None:
                    await asyncio.sleep(0.01)
                    continue
                now = time.monotonic_ns()
                if window_start <= now < end:
                    self.counters.acked += 1  # CONNACK 0 inside the window
                    self.counters.ack_latency.add_ns(now - started)
                client.abort()

        await asyncio.gather(*(loop_one(s) for s in range(self.spec.get("concurrency", 50))))

    async def open_sse(self) -> Any:
        """Open the SSE feed (from the end of the stream) and start reading it in the background."""
        import aiohttp

        sse = self.spec["sse"]
        ctx = client_context(sse["ca_file"])
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
        resp = await session.get(sse["url"], params={"from": "end", "heartbeat": "1"},
                                 headers={"Authorization": sse["token"]}, ssl=ctx)
        if resp.status != 200:
            raise RuntimeError(f"SSE feed answered {resp.status}: {await resp.text()}")
        counters = self.counters

        async def read() -> None:
            # Chunks, not lines: an async iteration per line cost this client more CPU than the hub
            # spends rendering the event; on two shared cores that CPU is taken from the hub.
            rest = b""
            async for chunk in resp.content.iter_any():
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                now = time.monotonic_ns()
                if not counters.in_window(now):
                    continue
                for line in lines:
                    if line.startswith(b"data: "):
                        counters.received += 1
                        sent = _sent_ns(line)
                        if sent is not None:
                            counters.e2e_latency.add_ns(now - sent)

        self._sse = (session, resp, asyncio.create_task(read()))
        return self._sse

    # --- worker main ------------------------------------------------------------------------------
    async def main(self) -> None:
        raise_nofile()
        mode = self.spec["mode"]
        connect_started = time.monotonic()
        if mode in ("publish", "idle"):
            await self.connect_all()
        elif mode == "sse":
            await self.open_sse()
        elif mode == "subscribe":
            client = await self.connect_one(0, self.spec["devices"][0])
            if client is not None:
                await client.subscribe(self.spec.get("topic_filter", "devices/+/messages/events/#"), 1)
                self.clients.append(client)
        connect_s = time.monotonic() - connect_started
        emit({"ready": len(self.clients), "connect_s": connect_s, "errors": self.counters.errors,
              "connect_ms_p50": self.connect_hist.percentile_ms(50),
              "connect_ms_p99": self.connect_hist.percentile_ms(99)})
        go = json.loads(await read_line())
        start, warmup, duration = go["start_ns"], go["warmup"], go["duration"]
        window = (start + int(warmup * 1e9), start + int(duration * 1e9))
        self.counters.window = window
        await asyncio.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9))
        cpu: list[float] = []
        loop = asyncio.get_running_loop()
        loop.call_later((window[0] - time.monotonic_ns()) / 1e9, lambda: cpu.append(time.process_time()))
        loop.call_later((window[1] - time.monotonic_ns()) / 1e9, lambda: cpu.append(time.process_time()))
        if mode == "publish":
            await self.run_publish(window[1])
        elif mode == "storm":
            await self.run_storm(window[1], window[0])
        elif mode == "idle":
            await read_line()  # "stop"
        else:
            await asyncio.sleep(max(0.0, (window[1] - time.monotonic_ns()) / 1e9) + 2.0)
        await asyncio.sleep(max(0.0, (window[1] - time.monotonic_ns()) / 1e9) + 0.01)
        disconnected = sum(1 for c in self.clients if not c.is_open())
        if mode == "sse":
            session, resp, reader = self._sse
            reader.cancel()
            resp.close()
            await session.close()
        for client in self.clients:
            client.disconnect() if mode != "idle" else client.abort()
        c = self.counters
        emit({"result": {
            "connected": len(self.clients), "disconnected_during_run": disconnected,
            "sent": c.sent, "acked": c.acked, "received": c.received,
            "ack_latency": c.ack_latency.to_json(), "e2e_latency": c.e2e_latency.to_json(),
            "errors": c.errors, "cpu_s": (cpu[1] - cpu[0]) if len(cpu) == 2 else None,
            "window_s": (window[1] - window[0]) / 1e9,
        }})
        await asyncio.sleep(0.2)


async def read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker_entry() -> None:
    spec = json.loads(sys.stdin.readline())
    worker = Worker(spec)
    try:
        import uvloop

        uvloop.run(worker.main())
    except ImportError:
        asyncio.run(worker.main())


# ------------------------------------------------------------------------------------ coordinator side


@dataclass
class LoadResult:
    """Aggregated over every worker of one run."""

    window_s: float
    connected: int = 0
    sent: int = 0
    acked: int = 0
    received: int = 0
    disconnected: int = 0
    ack_latency: Histogram = field(default_factory=Histogram)
    e2e_latency: Histogram = field(default_factory=Histogram)
    client_cpu_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    ready: list[dict[str, Any]] = field(default_factory=list)
    broker_cpu_s: float | None = None  # CPU the broker process used inside the window

    @property
    def ack_rate(self) -> float:
        return self.acked / self.window_s if self.window_s else 0.0

    @property
    def receive_rate(self) -> float:
        return self.received / self.window_s if self.window_s else 0.0

    def add(self, res: dict[str, Any]) -> None:
        self.connected += res["connected"]
        self.sent += res["sent"]
        self.acked += res["acked"]
        self.received += res["received"]
        self.disconnected += res["disconnected_during_run"]
        self.ack_latency.merge(Histogram.from_json(res["ack_latency"]))
        self.e2e_latency.merge(Histogram.from_json(res["e2e_latency"]))
        self.client_cpu_s += res["cpu_s"] or 0.0
        for k, v in res["errors"].items():
            self.errors[k] = self.errors.get(k, 0) + v


class WorkerProc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n")
        await self.proc.stdin.drain()

    async def recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"load worker exited ({await self.proc.wait()})")
            if line.startswith(b"{"):
                return dict(json.loads(line))


class LoadRun:
    """Start workers (each with its own spec), wait until all connected, run, collect."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        self.specs = specs
        self.workers: list[WorkerProc] = []

    async def start(self, connect_timeout: float = 300.0) -> list[dict[str, Any]]:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
        for spec in self.specs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.loadgen", "--worker", cwd=str(ROOT), env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 24)
            worker = WorkerProc(proc)
            await worker.send(spec)
            self.workers.append(worker)
        return list(await asyncio.gather(*(w.recv(connect_timeout) for w in self.workers)))

    async def run(self, warmup: float, duration: float, *, hold: float | None = None,
                  broker_pid: int | None = None) -> LoadResult:
        start = time.monotonic_ns() + 200_000_000
        for w in self.workers:
            await w.send({"start_ns": start, "warmup": warmup, "duration": duration})
        cpu_task = asyncio.create_task(self._broker_cpu(broker_pid, start, warmup, duration))
        if hold is not None:  # idle mode: keep the connections `hold` seconds, then stop
            await asyncio.sleep(hold)
            for w in self.workers:
                await w.send("stop")
        replies = await asyncio.gather(*(w.recv(duration + 120) for w in self.workers))
        result = LoadResult(window_s=duration - warmup)
        for reply in replies:
            result.add(reply["result"])
        result.broker_cpu_s = await cpu_task
        await self.close()
        return result

    @staticmethod
    async def _broker_cpu(pid: int | None, start: int, warmup: float, duration: float) -> float | None:
        if pid is None:
            return None
        from bench.brokers import cpu_seconds

        try:
            await asyncio.sleep(max(0.0, (start - time.monotonic_ns()) / 1e9 + warmup))
            before = cpu_seconds(pid)
            await asyncio.sleep(duration - warmup)
            return cpu_seconds(pid) - before
        except OSError:
            return None

    async def close(self) -> None:
        for w in self.workers:
            if w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
        self.workers = []


def split(items: list[str], parts: int) -> list[list[str]]:
    return [items[i::parts] for i in range(parts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help="run as a worker (spec JSON on stdin)")
    args = parser.parse_args()
    if args.worker:
        worker_entry()
    else:
        parser.error("run the scenarios with `python -m bench.run`; this module is its load worker")


if __name__ == "__main__":
    main()
