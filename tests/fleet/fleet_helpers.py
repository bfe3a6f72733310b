"""A real hub for the fleet tests (file upload, jobs, configurations): `Hub` + `start_listeners` (the
HTTPS listener on 443 and MQTT/TLS on 8883, as `tether run` serves them) on one of this area's
loopback addresses, with a dev-PKI certificate for it, running on its own event loop in a daemon thread
so the threaded Azure SDK clients can be driven from plain test functions.

Addresses reserved for these tests: 127.0.0.115 (hub), 127.0.0.116 (Azurite), 127.0.0.117-119.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tether.config import load_settings
from tether.hub import Hub
from tether.registry.models import Device
from tether.security import pki
from tether.security.sas import build_token
from tether.server import start_listeners

T = TypeVar("T")
API = "?api-version=2021-04-12"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def hub_certs(directory: Path, ip: str) -> tuple[Path, Path, Path]:
    """(dev root CA, certificate, key) for a hub on `ip`."""
    files = pki.init_pki(directory, ["localhost"], [ip])
    root, root_key = pki.load_certificate(files.root_cert), pki.load_private_key(files.root_key)
    cert, key = pki.server_cert_for_ip(ip, root, root_key)
    cert_file, key_file = directory / f"hub-{ip}.pem", directory / f"hub-{ip}.key"
    pki.write_certificates(cert_file, [cert])
    pki.write_private_key(key_file, key)
    return files.root_cert, cert_file, key_file


class RunningHub:
    """`Hub` with every listener on `ip` (HTTPS 443, MQTT/TLS 8883), host name = `ip`."""

    def __init__(self, data_dir: Path, ip: str, *, pki_dir: Path | None = None, **sections: Any) -> None:
        self.ip = self.hostname = ip
        self.data_dir = data_dir
        self.ca_file, cert, key = hub_certs(pki_dir or data_dir / "pki", ip)
        self.settings = load_settings(
            hub={"hostname": ip, "data_dir": data_dir},
            listeners={"host": ip, "https_port": 443, "mqtt_port": 8883},
            tls={"cert_file": cert, "key_file": key}, **sections)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"hub-{ip}", daemon=True)
        self._thread.start()
        try:
            self.hub: Hub = self.call(self._open(), timeout=60)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    async def _open(self) -> Hub:
        hub = Hub(self.settings)
        await hub.open()
        try:
            await start_listeners(hub)
        except BaseException:
            await hub.close()
            raise
        return hub

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.hub.close(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    # --- identities and clients ------------------------------------------------------------------
    def create_device(self, device_id: str, **extra: Any) -> Device:
        body = {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": new_key(),
                                                                     "secondaryKey": new_key()}}, **extra}
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

    def connection_string(self, policy: str = "iothubowner") -> str:
        return self.call(self.hub.service_connection_string(policy))

    def rest(self, policy: str = "iothubowner", timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=f"https://{self.ip}", timeout=timeout, verify=str(self.ca_file),
                            headers={"Authorization": self.policy_token(policy)})

    def audit(self, action: str, outcome: str | None = None) -> list[Any]:
        async def query() -> list[Any]:
            await self.hub.audit.flush()
            return await self.hub.storage.audit.query(limit=1000, action_prefix=action, outcome=outcome)

        return self.call(query())


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition",
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
