"""End-to-end kit shared by `tests/backends` and `tests/cluster`: a hub node running every listener
on its own thread, a service REST client (HTTPS, SAS token), and a paho device over plain TCP.

The device answers direct methods by itself (`method_answers`) and records everything it receives,
so tests only send through REST and wait for what arrives.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import httpx
import paho.mqtt.client as mqtt

from tether.config import Settings, load_settings
from tether.hub import Hub
from tether.security import pki
from tether.security.connstr import ServiceConnectionString, parse_connection_string
from tether.security.sas import build_token

HOSTNAME = "localhost"
API = "api-version=2021-04-12"
T = TypeVar("T")


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def dev_pki(directory: Path) -> tuple[Path, Path, Path]:
    """(root CA, server cert, server key) for 127.0.0.1 / localhost, shared by every node of a test."""
    files = pki.init_pki(directory, ["localhost"], ["127.0.0.1"])
    return files.root_cert, directory / "server.pem", directory / "server.key"


def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll `check()` until it returns something truthy; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------ a node
def node_settings(data_dir: Path, pki_dir: Path, *, storage: dict[str, Any], cluster: dict[str, Any],
                  node_id: str | None = None) -> Settings:
    _, cert, key = dev_pki(pki_dir)
    cluster = dict(cluster)
    if node_id is not None and cluster:
        cluster["node_id"] = node_id
    return load_settings(
        hub={"hostname": HOSTNAME, "data_dir": data_dir},
        listeners={"host": "127.0.0.1", "mqtt_port": 0, "https_port": 0, "mqtt_plain_port": 0,
                   "amqp_port": 0},
        tls={"cert_file": cert, "key_file": key},
        limits={"device_messages_per_second": 10_000.0},
        storage=storage,
        cluster=cluster,
    )


class NodeThread:
    """A `Hub` with every listener (`server.start_listeners`) on a private loop in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="node-loop", daemon=True)
        self._thread.start()
        self.hub: Hub = self.call(self._open())
        self.ports = dict(self.hub.ports)
        self.connection_string: str = self.call(self.hub.service_connection_string())

    async def _open(self) -> Hub:
        from tether.server import start_listeners

        hub = Hub(self.settings)
        await hub.open()
        await start_listeners(hub)
        return hub

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.hub.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


