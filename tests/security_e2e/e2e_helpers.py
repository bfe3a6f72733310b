"""Helpers for the connection-security end-to-end tests: a real Hub with every listener on 127.0.0.1
ephemeral ports, a minimal HTTP/1.1-over-TLS client that keeps ONE connection (so a test can prove
a live connection survives a certificate change and see which certificate it was served), raw MQTT
over TLS, paho 1.6.1 X.509 connects, tokens and audit look-ups."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether.config import Settings, load_settings
from tether.hub import Hub
from tether.protocols.mqtt.codec import encode_packet
from tether.protocols.mqtt.packets import Connect
from tether.protocols.mqtt.server import stop_mqtt
from tether.registry.models import Device
from tether.security import pki
from tether.security.sas import build_token
from tether.server import start_listeners
from tether.storage.base import AuditRecord

HOST = "localhost"
API = "?api-version=2021-04-12"
BUNDLE = "/tether/trust-bundle"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def hub_settings(data_dir: Path) -> Settings:
    return load_settings(
        hub={"hostname": HOST, "data_dir": data_dir},
        listeners={"host": "127.0.0.1", "https_port": 0, "mqtt_port": 0, "amqp_port": 0},
    )


async def start_secured_listeners(hub: Hub) -> None:
    """The hub's real listeners (`server.start_listeners`): HTTPS with the security routes, MQTT/TLS."""
    await start_listeners(hub)


@asynccontextmanager
async def running_hub(data_dir: Path) -> AsyncIterator[Hub]:
    """A hub on `data_dir` (dev PKI created or kept) with HTTPS + MQTT/TLS listening."""
    settings = hub_settings(data_dir)
    pki.init_pki(settings.pki_dir, ["localhost"], ["127.0.0.1"])
    hub = Hub(settings)
    await hub.open()
    try:
        await start_secured_listeners(hub)
        yield hub
    finally:
        await stop_mqtt(hub)
        await hub.close()


def pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def client_ctx(roots: Sequence[x509.Certificate],
               identity: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """A device-side TLS context that trusts exactly `roots` (host name checked)."""
    ctx = ssl.create_default_context(cadata=pem(roots))
    if identity is not None:
        ctx.load_cert_chain(str(identity[0]), str(identity[1]))
    return ctx


def write_identity(directory: Path, name: str, cert: x509.Certificate,
                   key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    pki.write_certificates(cert_path, [cert])
    pki.write_private_key(key_path, key)
    return cert_path, key_path


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpsConn:
    """One HTTP/1.1 keep-alive connection over TLS; every request goes over the same socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext, server_hostname: str = HOST) -> HttpsConn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_hostname), 10)
        return cls(reader, writer)

    def peer_certificate(self) -> x509.Certificate:
        ssl_object = self.writer.get_extra_info("ssl_object")
        return x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      body: bytes = b"") -> Reply:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 15)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        reply_headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                reply_headers[name.strip().lower()] = value.strip()
        if status in (204, 304):
            data = b""
        elif "content-length" in reply_headers:
            data = await self.reader.readexactly(int(reply_headers["content-length"]))
        else:  # chunked
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                chunks.append(chunk[:-2])
            data = b"".join(chunks)
        return Reply(status, reply_headers, data)

    async def get(self, path: str, authorization: str | None = None, **headers: str) -> Reply:
        if authorization is not None:
            headers["Authorization"] = authorization
        return await self.request("GET", path, headers)

    async def post(self, path: str, authorization: str | None = None) -> Reply:
        return await self.request("POST", path, {"Authorization": authorization} if authorization else None)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def fetch(port: int, roots: Sequence[x509.Certificate], path: str,
                authorization: str | None = None) -> Reply:
    """One request on a fresh connection trusting exactly `roots`."""
    conn = await HttpsConn.open(port, client_ctx(roots))
    try:
        return await conn.get(path, authorization)
    finally:
        await conn.close()


def bundle_version(data: bytes) -> int:
    """The version inside a bundle (unverified; the tests verify with pki.verify_trust_bundle)."""
    return int(json.loads(base64.b64decode(json.loads(data)["payload"]))["version"])


def tamper(data: bytes, extra_root: x509.Certificate) -> bytes:
    """The bundle with one more root slipped into its payload (signature unchanged)."""
    doc = json.loads(data)
    body = json.loads(base64.b64decode(doc["payload"]))
    body["roots"].append(pem([extra_root]))
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    doc["payload"] = base64.b64encode(payload).decode()
    return json.dumps(doc).encode()


# --- identities and tokens -----------------------------------------------------------------------


async def sas_device(hub: Hub, device_id: str) -> Device:
    body = {"authentication": {"type": "sas", "symmetricKey": {"primaryKey": new_key(),
                                                               "secondaryKey": new_key()}}}
    return await hub.registry.create(device_id, body, actor="test")


def device_token(device: Device, ttl: int = 3600) -> str:
    key = device.authentication.symmetric_key.primary_key
    assert key is not None
    return build_token(f"{HOST}/devices/{device.device_id}", key, int(time.time()) + ttl)


async def policy_token(hub: Hub, policy: str, resource: str = HOST) -> str:
    record = await hub.policies.get(policy)
    return build_token(resource, record.primary_key, int(time.time()) + 3600, policy)


async def refusals(hub: Hub, reason: str, *, action_prefix: str = "auth.",
                   target: str | None = None) -> list[AuditRecord]:
    records = await hub.audit.query(limit=1000, outcome="refused", action_prefix=action_prefix)
    return [r for r in records if r.reason == reason and (target is None or r.target == target)]


# --- MQTT ----------------------------------------------------------------------------------------


def mqtt_username(device_id: str) -> str:
    return f"{HOST}/{device_id}/?api-version=2021-04-12"


async def mqtt_sas_connect(port: int, ctx: ssl.SSLContext, device_id: str,
                           token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Raw MQTT over TLS: CONNECT with a SAS token; asserts CONNACK 0."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOST), 10)
    writer.write(encode_packet(Connect(client_id=device_id, username=mqtt_username(device_id),
                                       password=token.encode(), clean_session=False)))
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x20\x02\x00\x00"
    return reader, writer


async def mqtt_ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"\xc0\x00")  # PINGREQ
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(2), 10) == b"\xd0\x00"  # PINGRESP


def paho_connack(port: int, ca_file: Path, device_id: str, identity: tuple[Path, Path] | None,
                 timeout: float = 10) -> int:
    """Connect with paho 1.6.1 over TLS (client certificate when given, no password) and return the
    CONNACK code (-1 when the hub closed without one). Blocking: run it with asyncio.to_thread."""
    client = mqtt.Client(client_id=device_id, clean_session=False, protocol=mqtt.MQTTv311)
    client.username_pw_set(mqtt_username(device_id), None)
    client.tls_set(ca_certs=str(ca_file), certfile=str(identity[0]) if identity else None,
                   keyfile=str(identity[1]) if identity else None)
    codes: list[int] = []
    client.on_connect = lambda _c, _u, _f, rc: codes.append(rc)
    client.connect("127.0.0.1", port, 60)
    deadline = time.monotonic() + timeout
    try:
        while not codes and time.monotonic() < deadline:
            try:
                if client.loop(0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
            except OSError:  # the hub closed the TLS socket
                break
        if codes == [0]:
            client.disconnect()
    finally:
        sock = client.socket()
        if sock:
            sock.close()
    return codes[0] if codes else -1
