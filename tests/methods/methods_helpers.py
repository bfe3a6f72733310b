"""Helpers for the direct-method and device-SDK tests: a real hub wired the way the lead will wire it
(twins, methods, C2D with its pump, `DeviceSessions` as `hub.device_sessions`), with its MQTT listener and
REST app on real sockets, running on its own event loop in a daemon thread so the threaded paho and
Azure SDK clients can be driven from plain test functions. Also a small paho device."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import httpx
import paho.mqtt.client as mqtt
from aiohttp import web

from tether.api.app import build_app
from tether.config import load_settings
from tether.hub import Hub
from tether.messaging.c2d import C2DService
from tether.messaging.device_sessions import DeviceSessions
from tether.messaging.methods import MethodService
from tether.protocols.mqtt.server import start_mqtt, stop_mqtt
from tether.registry.models import Device
from tether.security import pki
from tether.security.sas import build_token
from tether.security.tls import start_tls_server

T = TypeVar("T")
API = "?api-version=2021-04-12"
HOST = "localhost"
METHODS_FILTER = "$iothub/methods/POST/#"


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


def build_rest_app(hub: Hub) -> web.Application:
    """The hub's real REST app (twin, direct-method and C2D routes included)."""
    return build_app(hub)


class HubHarness:
    """A started hub with MQTT (plain TCP or TLS on `ip:mqtt_port`) and REST (plain HTTP on
    127.0.0.1, or HTTPS on `ip:rest_port` with `rest_tls`, also serving MQTT over WebSockets), both on
    ephemeral ports unless told otherwise."""

    def __init__(self, data_dir: Path, *, ip: str = "127.0.0.1", mqtt_port: int = 0, tls: bool = False,
                 hostname: str = HOST, rest_tls: bool = False, rest_port: int = 0) -> None:
        self.ip, self.tls, self.hostname = ip, tls, hostname
        tls_section: dict[str, Any] = {}
        self.ca_file: Path | None = None
        if tls or rest_tls:
            self.ca_file, cert_file, key_file = make_certs(data_dir / "pki", ip)
            tls_section = {"cert_file": cert_file, "key_file": key_file}
        self.settings = load_settings(hub={"hostname": hostname, "data_dir": data_dir}, tls=tls_section)
        self._mqtt_port, self._rest_tls, self._rest_port = mqtt_port, rest_tls, rest_port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hub-loop", daemon=True)
        self._thread.start()
        self.hub: Hub = self.call(self._open())

    async def _open(self) -> Hub:
        hub = Hub(self.settings)
        await hub.open()
        c2d = getattr(hub, "c2d", None)
        self._own_c2d = not isinstance(c2d, C2DService)
        if not isinstance(c2d, C2DService):  # a hub that does not build its own yet
            c2d = C2DService(hub.storage.db, audit=hub.audit, sweep_interval_s=0.2)
            hub.c2d = c2d
            await c2d.start()
        self.c2d: C2DService = c2d
        self.hooks: DeviceSessions = hub.device_sessions
        self._mqtt = await start_mqtt(hub, host=self.ip, port=self._mqtt_port, tls=self.tls)
        self.mqtt_port: int = self._mqtt.sockets[0].getsockname()[1]
        self._runner = web.AppRunner(build_rest_app(hub), access_log=None)
        await self._runner.setup()
        if self._rest_tls:
            assert self._runner.server is not None
            if hub.tls is None:
                from tether.security.tls import TlsContextFactory

                s = self.settings
                hub.tls = TlsContextFactory(s.tls, s.cert_file, s.key_file, s.tls.chain_file)
            self._rest: Any = await start_tls_server(self._runner.server, self.ip, self._rest_port, hub.tls)
            port = self._rest.sockets[0].getsockname()[1]
            self.rest_url = f"https://{self.ip}:{port}"
        else:
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self._rest = None
            host, port = self._runner.addresses[0][:2]
            self.rest_url = f"http://{host}:{port}"
        self.rest_port: int = port
        return hub

    @property
    def methods(self) -> MethodService:
        return self.hooks.methods

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def close() -> None:
            if self._rest is not None:
                self._rest.close()
            await self._runner.cleanup()
            self._mqtt.close()
            await stop_mqtt(self.hub)
            if self._own_c2d:
                await self.c2d.close()
            await self.hub.close()

        try:
            self.call(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    # --- identities and clients --------------------------------------------------------------
    def create_device(self, device_id: str) -> Device:
        body = {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": new_key(),
                                                                     "secondaryKey": new_key()}}}
        return self.call(self.hub.registry.create(device_id, body, actor="test"))

    def device_token(self, device: Device, ttl: float = 3600) -> str:
        key = device.authentication.symmetric_key.primary_key
        assert key is not None
        return build_token(f"{self.hostname}/devices/{device.device_id}", key, int(time.time() + ttl))

    def device_connection_string(self, device: Device) -> str:
        key = device.authentication.symmetric_key.primary_key
        return f"HostName={self.hostname};DeviceId={device.device_id};SharedAccessKey={key}"

    def policy_token(self, policy: str = "iothubowner", ttl: int = 3600) -> str:
        record = self.call(self.hub.policies.get(policy))
        return build_token(self.hostname, record.primary_key, int(time.time()) + ttl, policy)

    def rest(self, policy: str = "iothubowner", timeout: float = 30) -> httpx.Client:
        verify: Any = str(self.ca_file) if self._rest_tls else True
        return httpx.Client(base_url=self.rest_url, headers={"Authorization": self.policy_token(policy)},
                            timeout=timeout, verify=verify)

    def connected(self, device_id: str) -> bool:
        return self.hub.connections.get(device_id) is not None  # type: ignore[attr-defined]

    def wait(self, predicate: Callable[[], bool], timeout: float = 5, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)


