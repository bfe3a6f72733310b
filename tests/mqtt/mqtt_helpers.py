"""Helpers for the MQTT tests: a real hub running on its own event loop in a background thread (so
the sync-threaded paho and Azure SDK clients can be driven from plain test functions), dev-PKI
certificates, device tokens, a paho device wrapper, a raw TLS socket for hand-made bytes and a
service-side reader of the hub's telemetry consumer API."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import paho.mqtt.client as mqtt
from aiohttp import web

from tether.api.app import build_app
from tether.api.event_routes import NEXT_SEQUENCE_HEADER
from tether.config import load_settings
from tether.hub import Hub
from tether.messaging.events import EventData
from tether.protocols.mqtt.codec import encode_packet
from tether.protocols.mqtt.packets import Connect
from tether.protocols.mqtt.server import start_mqtt, stop_mqtt
from tether.registry.models import Device
from tether.security import pki
from tether.security.authenticator import Authenticator
from tether.security.sas import build_token
from tether.security.x509 import X509Verifier
from tether.storage.base import AuditRecord

T = TypeVar("T")
HOSTNAME = "localhost"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def make_certs(directory: Path, ip: str) -> tuple[Path, Path, Path]:
    """(root CA PEM, server cert, server key) with an IP SAN for `ip`."""
    files = pki.init_pki(directory, ["localhost"], [ip])
    root, root_key = pki.load_certificate(files.root_cert), pki.load_private_key(files.root_key)
    cert, key = pki.server_cert_for_ip(ip, root, root_key)
    cert_file, key_file = directory / f"server-{ip}.pem", directory / f"server-{ip}.key"
    pki.write_certificates(cert_file, [cert])
    pki.write_private_key(key_file, key)
    return files.root_cert, cert_file, key_file


class HubRunner:
    """A started Hub plus MQTT listener on a private loop in a daemon thread."""

    def __init__(self, data_dir: Path, *, ip: str = "127.0.0.1", port: int = 0, tls: bool = True,
                 hostname: str = HOSTNAME, limits: dict[str, Any] | None = None,
                 hooks: object | None = None) -> None:
        self.ip, self.tls, self.hostname = ip, tls, hostname
        self.ca_file, cert_file, key_file = make_certs(data_dir / "pki", ip)
        self.settings = load_settings(
            hub={"hostname": hostname, "data_dir": data_dir},
            tls={"cert_file": cert_file, "key_file": key_file},
            limits=limits or {},
        )
        self._requested_port = port
        self._hooks = hooks
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hub-loop", daemon=True)
        self._thread.start()
        self.hub: Hub = self.call(self._open())
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _open(self) -> Hub:
        hub = Hub(self.settings)
        await hub.open()
        if hub.cert_verifier is None:  # until the hub wires X.509 itself
            hub.cert_verifier = X509Verifier()
            hub.authenticator = Authenticator(
                hostname=self.hostname, devices=hub.registry, policies=hub.policies, audit=hub.audit,
                clock_skew_s=self.settings.limits.sas_clock_skew_s, cert_verifier=hub.cert_verifier,
            )
        if self._hooks is not None:
            hub.device_sessions = self._hooks  # type: ignore[assignment]
        self._server = await start_mqtt(hub, host=self.ip, port=self._requested_port, tls=self.tls)
        return hub

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            await stop_mqtt(self.hub)
            await self.hub.close()

        try:
            self.call(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    # --- registry, tokens, audit, stream ------------------------------------------------------------
    def create_device(self, device_id: str, **body: Any) -> Device:
        body.setdefault("authentication", {"type": "sas", "symmetricKey": {
            "primaryKey": new_key(), "secondaryKey": new_key()}})
        return self.call(self.hub.registry.create(device_id, body, actor="test"))

    def token(self, device: Device, ttl: float = 3600, key: str | None = None) -> str:
        key = key or device.authentication.symmetric_key.primary_key
        assert key is not None
        return build_token(f"{self.hostname}/devices/{device.device_id}", key, int(time.time() + ttl))

    def audit(self, **query: Any) -> list[AuditRecord]:
        async def run() -> list[AuditRecord]:
            await self.hub.audit.flush()
            return await self.hub.audit.query(limit=1000, **query)

        return self.call(run())

    def wait_audit(self, reason: str, *, action_prefix: str | None = None, target: str | None = None,
                   peer_port: int | None = None, timeout: float = 5) -> AuditRecord:
        """The refused audit record with `reason` (and target / peer port when given)."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.audit(outcome="refused", action_prefix=action_prefix):
                if record.reason != reason or (target is not None and record.target != target):
                    continue
                if peer_port is not None and not (record.peer or "").endswith(f":{peer_port}"):
                    continue
                return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no refused audit record with reason {reason!r}")
            time.sleep(0.05)

    def events(self, device_id: str) -> list[EventData]:
        async def run() -> list[EventData]:
            partition = self.hub.stream.partition_for(device_id)
            out: list[EventData] = []
            next_seq = 0
            while True:
                batch = await self.hub.stream.read(partition, from_sequence=next_seq, max_count=1000)
                if not batch:
                    return [e for e in out if e.device_id == device_id]
                out += batch
                next_seq = batch[-1].sequence_number + 1

        return self.call(run())

    def connected(self, device_id: str) -> bool:
        return self.hub.connections.get(device_id) is not None  # type: ignore[attr-defined]


