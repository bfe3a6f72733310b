"""Abuse of a running `tether run` process while a well-behaved device keeps publishing.

One hub (subprocess, TLS + plain MQTT, `connect_timeout_s` 1.5 s) takes, one after another:
300 sockets that never send CONNECT, oversized remaining lengths before and after CONNECT,
100 half-open TLS handshakes, and a flood of bad passwords from one peer address. Each must be
refused the way the hub promises (closed after the timeout, closed at once without buffering,
CONNACK 4 + an audit record), the good device must keep getting PUBACKs without a gap, and the hub's
RSS must stay bounded. Per-peer rate limiting of authentication failures
(`limits.auth_failures_per_second`, 20/s here) must cap the full authentications of a flooding
address without touching other addresses, and every refusal must be accounted in the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.brokers import BENCH_KEY, HOSTNAME, TetherHub, rss_mb
from bench.mqttclient import MqttClient, open_client, sas_password
from tether.protocols.mqtt.codec import encode_packet
from tether.protocols.mqtt.packets import Connect
from tether.security.connstr import ServiceConnectionString
from tether.security.sas import build_token

CONNECT_TIMEOUT_S = 1.5
AUTH_FAILURES_PER_S = 20.0
OTHER_KEY = "b3RoZXItb3RoZXItb3RoZXItb3RoZXItb3RoZXIhISE="
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TetherHub]:
    h = TetherHub(Path(tmp_path_factory.mktemp("abuse")) / "hub",
                  limits={"connect_timeout_s": CONNECT_TIMEOUT_S,
                          "auth_failures_per_second": AUTH_FAILURES_PER_S})
    h.prepare(["good-device", "victim", *(f"flood-{i}" for i in range(5))])
    h.start()
    try:
        yield h
    finally:
        h.stop()


def user(device_id: str) -> str:
    return f"{HOSTNAME}/{device_id}/?api-version=2021-04-12"


class GoodDevice:
    """Publishes QoS 1 every 20 ms and records when each PUBACK arrived."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.ack_times: list[float] = []
        client.on_ack = lambda c, pid: self.ack_times.append(time.monotonic())
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self.client.is_open():
            self.client.queue_publish("devices/good-device/messages/events/", b"still here", 1)
            self.client.flush()
            await asyncio.sleep(0.02)

    def longest_gap(self, since: float) -> float:
        times = [since] + [t for t in self.ack_times if t >= since] + [time.monotonic()]
        return max(b - a for a, b in itertools.pairwise(times))


@pytest.fixture
async def good(hub: TetherHub) -> AsyncIterator[GoodDevice]:
    client, code = await open_client(
        "127.0.0.1", hub.ports["mqtt"], "good-device", username=user("good-device"),
        password=sas_password(HOSTNAME, "good-device", BENCH_KEY))
    assert code == 0
    device = GoodDevice(client)
    try:
        yield device
    finally:
        device.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await device.task
        assert client.is_open(), "the well-behaved device was disconnected"
        client.disconnect()


