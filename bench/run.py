"""Benchmarks: Tether vs Mosquitto vs amqtt under the same load, plus the long kill -9 rig.

    .venv/bin/python -m bench.run --short        # every scenario, reduced (< 3 minutes; `make bench`)
    .venv/bin/python -m bench.run                # the full run behind docs/performance.md
    .venv/bin/python -m bench.run --only a,c     # some scenarios: a b c d durability
    .venv/bin/python -m bench.run --only a --profile   # Tether under pyinstrument (bench/.venv-tools)

Prints one table with Tether/peer ratios from the same run and the targets, and writes the raw
numbers to bench/results/last-{short|full}.json. Everything listens on 127.0.0.x only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.brokers import Broker, TetherHub, start_amqtt, start_mosquitto_tls, system_mosquitto
from bench.loadgen import raise_nofile
from bench.scenarios import Row

RESULTS = Path(__file__).resolve().parent / "results"
MODES: dict[str, dict[str, Any]] = {
    "short": {"a_devices": 100, "a_duration": 6.0, "a_warmup": 1.5, "idle": 1000, "amqp_idle": 1000,
              "storm_pool": 1000,
              "storm_duration": 6.0, "storm_warmup": 1.5, "d_devices": 100, "d_calls": 200, "kill9": None},
    "full": {"a_devices": 100, "a_duration": 20.0, "a_warmup": 3.0, "idle": 10_000, "amqp_idle": 2000,
             "storm_pool": 10_000,
             "storm_duration": 20.0, "storm_warmup": 3.0, "d_devices": 1000, "d_calls": 1000,
             "kill9": {"devices": 20, "load_s": 30.0, "cycles": 3}},
}
TARGETS = {
    "durable QoS 1 ingest >= 0.5x Mosquitto QoS 1 pub->sub and >= 5x amqtt": "a",
    "10,000 TLS connections <= 1 GiB RSS": "b",
    ">= 500 TLS+SAS connects/s": "c",
    "C2D / direct-method p99 <= 10 ms": "d",
    "AMQP durable rate >= 0.8x MQTT's (a, tls)": "e",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    from OpenSSL import SSL

    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()
    return {"cpus": len(os.sched_getaffinity(0)), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "openssl_stdlib": ssl.OPENSSL_VERSION,
            "openssl_pyopenssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
            "mosquitto": mosq[0] if mosq else "?", "kernel": platform.release(),
            "load_avg_at_start": Path("/proc/loadavg").read_text().split()[:3]}


async def run_all(mode: str, only: set[str], work: Path, *, stdlib_loop: bool, profile: bool,
                  brokers: set[str]) -> list[Row]:
    cfg = MODES[mode]
    rows: list[Row] = []
    n_devices = max(cfg["a_devices"], cfg["idle"], cfg["storm_pool"], cfg["d_devices"])
    ids = [f"bench-{i}" for i in range(n_devices)]
    profile_out = work / "tether-profile.txt" if profile else None
    hub = TetherHub(work / "tether", stdlib_loop=stdlib_loop, profile_out=profile_out)
    log(f"provisioning {n_devices} devices")
    hub.prepare(ids)
    hub.start()
    log(f"tether run: pid {hub.pid} ports {hub.ports}")
    pki = hub.data_dir / "pki"
    mosq_tls = mosq_plain = amqtt = None
    files = (pki / "server.pem", pki / "server.key", pki / "root-ca.pem")
    try:  # a missing peer leaves its column empty rather than stopping the bench
        if "mosquitto" in brokers:
            mosq_plain = system_mosquitto()
            mosq_tls = start_mosquitto_tls(work / "mosquitto", *files)
        if "amqtt" in brokers:
            amqtt = start_amqtt(work / "amqtt", *files)
    except (OSError, RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        log(f"a peer broker could not be started, continuing without it: {exc!r}")
    tether = hub.broker()
    others: list[Broker] = [b for b in (mosq_tls, amqtt) if b is not None]
    tether_windows: list[tuple[str, int, int]] = []
    try:
        if "a" in only:
            for tls in (False, True):
                runs: list[tuple[Broker | None, bool]] = [(tether, True)]
                if mode == "full":
                    runs.append((tether, False))  # ingest alone, nobody reading the stream
                runs += [(mosq_tls if tls else mosq_plain, True), (amqtt, True)]
                for broker, consumer in runs:
                    if broker is None:
                        continue
                    log(f"(a) throughput {broker.name} {'tls' if tls else 'plain'} consumer={consumer}")
                    wall = time.time_ns()
                    row = await scenarios.throughput(
                        broker, tls, ids[: cfg["a_devices"]], duration=cfg["a_duration"],
                        warmup=cfg["a_warmup"], subscriber=consumer)
                    if not consumer:
                        row.scenario = "a-throughput-no-consumer"
                        tether_windows.append((row.transport, wall + int((cfg["a_warmup"] + 0.2) * 1e9),
                                               wall + int((cfg["a_duration"] + 0.2) * 1e9)))
                    rows.append(row)
        if "e" in only:
            log(f"(e) AMQP throughput ({cfg['a_devices']} devices, TLS), {cfg['amqp_idle']} idle AMQP/TLS")
            rows.append(await scenarios.amqp_throughput(hub, ids[: cfg["a_devices"]],
                                                        duration=cfg["a_duration"], warmup=cfg["a_warmup"]))
            rows.append(await scenarios.amqp_idle(hub, ids[: cfg["amqp_idle"]]))
        if "b" in only:
            for broker in (tether, *others):
                log(f"(b) {cfg['idle']} idle TLS connections to {broker.name}")
                rows.append(await scenarios.idle(broker, ids[: cfg["idle"]],
                                                 connect_timeout=600 if mode == "full" else 120))
        if "c" in only:
            for broker in (tether, *others):
                log(f"(c) connect storm {broker.name}")
                rows.append(await scenarios.storm(broker, ids[: cfg["storm_pool"]],
                                                  duration=cfg["storm_duration"], warmup=cfg["storm_warmup"]))
        if "d" in only:
            log("(d) C2D / direct-method round trips")
            rows += await scenarios.c2d_and_methods(hub, ids[: cfg["d_devices"]], cfg["d_calls"])
    finally:
        hub.stop()
        for b in others:
            b.stop()
    for transport, since, until in tether_windows:
        extra = await scenarios.stream_latency(hub.data_dir, since, until)
        for row in rows:
            if row.scenario == "a-throughput-no-consumer" and row.transport == transport:
                row.metrics.update(extra)
    if profile_out is not None and profile_out.exists():
        dest = RESULTS / f"tether-profile-{mode}.txt"
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(profile_out, dest)
        log(f"pyinstrument profile of the hub: {dest}")
    return rows


def kill9(data_dir: Path, **kwargs: Any) -> Row:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "durability"))
    from rig import run_kill9  # tests/durability/rig.py

    log(f"kill -9 durability rig {kwargs}")
    outcome = run_kill9(data_dir, **kwargs)
    return Row("kill9-durability", "tether", "plain", {
        "cycles": outcome.cycles, "sent": outcome.sent, "acked": outcome.acked_total,
        "lost_acked": outcome.lost_total, "duplicates": outcome.duplicates,
        "stored_without_puback": outcome.unacked_stored, "out_of_order_devices": len(outcome.out_of_order),
        "served_after_restart": outcome.served_after_restart}, outcome.summary())


# ------------------------------------------------------------------------------------------ report


def _get(rows: list[Row], scenario: str, broker: str, transport: str | None = None) -> dict[str, Any]:
    for row in rows:
        if row.scenario == scenario and row.broker == broker and transport in (None, row.transport):
            return row.metrics
    return {}


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def table(rows: list[Row]) -> str:
    """Markdown; ratios are Tether/peer for rates and peer/Tether for latencies, RSS and CPU cost, so
    above 1.00x always means Tether is better."""
    lines = ["| scenario | transport | metric | Tether | Mosquitto | amqtt | Tether vs Mosquitto "
             "| Tether vs amqtt |", "|---|---|---|---|---|---|---|---|"]

    def add(scenario: str, transport: str, metric: str, key: str, t: dict[str, Any], m: dict[str, Any],
            a: dict[str, Any], lower_is_better: bool = False) -> None:
        tv, mv, av = t.get(key), m.get(key), a.get(key)
        r1, r2 = (_ratio(mv, tv), _ratio(av, tv)) if lower_is_better else (_ratio(tv, mv), _ratio(tv, av))
        lines.append(f"| {scenario} | {transport} | {metric} | {_fmt(tv)} | {_fmt(mv)} | {_fmt(av)} "
                     f"| {r1} | {r2} |")

    for transport in ("plain", "tls"):
        t, m, a = (_get(rows, "a-throughput", b, transport) for b in ("tether", "mosquitto", "amqtt"))
        if not t:
            continue
        sc = "(a) 100 dev QoS 1 256 B"
        add(sc, transport, "PUBACK/s at the publishers (Tether: durable)", "puback_per_s", t, m, a)
        add(sc, transport, "delivered/s to the consumer (peers: QoS 1 sub; Tether: SSE)", "delivered_per_s",
            t, m, a)
        add(sc, transport, "publish→PUBACK p50 ms", "puback_p50_ms", t, m, a, True)
        add(sc, transport, "publish→PUBACK p99 ms", "puback_p99_ms", t, m, a, True)
        add(sc, transport, "publish→consumer p50 ms", "e2e_p50_ms", t, m, a, True)
        add(sc, transport, "publish→consumer p99 ms", "e2e_p99_ms", t, m, a, True)
        add(sc, transport, "broker CPU % (of one core)", "broker_cpu_pct", t, m, a)
        add(sc, transport, "load generator CPU %", "client_cpu_pct", t, m, a)
        n = _get(rows, "a-throughput-no-consumer", "tether", transport)
        if n:
            for key, label in (("puback_per_s", "PUBACK/s, no consumer attached"),
                               ("puback_p99_ms", "publish→PUBACK p99 ms, no consumer"),
                               ("enqueue_p50_ms", "publish→enqueued p50 ms (stream read back)"),
                               ("enqueue_p99_ms", "publish→enqueued p99 ms (stream read back)"),
                               ("broker_cpu_pct", "broker CPU %, no consumer")):
                lines.append(f"| {sc} | {transport} | Tether {label} | {_fmt(n.get(key))} | | | | |")
    t, m, a = (_get(rows, "b-idle-tls", b) for b in ("tether", "mosquitto", "amqtt"))
    if t:
        sc = "(b) idle TLS connections"
        add(sc, "tls", "connected", "connected", t, m, a)
        add(sc, "tls", "RSS before, MiB", "rss_before_mb", t, m, a, True)
        add(sc, "tls", "RSS with the connections, MiB", "rss_after_mb", t, m, a, True)
        add(sc, "tls", "RSS per connection, KiB", "rss_per_conn_kb", t, m, a, True)
        add(sc, "tls", "ramp-up connects/s (128 concurrent)", "ramp_conn_per_s", t, m, a)
    t, m, a = (_get(rows, "c-connect-storm", b) for b in ("tether", "mosquitto", "amqtt"))
    if t:
        sc = "(c) connect storm"
        add(sc, "tls", "CONNACK 0 per s (Tether: + SAS)", "connacks_per_s", t, m, a)
        add(sc, "tls", "connect→CONNACK p50 ms", "connect_p50_ms", t, m, a, True)
        add(sc, "tls", "connect→CONNACK p99 ms", "connect_p99_ms", t, m, a, True)
        add(sc, "tls", "broker CPU %", "broker_cpu_pct", t, m, a)
        add(sc, "tls", "broker CPU ms per connect", "broker_cpu_ms_per_connect", t, m, a, True)
        add(sc, "tls", "load generator CPU %", "client_cpu_pct", t, m, a)
    e, a_tls = _get(rows, "e-amqp-throughput", "tether"), _get(rows, "a-throughput", "tether", "tls")
    if e:
        sc = "(e) 100 dev AMQP 256 B"
        for key, label in (("settled_per_s", "settled accepted/s (durable)"),
                           ("settle_p50_ms", "send→accepted p50 ms"),
                           ("settle_p99_ms", "send→accepted p99 ms"), ("broker_cpu_pct", "broker CPU %"),
                           ("client_cpu_pct", "load generator CPU %")):
            lines.append(f"| {sc} | tls | Tether {label} | {_fmt(e.get(key))} | | | | |")
        lines.append(f"| {sc} | tls | AMQP settled/s ÷ MQTT PUBACK/s (a, tls) | "
                     f"{_ratio(e.get('settled_per_s'), a_tls.get('puback_per_s'))} | | | | |")
    idle_amqp, idle_mqtt = _get(rows, "e-amqp-idle", "tether"), _get(rows, "b-idle-tls", "tether")
    if idle_amqp:
        per_conn = _fmt(idle_amqp.get("rss_per_conn_kb"))
        lines.append(f"| (e) idle AMQP/TLS connections | tls | RSS per connection, KiB "
                     f"({idle_amqp['connected']} AMQP; MQTT from (b)) | {per_conn} | | | "
                     f"MQTT: {_fmt(idle_mqtt.get('rss_per_conn_kb'))} | |")
    for row in rows:
        if row.scenario == "d-c2d-method-rtt":
            x = row.metrics
            if x.get("status") == "pending":
                lines.append(f"| (d) C2D / methods | tls | pending | {row.notes} | | | | |")
                continue
            lines.append(f"| (d) {x['kind']} round trip, {x['connected']} devices connected | tls | "
                         f"concurrency {x['concurrency']}: p50 / p99 ms, calls/s | {_fmt(x['p50_ms'])} / "
                         f"{_fmt(x['p99_ms'])}, {x['per_s']}/s | n/a | n/a | | |")
        elif row.scenario == "kill9-durability":
            lines.append(f"| kill -9 durability | plain | {row.notes} | | | | | |")
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    out = []
    for transport in ("plain", "tls"):
        t, m, a = (_get(rows, "a-throughput", b, transport) for b in ("tether", "mosquitto", "amqtt"))
        if t and m and a:
            tr = t.get("puback_per_s") or 0
            mr, ar = m.get("delivered_per_s") or 0, a.get("delivered_per_s") or 0
            ok = mr and ar and tr >= 0.5 * mr and tr >= 5 * ar
            out.append(f"(a) {transport}: Tether {tr} durable msg/s (consumer attached) vs 0.5x Mosquitto "
                       f"pub→sub {0.5 * mr:.0f}/s and 5x amqtt pub→sub {5 * ar:.0f}/s -> "
                       f"{'PASS' if ok else 'FAIL'} (amqtt PUBACK/s at its publishers: "
                       f"{a.get('puback_per_s')})")
    b = _get(rows, "b-idle-tls", "tether")
    if b.get("connected"):
        per10k = b["rss_before_mb"] + b["rss_per_conn_kb"] * 10_000 / 1024
        out.append(f"(b) {b['connected']} TLS connections: {b['rss_after_mb']} MiB "
                   f"(~{per10k:.0f} MiB at 10,000) -> {'PASS' if per10k <= 1024 else 'FAIL'}")
    c = _get(rows, "c-connect-storm", "tether")
    if c:
        out.append(f"(c) {c.get('connacks_per_s')} TLS+SAS connects/s -> "
                   f"{'PASS' if (c.get('connacks_per_s') or 0) >= 500 else 'FAIL'}")
    e, a_tls = _get(rows, "e-amqp-throughput", "tether"), _get(rows, "a-throughput", "tether", "tls")
    if e and a_tls.get("puback_per_s"):
        ratio = (e.get("settled_per_s") or 0) / a_tls["puback_per_s"]
        out.append(f"(e) AMQP {e.get('settled_per_s')} durable msg/s vs MQTT {a_tls['puback_per_s']} (tls): "
                   f"{ratio:.2f}x -> {'PASS' if ratio >= 0.8 else 'FAIL'}")
    for r in rows:
        if r.scenario != "d-c2d-method-rtt":
            continue
        if r.metrics.get("status") == "pending":
            out.append(f"(d) {r.notes}")
        elif r.metrics.get("concurrency") == 1:
            p99 = r.metrics.get("p99_ms")
            out.append(f"(d) {r.metrics['kind']}: sequential p99 {_fmt(p99)} ms -> "
                       f"{'PASS' if p99 is not None and p99 <= 10 else 'FAIL'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="reduced version of every scenario (< 3 min)")
    parser.add_argument("--only", default="a,b,c,d,e,durability", help="comma list of a,b,c,d,e,durability")
    parser.add_argument("--tether-stdlib-loop", action="store_true",
                        help="run the hub on asyncio's own loop instead of `tether run`'s uvloop")
    parser.add_argument("--profile", action="store_true", help="run the hub under pyinstrument")
    parser.add_argument("--brokers", default="tether,mosquitto,amqtt", help="which brokers (Tether always)")
    parser.add_argument("--keep", action="store_true", help="keep the temp work dir")
    args = parser.parse_args()
    mode = "short" if args.short else "full"
    only = set(args.only.split(","))
    raise_nofile()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    started = time.monotonic()
    try:
        rows: list[Row] = []
        if only & {"a", "b", "c", "d"}:
            rows = asyncio.run(run_all(mode, only, work, stdlib_loop=args.tether_stdlib_loop,
                                       profile=args.profile, brokers=set(args.brokers.split(","))))
            save(mode, rows, info, args, time.monotonic() - started)  # kept even if the rig fails
        if "durability" in only and MODES[mode]["kill9"] is not None:
            rows.append(kill9(work / "kill9", **MODES[mode]["kill9"]))  # runs its own event loops
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    report = table(rows)
    checks = verdicts(rows)
    print(f"\nTether benchmark ({mode}, {elapsed:.0f} s) on {info['cpus']} CPUs, {info['ram_gib']} GiB, "
          f"Python {info['python']}, {info['openssl_stdlib']}\n")
    print(report)
    print("\nTargets:")
    print("\n".join(f"- {c}" for c in checks))
    notes = {(row.broker, row.notes) for row in rows if row.notes and row.scenario[0] in "abc"}
    for broker, note in sorted(notes):
        print(f"note {broker}: {note}")
    out = save(mode, rows, info, args, elapsed, checks)
    print(f"\nraw results: {out}")


def save(mode: str, rows: list[Row], info: dict[str, Any], args: argparse.Namespace, elapsed: float,
         checks: list[str] | None = None) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"last-{mode}.json"
    info = dict(info, load_avg_at_end=Path("/proc/loadavg").read_text().split()[:3])
    out.write_text(json.dumps({"mode": mode, "elapsed_s": elapsed, "machine": info,
                               "stdlib_loop": args.tether_stdlib_loop, "rows": [asdict(r) for r in rows],
                               "targets": checks or verdicts(rows)}, indent=1))
    return out


if __name__ == "__main__":
    main()
