"""Scale-out ingest: QoS 1 telemetry throughput of 1 vs 2 hub nodes, and CPU per message of the
embedded backends vs PostgreSQL + NATS JetStream.

    .venv/bin/python -m bench.cluster_ingest                 # embedded-1, scaleout-1, scaleout-2
    .venv/bin/python -m bench.cluster_ingest --duration 10 --devices 200
    .venv/bin/python -m bench.cluster_ingest --only embedded-1 --idle 2000   # + RSS per connection

Each configuration starts `tether run` processes (plain MQTT on 127.0.0.1, ephemeral ports) through
the `tether cluster` helpers, provisions the devices, and drives them with `bench.loadgen` (one worker
per node, each device keeping `window` QoS 1 messages in flight). Reported per configuration: PUBACKs/s,
PUBACK p50/p99, and CPU per message of the hub processes and of nats-server (the stream's cost that the
embedded log pays inside the hub). The scale-out runs use a fresh PostgreSQL database and uniquely named
JetStream streams / buckets / cluster subjects, deleted afterwards. Writes bench/results/cluster-ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.brokers import BENCH_KEY, HOSTNAME, Broker, cpu_seconds
from bench.loadgen import LoadRun, raise_nofile, split
from tether.cli.cluster import NodeProcess, NodeSpec, prepare_storage, stop_all, write_node_config
from tether.config import load_settings
from tether.security import pki

RESULTS = Path(__file__).resolve().parent / "results"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
NATS_URL = "nats://127.0.0.1:4222"


def _pids_named(name: str) -> list[int]:
    """Processes whose executable name is `name` (read from /proc; nothing is signalled)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if stat.read_text().strip() == name:
                pids.append(int(stat.parent.name))
    return pids


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _nats_cleanup(stream: str, buckets: list[str], partitions: int) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream(timeout=10)
        for p in range(partitions):
            with contextlib.suppress(Exception):
                await js.delete_stream(f"{stream}_P{p}")
        for bucket in buckets:
            with contextlib.suppress(Exception):
                await js.delete_key_value(bucket)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def cluster_nodes(name: str, nodes: int, scaleout: bool, root: Path, devices: list[str],
                        *, bus: bool = True) -> AsyncIterator[tuple[list[NodeProcess], Path]]:
    """`nodes` running `tether run` processes with `devices` provisioned; (processes, root CA)."""
    suffix = secrets.token_hex(3)
    db = f"bench_cluster_{suffix}"
    stream, prefix = f"BCI_{suffix.upper()}", f"bci_{suffix}"
    storage: dict[str, Any] = {"stream_partitions": 4}
    cluster: dict[str, Any] = {}
    if scaleout:
        await _pg(f'CREATE DATABASE "{db}"')
        storage.update(database_url=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db}",
                       stream_url=f"{NATS_URL}?stream={stream}&bucket={prefix}_cp")
        cluster = {"nats_url": NATS_URL, "subject_prefix": prefix} if bus else {}
    files = pki.init_pki(root / "pki", ["localhost"], ["127.0.0.1"])
    tls = {"cert_file": str(root / "pki" / "server.pem"), "key_file": str(root / "pki" / "server.key")}
    procs: list[NodeProcess] = []
    for i in range(nodes):
        data = root / name / f"node-{i}"
        spec = NodeSpec(f"node-{i}", data, {
            "hub": {"hostname": HOSTNAME, "data_dir": str(data)},
            "listeners": {"host": "127.0.0.1", "https_port": 0, "mqtt_port": 0, "mqtt_plain_port": 0},
            "tls": tls,
            "limits": {"device_messages_per_second": 1_000_000.0, "max_connections": 100_000},
            "storage": storage,
            "cluster": {**cluster, "node_id": f"node-{i}"} if cluster else {},
        })
        write_node_config(spec)
        procs.append(NodeProcess(spec))
    try:
        settings = load_settings(hub={"hostname": HOSTNAME, "data_dir": root / name / "node-0"},
                                 storage=storage)
        await prepare_storage(settings, create_database=False)
        await _provision(settings, devices)
        for proc in procs:
            proc.start()
        for proc in procs:
            await asyncio.get_running_loop().run_in_executor(None, proc.wait_ready, 60.0)
        yield procs, files.root_cert
    finally:
        stop_all(procs)
        if scaleout:
            await _nats_cleanup(stream, [f"{prefix}_cp", f"{prefix}_presence", f"{prefix}_sessions"], 4)
            await _pg(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _broker(proc: NodeProcess, ca: Path) -> Broker:
    assert proc.proc is not None
    return Broker("tether", "127.0.0.1", proc.ports["mqtt"], proc.ports["mqtts"], ca, proc.proc.pid,
                  {"kind": "sas", "hostname": HOSTNAME, "key": BENCH_KEY})


async def run_config(name: str, nodes: int, scaleout: bool, root: Path,
                     args: argparse.Namespace) -> dict[str, Any]:
    devices = [f"bench-{i:05d}" for i in range(args.devices)]
    async with cluster_nodes(name, nodes, scaleout, root, devices) as (procs, ca):
        specs = [dict(_broker(proc, ca).spec(False), mode="publish", devices=part, qos=1,
                      payload=args.payload, window=args.window, connect_concurrency=50)
                 for proc, part in zip(procs, split(devices, nodes), strict=True)]
        run = LoadRun(specs)
        await run.start()
        hub_pids = [p.proc.pid for p in procs if p.proc is not None]
        nats_pids = _pids_named("nats-server") if scaleout else []
        cpu = asyncio.create_task(_cpu_window(hub_pids + nats_pids, args.warmup, args.duration))
        result = await run.run(args.warmup, args.duration)
        used = await cpu
    hub_cpu = sum(used.get(p, 0.0) for p in hub_pids)
    nats_cpu = sum(used.get(p, 0.0) for p in nats_pids)
    acked = max(result.acked, 1)
    return {
        "config": name, "nodes": nodes, "devices": len(devices), "window_s": result.window_s,
        "puback_per_s": round(result.ack_rate),
        "puback_p50_ms": _ms(result.ack_latency.percentile_ms(50)),
        "puback_p99_ms": _ms(result.ack_latency.percentile_ms(99)),
        "hub_cpu_us_per_msg": round(hub_cpu / acked * 1e6, 1),
        "nats_cpu_us_per_msg": round(nats_cpu / acked * 1e6, 1) if scaleout else None,
        "total_cpu_us_per_msg": round((hub_cpu + nats_cpu) / acked * 1e6, 1),
        "hub_cpu_pct": round(hub_cpu / result.window_s * 100),
        "client_cpu_pct": round(result.client_cpu_s / result.window_s * 100),
        "errors": {k: v for k, v in result.errors.items() if v},
    }


async def run_idle(name: str, scaleout: bool, root: Path, count: int, *, bus: bool = True) -> dict[str, Any]:
    """RSS per idle TLS connection of one node (`bench.scenarios.idle`), with or without the bus."""
    devices = [f"idle-{i:06d}" for i in range(count)]
    async with cluster_nodes(f"{name}-idle", 1, scaleout, root, devices, bus=bus) as (procs, ca):
        row = await scenarios.idle(_broker(procs[0], ca), devices, workers=2, hold=3.0)
    return {"config": name, **row.metrics}


async def _provision(settings: Any, devices: list[str]) -> None:
    from tether.cli.local import LocalServices

    services = LocalServices(settings)
    await services.open(ensure_defaults=True)
    try:
        records = [{"deviceId": d, "authentication": {"type": "sas", "symmetricKey": {
            "primaryKey": BENCH_KEY, "secondaryKey": BENCH_KEY}}} for d in devices]
        await services.registry.import_devices(records, actor="bench")
    finally:
        await services.close()


async def _cpu_window(pids: list[int], warmup: float, duration: float) -> dict[int, float]:
    """CPU seconds each pid used in the measured window (LoadRun starts 0.2 s after being told)."""
    await asyncio.sleep(0.2 + warmup)
    before = {p: cpu_seconds(p) for p in pids}
    await asyncio.sleep(duration - warmup)
    return {p: cpu_seconds(p) - before[p] for p in pids}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--window", type=int, default=10, help="QoS 1 messages in flight per device")
    parser.add_argument("--payload", type=int, default=256)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--only", default="embedded-1,scaleout-1,scaleout-2")
    parser.add_argument("--idle", type=int, default=0,
                        help="also: RSS per idle TLS connection and connect rate with this many "
                             "devices (1 node: embedded, PostgreSQL+JetStream without and with the bus)")
    args = parser.parse_args()
    raise_nofile()
    configs = {"embedded-1": (1, False), "scaleout-1": (1, True), "scaleout-2": (2, True)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tether-cluster-bench-") as tmp:
        for name in [n for n in args.only.split(",") if n]:
            nodes, scaleout = configs[name]
            began = time.monotonic()
            row = await run_config(name, nodes, scaleout, Path(tmp), args)
            row["elapsed_s"] = round(time.monotonic() - began, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
        idle = []
        if args.idle:
            for name, scaleout, bus in (("embedded-1", False, False), ("scaleout-1-nobus", True, False),
                                        ("scaleout-1", True, True)):
                idle.append(await run_idle(name, scaleout, Path(tmp), args.idle, bus=bus))
                print(json.dumps(idle[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster-ingest.json").write_text(json.dumps({"args": vars(args), "rows": rows, "idle": idle},
                                                                 indent=1))
    print(f"{'config':12s} {'nodes':>5s} {'PUBACK/s':>9s} {'p50 ms':>7s} {'p99 ms':>7s} "
          f"{'hub µs/msg':>10s} {'nats µs/msg':>11s} {'total µs/msg':>12s}")
    for r in rows:
        print(f"{r['config']:12s} {r['nodes']:5d} {r['puback_per_s']:9d} {r['puback_p50_ms']!s:>7s} "
              f"{r['puback_p99_ms']!s:>7s} {r['hub_cpu_us_per_msg']:10.1f} {r['nats_cpu_us_per_msg']!s:>11s} "
              f"{r['total_cpu_us_per_msg']:12.1f}")


if __name__ == "__main__":
    asyncio.run(main())
