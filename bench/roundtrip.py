"""Scenario (d): cloud-to-device and direct-method round trips through the service REST API while
many devices are connected over MQTT/TLS.

Direct method: `POST /twins/{id}/methods` (Azure's shape) → the hub publishes
`$iothub/methods/POST/{name}/?$rid=…` → the device answers `$iothub/methods/res/200/?$rid=…` → the
HTTP response; the round trip is the HTTP call. C2D: the first POST route of
`tether.api.c2d_routes.C2D_ROUTES` whose path mentions `devicebound`, with a stamped payload; the
round trip is HTTP send → MQTT delivery at the device. Only run when those modules exist.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import ssl
import time
from typing import Any

from bench.brokers import BENCH_KEY, HOSTNAME, TetherHub
from bench.mqttclient import STAMP, Histogram, MqttClient, open_client, sas_password
from tether.protocols.mqtt.packets import Publish
from tether.security.connstr import ServiceConnectionString
from tether.security.sas import build_token

RID = re.compile(r"\$rid=([^&]+)")


def _service_token(hub: TetherHub) -> str:
    cs = ServiceConnectionString.parse(hub.service_connection_string)
    return build_token(cs.host_name, cs.shared_access_key, int(time.time()) + 3600, cs.shared_access_key_name)


def _c2d_path() -> str | None:
    module = importlib.import_module("tether.api.c2d_routes")
    for entry in getattr(module, "C2D_ROUTES", ()):
        method, path = (entry[0], entry[1]) if isinstance(entry, tuple) else (entry.method, entry.path)
        if method == "POST" and "devicebound" in path.lower():
            return str(path)
    return None


async def method_and_c2d_round_trips(hub: TetherHub, devices: list[str], *, calls: int = 500,
                                     concurrency: int = 16) -> list[dict[str, Any]]:
    """Sequential calls (latency: the target's p99) then `concurrency` at once (throughput and
    latency under load), for direct methods and C2D, with every device in `devices` connected."""
    import aiohttp

    ctx = ssl.create_default_context(cafile=str(hub.ca_file))
    c2d_hist: list[Histogram] = [Histogram()]
    clients: dict[str, MqttClient] = {}

    def on_message(client: MqttClient, packet: Publish) -> None:
        if packet.topic.startswith("$iothub/methods/POST/"):
            match = RID.search(packet.topic)
            if match:
                client.queue_publish(f"$iothub/methods/res/200/?$rid={match.group(1)}", b'{"ok":true}', 0)
        elif "/messages/devicebound/" in packet.topic and len(packet.payload) >= STAMP.size:
            c2d_hist[0].add_ns(time.monotonic_ns() - STAMP.unpack_from(packet.payload)[0])

    gate = asyncio.Semaphore(64)

    async def connect(device_id: str) -> None:
        async with gate:
            client, code = await open_client(
                "127.0.0.1", hub.ports["mqtts"], device_id,
                username=f"{HOSTNAME}/{device_id}/?api-version=2021-04-12",
                password=sas_password(HOSTNAME, device_id, BENCH_KEY), ssl_context=ctx,
                server_hostname="localhost")
            if code == 0:
                client.on_message = on_message
                await client.subscribe("$iothub/methods/POST/#")
                await client.subscribe(f"devices/{device_id}/messages/devicebound/#")
                clients[device_id] = client

    await asyncio.gather(*(connect(d) for d in devices))
    ids = list(clients)
    base = f"https://127.0.0.1:{hub.ports['https']}"
    headers = {"Authorization": _service_token(hub)}
    errors: dict[str, int] = {}
    c2d_path = _c2d_path()
    results: list[dict[str, Any]] = []

    def error(key: str) -> None:
        errors[key] = errors.get(key, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=concurrency)) as http:
        async def method_call(i: int, hist: Histogram) -> None:
            body = {"methodName": "ping", "payload": {"i": i}, "responseTimeoutInSeconds": 10}
            started = time.monotonic_ns()
            async with http.post(f"{base}/twins/{ids[i % len(ids)]}/methods?api-version=2021-04-12",
                                 json=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 200:
                    hist.add_ns(time.monotonic_ns() - started)
                else:
                    error(f"method-{resp.status}")

        async def c2d_call(i: int, _hist: Histogram) -> None:
            assert c2d_path is not None
            payload = STAMP.pack(time.monotonic_ns(), time.time_ns(), i) + b"c" * 64
            path = c2d_path.replace("{id}", ids[i % len(ids)]).replace("{deviceId}", ids[i % len(ids)])
            async with http.post(f"{base}{path}?api-version=2021-04-12", data=payload,
                                 headers={**headers, "Content-Type": "application/octet-stream"}) as resp:
                await resp.read()
                if resp.status >= 300:
                    error(f"c2d-{resp.status}")

        async def drive(kind: str, call: Any, parallel: int) -> None:
            hist = Histogram()
            c2d_hist[0] = Histogram()
            sem = asyncio.Semaphore(parallel)

            async def one(i: int) -> None:
                async with sem:
                    try:
                        await call(i, hist)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        error(type(exc).__name__)

            started = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(calls)))
            elapsed = time.monotonic() - started
            if kind == "c2d":
                await asyncio.sleep(2.0)  # deliveries still on their way
                hist = c2d_hist[0]
            results.append({"kind": kind, "concurrency": parallel, "connected": len(ids), "calls": calls,
                            "per_s": round(calls / elapsed), "p50_ms": hist.percentile_ms(50),
                            "p99_ms": hist.percentile_ms(99), "completed": hist.total,
                            "errors": dict(errors)})
            errors.clear()

        for parallel in (1, concurrency):
            await drive("direct-method", method_call, parallel)
            if c2d_path is not None:
                await drive("c2d", c2d_call, parallel)
    for client in clients.values():
        client.disconnect()
    return results