def audit(hub: TetherHub, **params: Any) -> list[dict[str, Any]]:
    cs = ServiceConnectionString.parse(hub.service_connection_string)
    token = build_token(cs.host_name, cs.shared_access_key, int(time.time()) + 600, cs.shared_access_key_name)
    response = httpx.get(f"https://127.0.0.1:{hub.ports['https']}/tether/audit",
                         params={"limit": 1000, **params}, headers={"Authorization": token},
                         verify=ssl.create_default_context(cafile=str(hub.ca_file)), timeout=30)
    response.raise_for_status()
    return list(response.json())


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> float | None:
    """Seconds until the hub closed the connection (EOF or reset), None if still open at `timeout`."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), timeout - (time.monotonic() - started)):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    except TimeoutError:
        return None
    return time.monotonic() - started


def tls_context(hub: TetherHub) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(hub.ca_file))


async def test_silent_sockets_are_closed_after_the_connect_timeout(hub: TetherHub, good: GoodDevice) -> None:
    started = time.monotonic()
    rss_before = rss_mb(hub.pid)
    source = ("127.0.0.98", 0)  # their refusals are charged to this address, not the good device's
    plain = [await asyncio.open_connection("127.0.0.1", hub.ports["mqtt"], local_addr=source)
             for _ in range(300)]
    tls = [await asyncio.open_connection("127.0.0.1", hub.ports["mqtts"], ssl=tls_context(hub),
                                         server_hostname="localhost", local_addr=source) for _ in range(20)]
    waits = await asyncio.gather(*(closed_within(r, CONNECT_TIMEOUT_S + 5) for r, _ in plain + tls))
    assert all(w is not None for w in waits), f"{sum(w is None for w in waits)} sockets still open"
    assert max(w for w in waits if w is not None) < CONNECT_TIMEOUT_S + 3
    for _, writer in plain + tls:
        writer.close()
    # Every timeout is accounted for; past the peer's failure budget (burst 40) they are aggregated.
    deadline = time.monotonic() + 10
    while True:
        records = [r for r in audit(hub, action="mqtt.connect", outcome="refused")
                   if (r["peer"] or "").startswith("127.0.0.98:")]
        if _accounted(records, "connect-timeout") >= 320 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert _accounted(records, "connect-timeout") == 320
    assert len(records) < 2 * AUTH_FAILURES_PER_S + 20, len(records)
    assert good.longest_gap(started) < 1.0
    assert rss_mb(hub.pid) - rss_before < 100


@pytest.mark.parametrize("after_connect", [False, True], ids=["before-connect", "after-connect"])
async def test_oversized_remaining_length_is_refused_at_once(hub: TetherHub, good: GoodDevice,
                                                            after_connect: bool) -> None:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.ports["mqtt"])
    if after_connect:
        connect = Connect("flood-0", user("flood-0"),
                          sas_password(HOSTNAME, "flood-0", BENCH_KEY), 60, False)
        writer.write(encode_packet(connect))
        assert await reader.readexactly(4) == b"\x20\x02\x00\x00"
        writer.write(b"\x32\xff\xff\xff\x7f")  # PUBLISH QoS 1 announcing 268,435,455 bytes
    else:
        writer.write(b"\x10\xff\xff\xff\x7f")  # CONNECT announcing 268,435,455 bytes
    with contextlib.suppress(ConnectionError):
        writer.write(b"\x00" * 65536)  # the body starts: must not be buffered
        await writer.drain()
    waited = await closed_within(reader, CONNECT_TIMEOUT_S)
    assert waited is not None and waited < 0.5, "not closed at once"
    writer.close()
    refused = audit(hub, action="mqtt.protocol" if after_connect else "mqtt.connect", outcome="refused")
    assert any(r["reason"] == "packet-too-large" for r in refused)
    assert good.longest_gap(started) < 1.0


async def test_half_open_tls_handshakes_are_closed_after_the_timeout(hub: TetherHub,
                                                                    good: GoodDevice) -> None:
    started = time.monotonic()
    conns = [await asyncio.open_connection("127.0.0.1", hub.ports["mqtts"]) for _ in range(100)]
    for i, (_, writer) in enumerate(conns):
        if i % 2:  # the first bytes of a TLS 1.2/1.3 ClientHello record, then silence
            writer.write(bytes.fromhex("160301020001") + b"\x00" * 8)
    waits = await asyncio.gather(*(closed_within(r, CONNECT_TIMEOUT_S + 5) for r, _ in conns))
    assert all(w is not None and w < CONNECT_TIMEOUT_S + 3 for w in waits), waits
    assert min(w for w in waits if w is not None) > CONNECT_TIMEOUT_S * 0.8
    for _, writer in conns:
        writer.close()
    assert good.longest_gap(started) < 1.0


async def _bad_password_flood(hub: TetherHub, attempts: int, source_ip: str) -> tuple[dict[str, int], float]:
    password = sas_password(HOSTNAME, "victim", OTHER_KEY)  # right device, wrong key
    outcomes: dict[str, int] = {}
    gate = asyncio.Semaphore(30)

    async def attempt() -> None:
        async with gate:
            try:
                client, code = await open_client(
                    "127.0.0.1", hub.ports["mqtt"], "victim", username=user("victim"),
                    password=password, local_ip=source_ip, timeout=10)
                client.abort()
                key = f"connack-{code}"
            except (ConnectionError, OSError, TimeoutError) as exc:
                key = type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(attempt() for _ in range(attempts)))
    return outcomes, time.monotonic() - started


def _peer_records(hub: TetherHub, source_ip: str) -> list[dict[str, Any]]:
    return [r for r in audit(hub, action="auth.mqtt", outcome="refused")
            if (r["peer"] or "").startswith(f"{source_ip}:")]


def _accounted(records: list[dict[str, Any]], reason: str | None = None) -> int:
    """Refusals (of `reason`, or all) the audit log accounts for: past a peer's failure budget they are
    aggregated (`tether.security.throttle`): records that are not summaries, plus the counts each
    record says it stands for (`suppressed`, per reason in `reasons`)."""
    written = sum(1 for r in records if not r["details"].get("summary") and reason in (None, r["reason"]))
    if reason is None:
        return written + sum(int(r["details"].get("suppressed", 0)) for r in records)
    return written + sum(int((r["details"].get("reasons") or {}).get(reason, 0)) for r in records)


async def test_bad_password_flood_is_refused_and_audited(hub: TetherHub, good: GoodDevice) -> None:
    started = time.monotonic()
    rss_before = rss_mb(hub.pid)
    outcomes, _ = await _bad_password_flood(hub, 300, "127.0.0.51")
    assert outcomes.get("connack-0", 0) == 0
    # Refused with CONNACK 4 (bad signature or, once throttled, before any lookup), or closed.
    assert sum(outcomes.values()) == 300 and set(outcomes) <= {"connack-4", "connack-5", "connack-3",
                                                              "ConnectionError", "OSError"}, outcomes
    records = _peer_records(hub, "127.0.0.51")
    assert {r["reason"] for r in records} <= {"bad-signature", "auth-rate-limited"}
    assert {r["target"] for r in records} <= {"victim", None}
    assert any(r["reason"] == "bad-signature" for r in records)
    # Throttled refusals are written in aggregate; the hub's sweep writes the last episode's count
    # once the flood has been quiet for a second, without the peer trying again.
    deadline = time.monotonic() + 5
    while (accounted := _accounted(_peer_records(hub, "127.0.0.51"))) < 300 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert accounted == 300
    assert good.longest_gap(started) < 1.0
    assert rss_mb(hub.pid) - rss_before < 100


async def test_auth_failures_are_rate_limited_per_peer(hub: TetherHub, good: GoodDevice) -> None:
    """`limits.auth_failures_per_second`: a flooding address gets at most its budget of full
    authentications (burst 2 x rate, then rate per second); other addresses are not affected."""
    started = time.monotonic()
    outcomes, elapsed = await _bad_password_flood(hub, 200, "127.0.0.52")
    assert outcomes.get("connack-0", 0) == 0
    verified = sum(r["reason"] == "bad-signature" for r in _peer_records(hub, "127.0.0.52"))
    allowed = 2 * AUTH_FAILURES_PER_S + AUTH_FAILURES_PER_S * (elapsed + 1.0)
    assert outcomes.get("connack-3", 0) >= 1, f"throttled CONNECTs answer 3 (server unavailable): {outcomes}"
    assert 1 <= verified <= allowed, (
        f"{verified} bad-password CONNECTs from one peer got full authentication in {elapsed:.1f}s "
        f"(limit {AUTH_FAILURES_PER_S}/s): {outcomes}")
    client, code = await open_client(
        "127.0.0.1", hub.ports["mqtt"], "flood-1", username=user("flood-1"),
        password=sas_password(HOSTNAME, "flood-1", BENCH_KEY), local_ip="127.0.0.53")
    assert code == 0, "another address must not be throttled"
    client.disconnect()
    assert good.longest_gap(started) < 1.0
