"""Conformance kit: one real hub (`server.start_listeners`, as `tether run` starts it) on its own
loopback address with Azure's default ports — HTTPS on **443**, MQTT on 8883 — and a dev-PKI
certificate for that address, so Microsoft's SDKs reach it with a plain `HostName=127.0.0.80` and no
port anywhere. The hub runs on its own event loop in a thread: the SDKs under test are synchronous.

The hub has blob storage, as file upload and import/export need it: one Azurite per session
(`tests/azurite_helpers.py`) on 127.0.0.85:443 with a certificate from the hub's own dev root, so the
hub, the SDKs and the tests trust it through the same root CA.

Addresses 127.0.0.80–127.0.0.89 belong to these tests (80: the shared hub; 81: first run as a
non-root user; 82: a refused 443 without fallback; 85: Azurite; 86: a storage endpoint that stalls).
"""

from __future__ import annotations

import base64
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from azure.iot.hub import (
    DigitalTwinClient,
    IoTHubConfigurationManager,
    IoTHubHttpRuntimeManager,
    IoTHubJobManager,
    IoTHubRegistryManager,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backends"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from azurite_helpers import AzuriteServer, start_azurite
from e2e_kit import NodeThread

from tether.config import Settings, load_settings
from tether.security import pki
from tether.security.connstr import ServiceConnectionString
from tether.security.sas import build_token

HUB_IP = "127.0.0.80"
AZURITE_IP = "127.0.0.85"
STALL_IP = "127.0.0.86"
API = "api-version=2021-04-12"
UPLOADS = "fileuploads"  # the hub's file upload container


def hub_settings(data_dir: Path, ip: str, **sections: Any) -> Settings:
    files = pki.init_pki(data_dir / "pki", ["localhost"], [ip])
    return load_settings(
        hub={"hostname": ip, "data_dir": data_dir},
        listeners={"host": ip, "https_port": 443, "mqtt_port": 8883, "https_fallback_port": 0},
        tls={"cert_file": files.server_cert, "key_file": files.server_key},
        limits={"device_messages_per_second": 10_000.0},
        **sections,
    )


def storage_settings(azurite: AzuriteServer) -> dict[str, Any]:
    """The hub's sections for blob storage in `azurite` (file upload account, CA for import/export).
    Jobs keep the default poll interval: creating a job wakes the runner, and the hub lives for the
    whole test session."""
    account = azurite.account
    return {
        "blob": {"ca_file": azurite.ca_file},
        "file_upload": {
            "account_name": account.name,
            "account_key": account.key,
            "blob_endpoint": account.endpoint,
            "container": UPLOADS,
        },
    }


class AzureHub:
    """A running hub at `ip` on 443/8883, plus what clients need to reach it; with `azurite` (started
    with `ca_dir=data_dir / "pki"`), file upload and import/export use it."""

    def __init__(self, data_dir: Path, ip: str, azurite: AzuriteServer | None = None) -> None:
        self.ip = ip
        self.azurite = azurite
        self.node = NodeThread(hub_settings(data_dir, ip, **(storage_settings(azurite) if azurite else {})))
        self.hub = self.node.hub
        self.root_ca = data_dir / "pki" / "root-ca.pem"
        self.owner_cs = self.node.connection_string  # HostName={ip}: no port, as on Azure
        cs = ServiceConnectionString.parse(self.owner_cs)
        self._key = cs.shared_access_key

    def token(self, policy: str = "iothubowner") -> str:
        key = (
            self._key
            if policy == "iothubowner"
            else self.node.call(self.hub.policies.get(policy)).primary_key
        )
        return build_token(self.ip, key, int(time.time()) + 3600, policy)

    def rest(self, policy: str = "iothubowner") -> httpx.Client:
        """Raw HTTPS to `https://{ip}` (port 443 implied), verified with the dev root."""
        return httpx.Client(
            base_url=f"https://{self.ip}",
            verify=ssl.create_default_context(cafile=str(self.root_ca)),
            timeout=60,
            headers={"Authorization": self.token(policy)},
        )

    def device_token(self, device_id: str, key: str) -> str:
        return build_token(f"{self.ip}/devices/{device_id}", key, int(time.time()) + 3600)

    def close(self) -> None:
        try:
            self.node.stop()
        finally:
            if self.azurite is not None:
                self.azurite.stop()


def wait_for(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll `check` until it returns something true (returned), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def new_key() -> str:
    return base64.b64encode(uuid.uuid4().bytes * 2).decode()


def create(rest: httpx.Client, device_id: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """A SAS device through the REST API: (id, primary key, identity document)."""
    device_id = device_id or f"conf-{uuid.uuid4().hex[:10]}"
    key = new_key()
    r = rest.put(
        f"/devices/{device_id}?{API}",
        json={
            "deviceId": device_id,
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": new_key()}},
        },
    )
    assert r.status_code == 200, r.text
    return device_id, key, r.json()


def device_client(hub: AzureHub, device_id: str, key: str) -> httpx.Client:
    """Raw HTTPS to the hub as the device (its SAS token)."""
    client = hub.rest()
    client.headers["Authorization"] = hub.device_token(device_id, key)
    return client


class Service:
    """The service SDK clients (azure-iot-hub) for `hub`, and SAS devices registered through them."""

    def __init__(self, hub: AzureHub) -> None:
        self.hub = hub
        cs = hub.owner_cs
        self.registry = IoTHubRegistryManager.from_connection_string(cs)
        self.jobs = IoTHubJobManager.from_connection_string(cs)
        self.configs = IoTHubConfigurationManager.from_connection_string(cs)
        self.runtime = IoTHubHttpRuntimeManager.from_connection_string(cs)
        self.digital = DigitalTwinClient.from_connection_string(cs)

    def device(self) -> str:
        device_id = f"sdk-{uuid.uuid4().hex[:10]}"
        self.registry.create_device_with_sas(device_id, new_key(), new_key(), "enabled")
        return device_id


def azure_hub_with_storage(data_dir: Path, ip: str = HUB_IP) -> AzureHub:
    """Azurite on AZURITE_IP:443 under the hub's dev root, then the hub using it."""
    azurite = start_azurite(data_dir / "azurite", AZURITE_IP, ca_dir=data_dir / "pki")
    try:
        return AzureHub(data_dir, ip, azurite)
    except BaseException:
        azurite.stop()
        raise