class ServiceConsumer:
    """A back end reading telemetry the way Tether hands it out: the consumer API of the same hub
    (`build_app`, plain HTTP on 127.0.0.1:0, served on the hub's loop), authorised by a `service`
    policy token (ServiceConnect only, the right Azure requires to read the built-in endpoint).
    Reads go over a real socket, so what a test checks is what a consumer group sees."""

    def __init__(self, runner: HubRunner, ttl: int = 3600) -> None:
        self.runner = runner
        self._app_runner, base_url, token = runner.call(self._start(ttl))
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": token}, timeout=30)
        r = self.http.get("/tether/events/partitions")
        assert r.status_code == 200, r.text
        self.partition_count: int = r.json()["partitionCount"]

    async def _start(self, ttl: int) -> tuple[web.AppRunner, str, str]:
        hub = self.runner.hub
        app_runner = web.AppRunner(build_app(hub), access_log=None)
        await app_runner.setup()
        await web.TCPSite(app_runner, "127.0.0.1", 0).start()
        host, port = app_runner.addresses[0][:2]
        policy = await hub.policies.get("service")
        token = build_token(self.runner.hostname, policy.primary_key, int(time.time()) + ttl,
                            policy_name="service")
        return app_runner, f"http://{host}:{port}", token

    def close(self) -> None:
        self.http.close()
        self.runner.call(self._app_runner.cleanup())

    def partition_of(self, device_id: str) -> int:
        return self.runner.hub.stream.partition_for(device_id)

    def create_group(self, name: str) -> str:
        """A fresh consumer group (201: it did not exist before)."""
        r = self.http.put(f"/tether/events/consumergroups/{name}")
        assert r.status_code == 201, r.text
        assert r.json() == {"name": name}
        return name

    def read(self, partition: int, group: str, *, wait: float = 5,
             **position: str) -> tuple[list[dict[str, Any]], int]:
        """(every event from `position` on, the next sequence to read). The first long-poll waits
        up to `wait` s; the following pages, from `x-tether-next-sequence`, do not (drain)."""
        params: dict[str, str] = {"consumerGroup": group, "timeout": str(wait), "maxCount": "1000",
                                  **position}
        events: list[dict[str, Any]] = []
        while True:
            r = self.http.get(f"/tether/events/partitions/{partition}/messages", params=params)
            assert r.status_code == 200, r.text
            page: list[dict[str, Any]] = r.json()
            following = int(r.headers[NEXT_SEQUENCE_HEADER])
            if not page:
                return events, following
            assert all(e["partition"] == partition for e in page)
            events += page
            params = {"consumerGroup": group, "timeout": "0", "maxCount": "1000",
                      "fromSequence": str(following)}

    def checkpoint(self, group: str, partition: int, sequence: int) -> None:
        path = f"/tether/events/consumergroups/{group}/checkpoints/{partition}"
        r = self.http.put(path, json={"sequenceNumber": sequence})
        assert r.status_code == 200, r.text
        expected = {"consumerGroup": group, "partition": partition, "sequenceNumber": sequence}
        assert r.json() == expected
        assert self.http.get(path).json() == expected  # stored, not just echoed


