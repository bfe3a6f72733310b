"""Helpers for the issue-14 hardening tests: a hub with every listener as `tether run` starts them
(HTTPS with Tether's request handler, MQTT over TLS, plain MQTT, AMQP over TLS on an ephemeral port),
on 127.0.0.90 with its own dev PKI, plus raw-socket helpers for hostile clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.config import load_settings
from tether.hub import Hub
from tether.protocols.amqp import AMQP_HEADER, SASL_HEADER, Open, SaslInit, encode_frame
from tether.protocols.amqp.framing import FRAME_SASL
from tether.security import pki
from tether.security.sas import build_token
from tether.server import start_listeners

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:  # the bench's MQTT client and launcher helpers
    sys.path.insert(0, ROOT)

IP = "127.0.0.90"
HOSTNAME = "localhost"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@dataclass
class Served:
    hub: Hub
    ports: dict[str, int]
    ca: Path

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    async def owner(self) -> str:
        policy = await self.hub.policies.get("iothubowner")
        return build_token(HOSTNAME, policy.primary_key, int(time.time()) + 3600, "iothubowner")

    async def device(self, device_id: str) -> str:
        """Creates a SAS device; returns a token for it."""
        key = new_key()
        await self.hub.registry.create(device_id, {"authentication": {"type": "sas", "symmetricKey": {
            "primaryKey": key, "secondaryKey": new_key()}}}, actor="test")
        return build_token(f"{HOSTNAME}/devices/{device_id}", key, int(time.time()) + 3600)

    async def raw_https(self, data: bytes, *, timeout: float = 30) -> bytes:
        """Send raw bytes after the TLS handshake; everything the hub answers until it closes."""
        reader, writer = await asyncio.open_connection(IP, self.ports["https"], ssl=self.tls(),
                                                       server_hostname="localhost")
        try:
            writer.write(data)
            await writer.drain()
            chunks = []
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while chunk := await asyncio.wait_for(reader.read(65536), timeout):
                    chunks.append(chunk)
            return b"".join(chunks)
        finally:
            writer.close()


def sasl_init(mechanism: str, response: bytes | None = None) -> bytes:
    """The SASL header and a sasl-init frame, as a client sends them in one go."""
    return SASL_HEADER + encode_frame(0, SaslInit(mechanism, response), frame_type=FRAME_SASL)


def amqp_open(container_id: str = "raw") -> bytes:
    """The plain AMQP header and an open (what the Node SDKs send before their CBS put-token)."""
    return AMQP_HEADER + encode_frame(0, Open(container_id=container_id))


def amqp_plain(user: str, token: str) -> bytes:
    """SASL PLAIN with a SAS token, then the AMQP header and an open: an authenticated connection."""
    return sasl_init("PLAIN", f"\x00{user}\x00{token}".encode()) + amqp_open()


def serve_settings(data_dir: Path, **sections: dict[str, Any]) -> Any:
    limits = {"device_messages_per_second": 10_000.0, **sections.pop("limits", {})}
    return load_settings(hub={"hostname": HOSTNAME, "data_dir": data_dir},
                         listeners={"host": IP, "https_port": 0, "mqtt_port": 0, "mqtt_plain_port": 0,
                                    "amqp_port": 0},
                         limits=limits, **sections)


@contextlib.asynccontextmanager
async def serving(data_dir: Path, **sections: dict[str, Any]) -> AsyncIterator[Served]:
    files = pki.init_pki(data_dir / "pki", ["localhost"], [IP])
    async with Hub(serve_settings(data_dir, **sections)) as hub:
        await start_listeners(hub)
        yield Served(hub, dict(hub.ports), files.root_cert)
