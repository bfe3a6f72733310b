"""One peer sending 10,000 refusals before authentication costs a bounded number of audit rows
(issue 14, "unauthenticated audit flooding": one client wrote 4,665 rows/s).

The flood comes from 127.0.0.91 and mixes every kind of pre-authentication refusal on every listener:
CONNECTs whose client id is not the device id, malformed usernames, a first packet that is not CONNECT
and garbage instead of MQTT (plain TCP, TLS and WebSockets), malformed HTTP requests and headers that
are not UTF-8 (HTTPS), bad AMQP protocol headers, garbage before the AMQP open and SASL exchanges that
fail before any credential check (AMQP over TLS and over WebSockets), plus wrong-signature CONNECTs
that the authenticator verifies while the peer has budget. With `limits.auth_failures_per_second` = 5
(burst 10), the peer's refusals are written one by one until its budget is spent, then in aggregate: at
most one record per second while the flood runs and one summary after it. Every refusal is still
accounted for (`suppressed` counts), and another address is not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hardening.helpers import HOSTNAME, IP, Served, sasl_init, serving
from tether.protocols.amqp import AMQP_HEADER
from tether.protocols.mqtt.codec import encode_packet
from tether.protocols.mqtt.packets import Connect
from tether.security.sas import build_token

pytestmark = pytest.mark.timeout(600)

FLOODER = "127.0.0.91"
BYSTANDER = "127.0.0.92"
RATE = 5.0  # limits.auth_failures_per_second: burst 10
TOTAL = 10_000


def connect(client_id: str, username: str, password: bytes = b"x") -> bytes:
    return encode_packet(Connect(client_id, username, password, 60, True))


def username(device_id: str) -> str:
    return f"{HOSTNAME}/{device_id}/?api-version=2021-04-12"


MQTT_REFUSALS: list[bytes] = [
    connect("not-meter", username("meter")),  # client id ≠ device id (CONNACK 2)
    connect("meter", "no-hub-in-this-username"),  # malformed username (CONNACK 4)
    connect("meter", "evil.example.com/meter/?api-version=2021-04-12"),  # another hub's host name
    b"\xc0\x00",  # PINGREQ first: the first packet must be CONNECT
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # garbage instead of MQTT
]


AMQP_REFUSALS: list[bytes] = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not an AMQP protocol header
    AMQP_HEADER + b"\x00\x00\x00\x10\x02\x00\x00\x00garbage!",  # garbage where the open belongs
    sasl_init("CRAM-MD5"),  # a mechanism we do not offer
    sasl_init("PLAIN", b"\x00meter@sas.evil\x00x"),  # another hub's user name
    sasl_init("PLAIN", b"no separators"),  # not PLAIN's format
    sasl_init("EXTERNAL"),  # no client certificate
]


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Wait for the hub to answer and close (so every attempt is refused, not abandoned by us)."""
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := await asyncio.wait_for(reader.read(4096), 30):
            data += chunk
    return data


async def mqtt_attempt(served: Served, payload: bytes, *, tls: bool) -> None:
    port = served.ports["mqtts" if tls else "mqtt"]
    reader, writer = await asyncio.open_connection(
        IP, port, ssl=served.tls() if tls else None, server_hostname="localhost" if tls else None,
        local_addr=(FLOODER, 0))
    try:
        writer.write(payload)
        await until_closed(reader)
    finally:
        writer.close()


async def amqp_attempt(served: Served, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection(IP, served.ports["amqps"], ssl=served.tls(),
                                                   server_hostname="localhost", local_addr=(FLOODER, 0))
    try:
        writer.write(payload)
        await until_closed(reader)
    finally:
        writer.close()


async def https_attempt(served: Served, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection(IP, served.ports["https"], ssl=served.tls(),
                                                   server_hostname="localhost", local_addr=(FLOODER, 0))
    try:
        writer.write(payload)
        answer = await until_closed(reader)
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), answer[:200]
    finally:
        writer.close()


async def ws_attempts(served: Served, payloads: list[tuple[str, bytes]]) -> None:
    """(subprotocol, first message) over `/$iothub/websocket`: `mqtt` or `AMQPWSB10`."""
    connector = aiohttp.TCPConnector(ssl=served.tls(), local_addr=(FLOODER, 0), limit=20)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(protocol: str, payload: bytes) -> None:
            url = f"wss://{IP}:{served.ports['https']}/$iothub/websocket"
            timeout = aiohttp.ClientWSTimeout(ws_close=30)
            async with session.ws_connect(url, protocols=(protocol,), timeout=timeout) as ws:
                await ws.send_bytes(payload)
                with contextlib.suppress(asyncio.TimeoutError):
                    async for _ in ws:  # CONNACK or the AMQP answer (if any), then the hub closes
                        pass
        await gather_bounded([lambda p=p: one(*p) for p in payloads], 20)


async def gather_bounded(work: list[Callable[[], Awaitable[Any]]], limit: int) -> None:
    gate = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[Any]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(run(job) for job in work))