# ------------------------------------------------------------------------------------------ REST
class Rest:
    """The service REST API of one node, authenticated with a service connection string."""

    def __init__(self, https_port: int, ca_file: Path, connection_string: str) -> None:
        cs = parse_connection_string(connection_string)
        assert isinstance(cs, ServiceConnectionString)
        token = build_token(cs.host_name, cs.shared_access_key, int(time.time()) + 3600,
                            cs.shared_access_key_name)
        ctx = ssl.create_default_context(cafile=str(ca_file))
        self.client = httpx.Client(base_url=f"https://127.0.0.1:{https_port}", verify=ctx, timeout=60,
                                   headers={"Authorization": token})

    def close(self) -> None:
        self.client.close()

    def _ok(self, response: httpx.Response) -> Any:
        assert response.status_code < 300, f"{response.request.method} {response.request.url}: " \
                                            f"{response.status_code} {response.text}"
        return response.json() if response.content else None

    def create_device(self, device_id: str, key: str) -> dict[str, Any]:
        body = {"deviceId": device_id, "authentication": {
            "type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": new_key()}}}
        result: dict[str, Any] = self._ok(self.client.put(f"/devices/{device_id}?{API}", json=body))
        return result

    def send_c2d(self, device_id: str, body: bytes, **headers: str) -> None:
        self._ok(self.client.post(f"/devices/{device_id}/messages/deviceBound?{API}", content=body,
                                  headers=headers))

    def patch_desired(self, device_id: str, desired: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._ok(self.client.patch(
            f"/twins/{device_id}?{API}", json={"properties": {"desired": desired}}))
        return result

    def invoke(self, device_id: str, method: str, payload: Any, *, timeout_s: int = 10,
               connect_timeout_s: int = 0) -> httpx.Response:
        return self.client.post(f"/twins/{device_id}/methods?{API}", json={
            "methodName": method, "payload": payload, "responseTimeoutInSeconds": timeout_s,
            "connectTimeoutInSeconds": connect_timeout_s})

    def disable(self, device_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._ok(self.client.post(f"/tether/devices/{device_id}/disable?{API}",
                                                           json={}))
        return result

    def event_bodies(self, device_id: str) -> list[str]:
        """Every telemetry body of the device in the stream, read through the consumer API."""
        partitions = self._ok(self.client.get("/tether/events/partitions"))["partitions"]
        bodies: list[str] = []
        for p in range(len(partitions)):
            start = 0
            while True:
                batch = self._ok(self.client.get(f"/tether/events/partitions/{p}/messages", params={
                    "fromSequence": str(start), "timeout": "0", "maxCount": "1000"}))
                if not batch:
                    break
                bodies += [e["body"] for e in batch if e["deviceId"] == device_id]
                start = batch[-1]["sequenceNumber"] + 1
        return bodies


# ------------------------------------------------------------------------------------------ device
class MqttDevice:
    """One device identity over plain-TCP MQTT (paho 1.6, persistent session, no auto-reconnect).

    `connect(port)` may be called again after a drop (another node): a fresh paho client each time."""

    def __init__(self, device_id: str, key: str, *, method_answers: dict[str, Any] | None = None,
                 module_id: str | None = None) -> None:
        self.device_id, self.key, self.module_id = device_id, key, module_id
        self.identity = device_id if module_id is None else f"{device_id}/{module_id}"
        self.resource = f"devices/{device_id}" + ("" if module_id is None else f"/modules/{module_id}")
        self.method_answers = method_answers or {}
        self.client: mqtt.Client | None = None
        self.connack: int | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnected_at: float | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.method_calls: list[tuple[str, Any]] = []
        self.acked_bodies: list[str] = []  # PUBACKed telemetry, in order
        self._in_flight: dict[int, str] = {}
        self._early_acks: set[tuple[Any, int]] = set()
        self._untracked: set[int] = set()  # our QoS 0 method replies
        self._suback: set[int] = set()
        self._cond = threading.Condition()

    def connect(self, port: int, timeout: float = 10) -> int:
        self.close()
        self.connected.clear()
        self.disconnected.clear()
        self.connack = None
        self._in_flight.clear()
        self._early_acks.clear()
        self._untracked.clear()
        client = mqtt.Client(client_id=self.identity, clean_session=False, protocol=mqtt.MQTTv311,
                             reconnect_on_failure=False)
        client.username_pw_set(f"{HOSTNAME}/{self.identity}/?{API}", build_token(
            f"{HOSTNAME}/{self.resource}", self.key, int(time.time()) + 3600))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        if not self.connected.wait(timeout) and not self.disconnected.is_set():
            raise TimeoutError(f"{self.device_id}: no CONNACK from port {port}")
        return self.connack if self.connack is not None else -1

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: int) -> None:
        self.connack = rc
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, rc: int) -> None:
        if client is self.client:
            self.disconnected_at = time.monotonic()
            self.disconnected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int) -> None:
        # paho calls this holding its own message lock, so publish() must not hold _cond while
        # calling into paho; a PUBACK that beats publish()'s bookkeeping waits in _early_acks.
        with self._cond:
            if mid in self._untracked:
                self._untracked.discard(mid)
                return
            body = self._in_flight.pop(mid, None)
            if body is None:
                self._early_acks.add((client, mid))
            elif client is self.client:
                self.acked_bodies.append(body)
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, granted: Any) -> None:
        with self._cond:
            self._suback.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic, payload = msg.topic, bytes(msg.payload)
        if topic.startswith("$iothub/methods/POST/"):
            name, _, query = topic[len("$iothub/methods/POST/"):].partition("/?")
            rid = parse_qs(query)["$rid"][0]
            self.method_calls.append((name, json.loads(payload or b"null")))
            answer = self.method_answers.get(name, {"unknown": name})
            reply = client.publish(f"$iothub/methods/res/200/?$rid={rid}", json.dumps(answer), qos=0)
            with self._cond:  # written by this (paho's) thread after we return: not a telemetry ack
                self._untracked.add(reply.mid)
        with self._cond:
            self.messages.append((topic, payload))
            self._cond.notify_all()

    def subscribe_all(self, timeout: float = 10) -> None:
        """C2D (devices only), desired patches, twin responses and methods; returns after the SUBACK."""
        assert self.client is not None
        c2d = [] if self.module_id is not None else [(f"devices/{self.device_id}/messages/devicebound/#", 1)]
        _, mid = self.client.subscribe([*c2d,
                                        ("$iothub/twin/PATCH/properties/desired/#", 0),
                                        ("$iothub/twin/res/#", 0),
                                        ("$iothub/methods/POST/#", 0)])
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._suback, timeout), "no SUBACK"

    def publish(self, body: str) -> int:
        client = self.client
        assert client is not None
        info = client.publish(f"{self.resource}/messages/events/", body, qos=1)
        with self._cond:
            if (client, info.mid) in self._early_acks:
                self._early_acks.discard((client, info.mid))
                if client is self.client:
                    self.acked_bodies.append(body)
                self._cond.notify_all()
            else:
                self._in_flight[info.mid] = body
        return int(info.mid)

    def wait_acked(self, count: int, timeout: float = 10) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.acked_bodies) >= count, timeout), \
                f"only {len(self.acked_bodies)} of {count} PUBACKs"

    def wait_message(self, predicate: Callable[[str, bytes], bool], timeout: float = 10) -> tuple[str, bytes]:
        def found() -> tuple[str, bytes] | None:
            return next(((t, p) for t, p in self.messages if predicate(t, p)), None)

        with self._cond:
            assert self._cond.wait_for(lambda: found() is not None, timeout), \
                f"{self.device_id}: no matching message; got {[t for t, _ in self.messages]}"
            result = found()
        assert result is not None
        return result

    def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        if self.connected.is_set() and not self.disconnected.is_set():
            client.disconnect()
        client.loop_stop()
