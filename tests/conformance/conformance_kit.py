"""Conformance kit: one real hub (`server.start_listeners`, as `tether run` starts it) on its own
loopback address with Azure's default ports — HTTPS on **443**, MQTT on 8883 — and a dev-PKI
certificate for that address, so Microsoft's SDKs reach it with a plain `HostName=127.0.0.80` and no
port anywhere. The hub runs on its own event loop in a thread: the SDKs under test are synchronous.

Addresses 127.0.0.80–127.0.0.89 belong to these tests (80: the shared hub; 81: first run as a
non-root user; 82: a refused 443 without fallback).
"""

from __future__ import annotations

import ssl
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "backends"))

from e2e_kit import NodeThread

from tether.config import Settings, load_settings
from tether.security import pki
from tether.security.connstr import ServiceConnectionString
from tether.security.sas import build_token

HUB_IP = "127.0.0.80"
API = "api-version=2021-04-12"


def hub_settings(data_dir: Path, ip: str, **listeners: Any) -> Settings:
    files = pki.init_pki(data_dir / "pki", ["localhost"], [ip])
    return load_settings(
        hub={"hostname": ip, "data_dir": data_dir},
        listeners={"host": ip, "https_port": 443, "mqtt_port": 8883, "https_fallback_port": 0, **listeners},
        tls={"cert_file": files.server_cert, "key_file": files.server_key},
        limits={"device_messages_per_second": 10_000.0},
    )


class AzureHub:
    """A running hub at `ip` on 443/8883, plus what clients need to reach it."""

    def __init__(self, data_dir: Path, ip: str) -> None:
        self.ip = ip
        self.node = NodeThread(hub_settings(data_dir, ip))
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
        self.node.stop()