def parse_method_topic(topic: str) -> tuple[str, str]:
    """(method name, rid) of `$iothub/methods/POST/{name}/?$rid={rid}`."""
    path, _, query = topic.partition("?")
    name = path[len("$iothub/methods/POST/"):].rstrip("/")
    return name, parse_qs(query)["$rid"][0]


class PahoDevice:
    """A paho 1.6 device (no automatic reconnect) with a queue of received messages; `responder`
    answers direct-method requests as they arrive (on paho's thread)."""

    def __init__(self, harness: HubHarness, device: Device, *, password: str | None = None,
                 client_id: str | None = None) -> None:
        self.device_id = device.device_id
        self.client = mqtt.Client(client_id=client_id or device.device_id, clean_session=False,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(f"{harness.hostname}/{device.device_id}/?api-version=2021-04-12",
                                    password if password is not None else harness.device_token(device))
        if harness.tls:
            assert harness.ca_file is not None
            self.client.tls_set(ca_certs=str(harness.ca_file))
        self.host, self.port = harness.ip, harness.mqtt_port
        self.connack: int | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.responder: Callable[[PahoDevice, str, str, Any], None] | None = None
        self._subacks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda c, u, rc: self.disconnected.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: int) -> None:
        self.connack = rc
        self.connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, granted: Any) -> None:
        with self._lock:
            event = self._subacks.setdefault(mid, threading.Event())
        event.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.responder is not None and message.topic.startswith("$iothub/methods/POST/"):
            name, rid = parse_method_topic(message.topic)
            self.responder(self, name, rid, json.loads(message.payload or b"null"))
            return
        self.messages.put(message)

    def _run(self) -> None:
        try:
            while not self._stop:
                if self.client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                    return
        except (OSError, ValueError, AttributeError):  # the socket went away under paho (closed by
            # the hub or by close() from another thread: paho then finds `_sock` is None)
            return
        finally:
            self.disconnected.set()

    def connect(self, timeout: float = 10) -> PahoDevice:
        self.client.connect(self.host, self.port, 60)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self.connected.wait(timeout):
            raise TimeoutError("no CONNACK")
        assert self.connack == 0, f"CONNACK {self.connack}"
        return self

    def subscribe(self, topic_filter: str, timeout: float = 5) -> None:
        result, mid = self.client.subscribe(topic_filter, 1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._lock:
            event = self._subacks.setdefault(mid, threading.Event())
        if not event.wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic_filter}")

    def answer(self, rid: str, status: int, payload: Any, *, raw: bytes | None = None) -> None:
        body = raw if raw is not None else json.dumps(payload).encode()
        self.client.publish(f"$iothub/methods/res/{status}/?$rid={rid}", body, qos=1)

    def next_message(self, timeout: float = 5) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        if not self.disconnected.is_set():
            self.client.disconnect()
            self.disconnected.wait(2)
        self._stop = True
        if self._thread is not None:
            self._thread.join(2)
        sock = self.client.socket()
        if sock is not None:
            sock.close()


DeviceFactory = Callable[..., PahoDevice]
"""The `device` fixture: `device(id, subscribe=True, responder=None, create=True)`."""


def echo_responder(status: int = 200) -> Callable[[PahoDevice, str, str, Any], None]:
    """Answers every request with `status` and `{"method": name, "echo": payload}`."""

    def respond(device: PahoDevice, name: str, rid: str, payload: Any) -> None:
        device.answer(rid, status, {"method": name, "echo": payload})

    return respond