def accounted(records: list[Any]) -> int:
    """Refusals the records stand for: every record that is not a summary, plus what each one says it
    suppressed (`tether.security.throttle`)."""
    return sum(1 for r in records if not r.details.get("summary")) + sum(
        int(r.details.get("suppressed", 0)) for r in records)


async def peer_records(served: Served, ip: str) -> list[Any]:
    await served.hub.audit.flush()
    records = await served.hub.audit.query(limit=10_000)
    return [r for r in records if (r.peer or "").startswith(f"{ip}:") and r.outcome == "refused"]


async def test_ten_thousand_pre_auth_refusals_from_one_peer_write_a_bounded_number_of_rows(
        tmp_path: Path) -> None:
    async with serving(tmp_path / "hub", limits={"auth_failures_per_second": RATE}) as served:
        await served.device("meter")
        wrong_key = build_token(f"{HOSTNAME}/devices/meter", "AAAA" * 11, int(time.time()) + 3600).encode()
        https_bad = [b"GET /he\x00lthz HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00\r\n\r\n",
                     b"POST /devices/meter/messages/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"iothub-messageid: \xff\xfe\r\nContent-Length: 0\r\n\r\n"]
        jobs: list[Callable[[], Awaitable[Any]]] = []
        # + 500 over WebSockets: 400 MQTT, 100 AMQP
        counts = {"mqtt": 7_900, "mqtts": 300, "bad-signature": 300, "https": 600, "amqps": 400}
        for n in range(counts["mqtt"]):
            jobs.append(lambda n=n: mqtt_attempt(served, MQTT_REFUSALS[n % len(MQTT_REFUSALS)], tls=False))
        for n in range(counts["mqtts"]):
            jobs.append(lambda n=n: mqtt_attempt(served, MQTT_REFUSALS[n % len(MQTT_REFUSALS)], tls=True))
        bad_signature = connect("meter", username("meter"), wrong_key)
        for _ in range(counts["bad-signature"]):
            jobs.append(lambda: mqtt_attempt(served, bad_signature, tls=False))
        for n in range(counts["https"]):
            jobs.append(lambda n=n: https_attempt(served, https_bad[n % len(https_bad)]))
        for n in range(counts["amqps"]):
            jobs.append(lambda n=n: amqp_attempt(served, AMQP_REFUSALS[n % len(AMQP_REFUSALS)]))
        over_ws = TOTAL - sum(counts.values())
        ws_payloads = [("mqtt", MQTT_REFUSALS[n % len(MQTT_REFUSALS)]) for n in range(over_ws - 100)] + [
            ("AMQPWSB10", AMQP_REFUSALS[n % len(AMQP_REFUSALS)]) for n in range(100)]

        started = time.monotonic()
        await asyncio.gather(gather_bounded(jobs, 40), ws_attempts(served, ws_payloads))
        elapsed = time.monotonic() - started

        # the hub's sweep writes the last counts once the peer has been quiet for a second
        deadline = time.monotonic() + 30
        while accounted(records := await peer_records(served, FLOODER)) < TOTAL:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        burst = 2 * RATE
        # The budget one by one, the episode's first record, then at most one per second and a summary;
        # a stall of the flood longer than burst/rate (2 s) on a busy machine may end the episode once.
        bound = 2 * burst + 1 + math.ceil(elapsed) + 3
        print(f"\n{TOTAL} pre-auth refusals from one peer in {elapsed:.1f} s wrote {len(records)} audit rows "
              f"(bound {bound:.0f})")
        assert accounted(records) == TOTAL, "every refusal is accounted for"
        assert len(records) <= bound, (len(records), elapsed)
        reasons = {r.reason for r in records} | {k for r in records for k in r.details.get("reasons", {})}
        assert {"client-id-mismatch", "bad-username", "malformed-request", "bad-protocol-header",
                "decode-error", "unsupported-mechanism", "wrong-hub", "bad-sasl-plain",
                "no-client-certificate"} <= reasons, reasons
        actions = {r.action for r in records}
        assert {"mqtt.connect", "https.request", "amqp.connect"} <= actions, actions

        # another address still gets in (its budget is its own)
        reader, writer = await asyncio.open_connection(IP, served.ports["mqtt"], local_addr=(BYSTANDER, 0))
        token = await served.device("bystander")
        writer.write(connect("bystander", username("bystander"), token.encode()))
        assert await asyncio.wait_for(reader.readexactly(4), 30) == b"\x20\x02\x00\x00"
        writer.close()