class PahoDevice:
    """A paho 1.6.1 client on paho's network thread (`loop_start`, so only that thread writes to
    the socket) with automatic reconnects off."""

    def __init__(self, runner: HubRunner, device_id: str, password: str | None, *,
                 client_id: str | None = None, username: str | None = None,
                 certfile: Path | None = None, keyfile: Path | None = None, keepalive: int = 60) -> None:
        self.device_id = device_id
        self.client = mqtt.Client(client_id=client_id or device_id, clean_session=False,
                                  protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        user = username or f"{runner.hostname}/{device_id}/?api-version=2021-04-12"
        self.client.username_pw_set(user, password)
        if runner.tls:
            self.client.tls_set(ca_certs=str(runner.ca_file), certfile=certfile and str(certfile),
                                keyfile=keyfile and str(keyfile))
        self.host, self.port, self.keepalive = runner.ip, runner.port, keepalive
        self.connack: int | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.acked: set[int] = set()
        self.suback: dict[int, tuple[int, ...]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, rc: self.disconnected.set()
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, m: self.messages.append(m)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: int) -> None:
        self.connack = rc
        self.connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int) -> None:
        with self._cond:
            self.acked.add(mid)
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, granted: tuple[int, ...]) -> None:
        with self._cond:
            self.suback[mid] = tuple(granted)
            self._cond.notify_all()

    def connect(self, timeout: float = 10) -> int:
        """Connect; returns the CONNACK code (-1 if the hub closed without one)."""
        self.client.connect(self.host, self.port, self.keepalive)
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected.is_set():
                return self.connack if self.connack is not None else -1
            if self.disconnected.is_set():
                return self.connack if self.connack is not None else -1
            time.sleep(0.01)
        raise TimeoutError("no CONNACK")

    def publish(self, payload: bytes | str = b"x", qos: int = 1, topic: str | None = None) -> int:
        topic = topic or f"devices/{self.device_id}/messages/events/"
        info = self.client.publish(topic, payload, qos=qos)
        return int(info.mid)

    def subscribe(self, topic: str, qos: int = 1) -> int:
        return int(self.client.subscribe(topic, qos)[1])

    def wait_acked(self, mids: set[int] | list[int], timeout: float = 10) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: set(mids) <= self.acked, timeout):
                raise AssertionError(f"not acknowledged: {sorted(set(mids) - self.acked)}")

    def roundtrip(self, timeout: float = 10) -> None:
        """Publish one QoS 1 message and wait for its PUBACK: the connection is healthy."""
        self.wait_acked([self.publish(b"ping")], timeout)

    def wait_disconnected(self, timeout: float = 5) -> bool:
        return self.disconnected.wait(timeout)

    def close(self) -> None:
        if not self.disconnected.is_set():
            self.client.disconnect()
            self.disconnected.wait(2)
        self.client.loop_stop()


def raw_socket(runner: HubRunner, timeout: float = 10) -> socket.socket:
    """A TLS (or plain) socket to the hub for hand-made MQTT bytes."""
    sock = socket.create_connection((runner.ip, runner.port), timeout=timeout)
    if not runner.tls:
        return sock
    ctx = ssl.create_default_context(cafile=str(runner.ca_file))
    return ctx.wrap_socket(sock, server_hostname=runner.ip)


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the hub sends until it closes the connection (raises on timeout)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            return data
        if not chunk:
            return data
        data += chunk


def raw_connect(runner: HubRunner, device: Device, keep_alive: int = 60) -> socket.socket:
    """A socket with an accepted MQTT session for `device` (hand-made packets from here on)."""
    sock = raw_socket(runner)
    username = f"{runner.hostname}/{device.device_id}/?api-version=2021-04-12"
    packet = Connect(device.device_id, username, runner.token(device).encode(), keep_alive=keep_alive)
    sock.sendall(encode_packet(packet))
    assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data
