"""A lean asyncio MQTT 3.1.1 client for load generation, built on Tether's sans-I/O codec (client role).

One `asyncio.Protocol` per connection, no task per message: PUBACKs drive the next publish from
`data_received`, and everything a read produces is written back in one `transport.write`, so the
client spends as little CPU per message as Python allows (the bench reports that CPU). Used by
`bench/loadgen.py` and by the durability and abuse tests.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.protocols.mqtt.codec import (
    NEED_DATA,
    MqttConnection,
    ProtocolError,
    encode_puback,
    encode_publish,
)
from tether.protocols.mqtt.packets import ConnAck, Connect, PingResp, PubAck, Publish, SubAck, Subscribe
from tether.security.sas import build_token

STAMP = struct.Struct("<qqq")  # monotonic ns at send, wall-clock ns at send, sequence number


class Histogram:
    """Latency histogram with 1 % wide logarithmic buckets over microseconds; mergeable across workers."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0

    def add_ns(self, ns: int) -> None:
        us = ns / 1000.0
        bucket = int(math.log(us) * 100.0) if us > 1.0 else 0
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1

    def merge(self, other: Histogram) -> None:
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n
        self.total += other.total

    def percentile_ms(self, p: float) -> float | None:
        if not self.total:
            return None
        wanted = max(1, math.ceil(self.total * p / 100.0))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= wanted:
                return math.exp((bucket + 0.5) / 100.0) / 1000.0
        return None

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> Histogram:
        h = cls()
        for k, v in data.items():
            h.counts[int(k)] = v
            h.total += v
        return h


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """A device-like TLS client: verifies the server against the given root (or the system store)."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    return ctx


def sas_password(hostname: str, device_id: str, key: str, ttl: int = 3600) -> bytes:
    return build_token(f"{hostname}/devices/{device_id}", key, int(time.time()) + ttl).encode()


def telemetry_topic(device_id: str) -> str:
    return f"devices/{device_id}/messages/events/"


def stamped_payload(size: int, seq: int) -> bytes:
    head = STAMP.pack(time.monotonic_ns(), time.time_ns(), seq)
    return head + b"p" * max(0, size - len(head))


@dataclass
class Counters:
    """What one worker measures; `window` is the (start, end) monotonic-ns interval that counts."""

    window: tuple[int, int] = (0, 1 << 62)
    sent: int = 0
    acked: int = 0
    received: int = 0
    ack_latency: Histogram = field(default_factory=Histogram)
    e2e_latency: Histogram = field(default_factory=Histogram)
    errors: dict[str, int] = field(default_factory=dict)

    def in_window(self, now: int) -> bool:
        return self.window[0] <= now < self.window[1]

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class MqttClient(asyncio.Protocol):
    """One MQTT connection. Call `open()`, then `publish_*`/`subscribe`; callbacks run in the loop."""

    def __init__(self, counters: Counters | None = None) -> None:
        self.codec = MqttConnection("client", max_packet_size=1 << 20)
        self.counters = counters or Counters()
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[int] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        self._out: list[bytes] = []
        self._next_pid = 0
        self.inflight: dict[int, int] = {}  # packet id -> monotonic ns at send
        self.on_ack: Callable[[MqttClient, int], None] | None = None  # (client, packet id)
        self.on_message: Callable[[MqttClient, Publish], None] | None = None
        self.ack_publishes = True
        self.acks: list[int] = []  # packet ids PUBACKed, in order (kept only when `keep_acks`)
        self.keep_acks = False

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        for fut in self._subacks.values():
            if not fut.done():
                fut.set_exception(ConnectionError("closed before SUBACK"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        codec = self.codec
        codec.receive_data(data)
        counters = self.counters
        try:
            while (packet := codec.next_event()) is not NEED_DATA:
                kind = type(packet)
                if kind is PubAck:
                    pid = packet.packet_id  # type: ignore[union-attr]
                    sent = self.inflight.pop(pid, None)
                    if sent is not None:
                        now = time.monotonic_ns()
                        if counters.in_window(now):
                            counters.acked += 1
                            counters.ack_latency.add_ns(now - sent)
                    if self.keep_acks:
                        self.acks.append(pid)
                    if self.on_ack is not None:
                        self.on_ack(self, pid)
                elif kind is Publish:
                    self._on_publish(packet)  # type: ignore[arg-type]
                elif kind is ConnAck:
                    if not self.connack.done():
                        self.connack.set_result(packet.return_code)  # type: ignore[union-attr]
                elif kind is SubAck:
                    fut = self._subacks.pop(packet.packet_id, None)  # type: ignore[union-attr]
                    if fut is not None and not fut.done():
                        fut.set_result(packet.return_codes)  # type: ignore[union-attr]
                elif kind is not PingResp:
                    counters.error(f"unexpected-{kind.__name__}")
        except ProtocolError as exc:
            counters.error(f"protocol-{exc.reason}")
            self.abort()
            return
        self.flush()

    def _on_publish(self, packet: Publish) -> None:
        counters = self.counters
        now = time.monotonic_ns()
        if counters.in_window(now):
            counters.received += 1
            if len(packet.payload) >= STAMP.size:
                counters.e2e_latency.add_ns(now - STAMP.unpack_from(packet.payload)[0])
        if packet.qos and packet.packet_id is not None and self.ack_publishes:
            self._out.append(encode_puback(packet.packet_id))
        if self.on_message is not None:
            self.on_message(self, packet)

    # --- output ---------------------------------------------------------------------------------
    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            out = self._out
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def next_packet_id(self) -> int:
        pid = self._next_pid
        for _ in range(0xFFFF):
            pid = pid % 0xFFFF + 1
            if pid not in self.inflight:
                self._next_pid = pid
                return pid
        raise RuntimeError("no free packet id")

    def queue_publish(self, topic: str, payload: bytes, qos: int = 1) -> int | None:
        """Queue one PUBLISH (written by the next `flush()`); returns its packet id for QoS 1."""
        pid = None
        if qos:
            pid = self.next_packet_id()
            self.inflight[pid] = time.monotonic_ns()
        self._out.append(encode_publish(topic, payload, qos, pid))
        if self.counters.in_window(time.monotonic_ns()):
            self.counters.sent += 1
        return pid

    async def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> tuple[int, ...]:
        pid = self.next_packet_id()
        fut: asyncio.Future[tuple[int, ...]] = self._loop.create_future()
        self._subacks[pid] = fut
        self._out.append(self.codec.send(Subscribe(pid, ((topic_filter, qos),))))
        self.flush()
        return await asyncio.wait_for(fut, timeout)

    def disconnect(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.write(b"\xe0\x00")
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and not self.closed.done()


async def open_client(
    host: str,
    port: int,
    client_id: str,
    *,
    username: str | None = None,
    password: bytes | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    local_ip: str | None = None,
    keepalive: int = 60,
    clean_session: bool = False,
    counters: Counters | None = None,
    timeout: float = 30.0,
) -> tuple[MqttClient, int]:
    """Connect, send CONNECT and wait for the CONNACK; returns (client, CONNACK code)."""
    loop = asyncio.get_running_loop()
    client = MqttClient(counters)
    extra: dict[str, Any] = {}
    if ssl_context is not None:
        extra = {"ssl": ssl_context, "server_hostname": server_hostname or host}
    if local_ip is not None:
        extra["local_addr"] = (local_ip, 0)

    async def connect() -> int:
        await loop.create_connection(lambda: client, host, port, **extra)
        packet = Connect(client_id, username, password, keepalive, clean_session)
        assert client.transport is not None
        client.transport.write(client.codec.send(packet))
        return await client.connack

    try:
        code = await asyncio.wait_for(connect(), timeout)
    except BaseException:
        client.abort()
        raise
    return client, code
