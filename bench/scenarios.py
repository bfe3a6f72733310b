"""The benchmark scenarios; each returns result rows for the table in `bench/run.py`.

(a) throughput: N devices x QoS 1 x 256-byte telemetry as fast as possible (window of in-flight
    messages per device); Tether: PUBACK = durable append; peers: a QoS 1 subscriber drains the topic.
(b) idle: N idle TLS device connections; broker RSS before/after.
(c) storm: TLS (+ SAS for Tether) connects per second from many concurrent connecting clients.
(d) C2D / direct-method round trip with 1,000 devices connected (needs the REST routes).
(e) AMQP: the (a) load over AMQP/TLS (SASL PLAIN, one telemetry sender per device, settled `accepted`
    only once durable), and the hub's RSS per idle AMQP/TLS connection (`bench/amqpload.py`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.brokers import BENCH_KEY, HOSTNAME, Broker, TetherHub, cpu_seconds, rss_mb
from bench.loadgen import LoadResult, LoadRun, split
from bench.mqttclient import STAMP, Histogram


@dataclass
class Row:
    scenario: str
    broker: str
    transport: str
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _cpu_pct(seconds: float | None, window: float) -> float | None:
    return None if seconds is None or not window else round(100.0 * seconds / window, 1)


# ------------------------------------------------------------------------------------ (a) throughput


async def throughput(broker: Broker, tls: bool, devices: list[str], *, duration: float, warmup: float,
                     window: int = 20, payload: int = 256, subscriber: bool = True) -> Row:
    base = broker.spec(tls)
    specs = [dict(base, mode="publish", devices=devices, qos=1, payload=payload, window=window,
                  connect_concurrency=50)]
    if subscriber and broker.name == "tether":
        specs.append({"mode": "sse", "devices": [], "sse": broker.auth["sse"]})
    elif subscriber:
        specs.append(dict(base, mode="subscribe", devices=["bench-subscriber"],
                          topic_filter="devices/+/messages/events/#"))
    run = LoadRun(specs)
    ready = await run.start()
    res = await run.run(warmup, duration, broker_pid=broker.pid)
    return Row("a-throughput", broker.name, "tls" if tls else "plain", _throughput_metrics(res, ready),
               broker.notes)


def _throughput_metrics(res: LoadResult, ready: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "devices": sum(r["ready"] for r in ready[:1]),
        "puback_per_s": round(res.ack_rate),
        "delivered_per_s": round(res.receive_rate) if res.received else None,
        "puback_p50_ms": _ms(res.ack_latency.percentile_ms(50)),
        "puback_p99_ms": _ms(res.ack_latency.percentile_ms(99)),
        "e2e_p50_ms": _ms(res.e2e_latency.percentile_ms(50)),
        "e2e_p99_ms": _ms(res.e2e_latency.percentile_ms(99)),
        "broker_cpu_pct": _cpu_pct(res.broker_cpu_s, res.window_s),
        "client_cpu_pct": _cpu_pct(res.client_cpu_s, res.window_s),
        "disconnects": res.disconnected,
        "errors": {k: v for k, v in res.errors.items() if v},
        "window_s": res.window_s,
        "_window_wall": None,
    }


async def stream_latency(data_dir: Path, since_ns: int, until_ns: int) -> dict[str, Any]:
    """Publish→enqueued latency of the events a run sent in [since, until): the stream is read
    directly after the hub stopped (no REST event route yet), using the send wall-clock time in the
    payload and the event's enqueued time (ms resolution)."""
    from tether.config import load_settings
    from tether.storage.stream.local import LocalEventStream

    settings = load_settings(hub={"hostname": "localhost", "data_dir": data_dir})
    stream = LocalEventStream(settings.stream_url.removeprefix("file://"), settings.storage.stream_partitions,
                              24.0, 1 << 40)
    await stream.start()
    hist = Histogram()
    count = 0
    try:
        for partition in range(stream.partition_count):
            seq = await stream.find_sequence_at(partition, since_ns // 1_000_000)
            while batch := await stream.read(partition, from_sequence=seq, max_count=5000):
                for ev in batch:
                    if len(ev.body) < STAMP.size:
                        continue
                    sent_wall = STAMP.unpack_from(ev.body)[1]
                    if since_ns <= sent_wall < until_ns:
                        count += 1
                        hist.add_ns(max(1000, ev.enqueued_time_ms * 1_000_000 - sent_wall + 500_000))
                seq = batch[-1].sequence_number + 1
                if batch[-1].enqueued_time_ms * 1_000_000 > until_ns + 10_000_000_000:
                    break
    finally:
        await stream.close()
    return {"stream_events": count, "enqueue_p50_ms": _ms(hist.percentile_ms(50)),
            "enqueue_p99_ms": _ms(hist.percentile_ms(99))}


# ---------------------------------------------------------------------------------------- (b) idle


async def idle(broker: Broker, devices: list[str], *, workers: int = 2, hold: float = 3.0,
               connect_timeout: float = 600.0) -> Row:
    assert broker.pid is not None
    before = rss_mb(broker.pid)
    ips = [f"127.0.0.{10 + i}" for i in range(8)]
    specs = [dict(broker.spec(True), mode="idle", devices=part, keepalive=900, connect_concurrency=64,
                  source_ips=ips, connect_timeout=120.0) for part in split(devices, workers)]
    run = LoadRun(specs)
    started = time.monotonic()
    try:
        ready = await run.start(connect_timeout)
    except TimeoutError:
        await run.close()
        return Row("b-idle-tls", broker.name, "tls", {"connected": None, "error": "connect phase timed out"},
                   broker.notes)
    connect_s = time.monotonic() - started
    connected = sum(r["ready"] for r in ready)
    await asyncio.sleep(hold)
    after = rss_mb(broker.pid)
    errors: dict[str, int] = {}
    for r in ready:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    await run.run(0.0, 0.5, hold=0.5)
    return Row("b-idle-tls", broker.name, "tls", {
        "connected": connected, "of": len(devices), "rss_before_mb": round(before, 1),
        "rss_after_mb": round(after, 1),
        "rss_per_conn_kb": round((after - before) * 1024 / max(connected, 1), 1),
        "ramp_conn_per_s": round(connected / connect_s), "errors": errors,
    }, broker.notes)


# --------------------------------------------------------------------------------------- (c) storm


async def storm(broker: Broker, devices: list[str], *, duration: float, warmup: float, workers: int = 2,
                concurrency: int = 32) -> Row:
    ips = [f"127.0.0.{20 + i}" for i in range(8)]
    specs = [dict(broker.spec(True), mode="storm", devices=part, concurrency=concurrency, source_ips=ips,
                  connect_timeout=20.0) for part in split(devices, workers)]
    run = LoadRun(specs)
    await run.start()
    res = await run.run(warmup, duration, broker_pid=broker.pid)
    per_connect = None
    if res.broker_cpu_s is not None and res.acked:
        per_connect = round(1000.0 * res.broker_cpu_s / res.acked, 3)
    return Row("c-connect-storm", broker.name, "tls", {
        "connacks_per_s": round(res.ack_rate),
        "connect_p50_ms": _ms(res.ack_latency.percentile_ms(50)),
        "connect_p99_ms": _ms(res.ack_latency.percentile_ms(99)),
        "broker_cpu_pct": _cpu_pct(res.broker_cpu_s, res.window_s),
        "broker_cpu_ms_per_connect": per_connect,
        "client_cpu_pct": _cpu_pct(res.client_cpu_s, res.window_s),
        "errors": {k: v for k, v in res.errors.items() if v},
    }, broker.notes)


# ----------------------------------------------------------------------------- (d) C2D / methods


def c2d_method_routes() -> dict[str, bool]:
    return {name: importlib.util.find_spec(f"tether.api.{name}") is not None
            for name in ("c2d_routes", "method_routes")}


async def c2d_and_methods(hub: TetherHub, devices: list[str], calls: int = 500) -> list[Row]:
    """Round trips through the service REST API while `devices` are connected. Runs only once the
    routes exist; until then the rows say what is missing."""
    routes = c2d_method_routes()
    if not all(routes.values()):
        missing = ", ".join(f"src/tether/api/{k}.py" for k, v in routes.items() if not v)
        return [Row("d-c2d-method-rtt", "tether", "tls", {"status": "pending"},
                    f"pending: {missing} not in the tree")]
    from bench.roundtrip import method_and_c2d_round_trips

    return [Row("d-c2d-method-rtt", "tether", "tls", metrics, "")
            for metrics in await method_and_c2d_round_trips(hub, devices, calls=calls)]


# ------------------------------------------------------------------------------------------ (e) AMQP


def _amqp_spec(hub: TetherHub, devices: list[str], mode: str, **extra: Any) -> str:
    return json.dumps({"host": hub.host, "port": hub.ports["amqps"], "ca_file": str(hub.ca_file),
                       "key": BENCH_KEY, "hostname": HOSTNAME, "devices": devices, "mode": mode, **extra})


async def amqp_throughput(hub: TetherHub, devices: list[str], *, duration: float, warmup: float,
                          window: int = 20, payload: int = 256) -> Row:
    """(e) 100 devices over AMQP/TLS, `window` unsettled telemetry transfers each, as (a) does over MQTT."""
    spec = _amqp_spec(hub, devices, "publish", warmup=warmup, duration=duration, window=window,
                      payload=payload)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.amqpload", spec,
                                                stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(warmup + 1.0)  # connects + warm-up, then the measured window
    cpu0, t0 = cpu_seconds(hub.pid), time.monotonic()
    out, _ = await proc.communicate()
    window_s = time.monotonic() - t0
    cpu = cpu_seconds(hub.pid) - cpu0
    result = json.loads(out.decode().strip().splitlines()[-1])
    return Row("e-amqp-throughput", "tether", "tls", {
        "devices": result["devices"], "settled_per_s": result["settled_per_s"],
        "settle_p50_ms": result["p50_ms"],
        "settle_p99_ms": result["p99_ms"], "broker_cpu_pct": _cpu_pct(cpu, window_s),
        "client_cpu_pct": result["client_cpu_pct"], "errors": result["errors"],
    }, "settled accepted after fsync (group commit); SASL PLAIN")


async def amqp_idle(hub: TetherHub, devices: list[str], *, hold: float = 3.0) -> Row:
    """(e) RSS per idle AMQP/TLS connection (SASL PLAIN, one session, one sender link each)."""
    before = rss_mb(hub.pid)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.amqpload",
                                                _amqp_spec(hub, devices, "idle"),
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 600))
    await asyncio.sleep(hold)
    after = rss_mb(hub.pid)
    proc.stdin.write(b"done\n")
    await proc.stdin.drain()
    await proc.communicate()
    connected = int(ready["ready"])
    return Row("e-amqp-idle", "tether", "tls", {
        "connected": connected, "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
        "rss_per_conn_kb": round((after - before) * 1024 / max(connected, 1), 1),
    }, "SASL PLAIN, one session and one sender link per connection")
