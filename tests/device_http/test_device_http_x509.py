"""Device HTTPS with a TLS client certificate instead of a token: the chain from Tether's TLS layer
authenticates a selfSigned device, and a certificate of another device is refused (audited)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from c2d.helpers import c2d_of_hub, refused, running_hub
from hub_app_helpers import API

from tether.api.app import build_app
from tether.config import TlsSettings
from tether.hub import Hub
from tether.security import pki
from tether.security.tls import TlsContextFactory, start_tls_server
from tether.security.x509 import sha1_thumbprint


@pytest.fixture
async def tls_hub(tmp_path: Path, sqlite_url: str) -> AsyncIterator[tuple[Hub, str, pki.PkiFiles]]:
    files = pki.init_pki(tmp_path / "pki", ["localhost"], ["127.0.0.1"])
    async with running_hub(tmp_path, sqlite_url) as hub:
        app = build_app(hub)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        assert runner.server is not None
        factory = TlsContextFactory(TlsSettings(), files.server_cert, files.server_key)
        server = await start_tls_server(runner.server, "127.0.0.1", 0, factory)
        try:
            yield hub, f"https://localhost:{server.sockets[0].getsockname()[1]}", files
        finally:
            server.close()
            await server.wait_closed()
            await runner.cleanup()


def client(tmp_path: Path, files: pki.PkiFiles, name: str) -> tuple[httpx.AsyncClient, str]:
    """An httpx client presenting a fresh self-signed certificate; returns it with the thumbprint."""
    cert, key = pki.issue_device_cert(name, self_signed=True)
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    pki.write_certificates(cert_path, [cert])
    pki.write_private_key(key_path, key)
    ctx = ssl.create_default_context(cafile=str(files.root_cert))
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return httpx.AsyncClient(verify=ctx, timeout=30), sha1_thumbprint(cert)


async def test_client_certificate_authenticates_the_device(
    tls_hub: tuple[Hub, str, pki.PkiFiles], tmp_path: Path
) -> None:
    hub, base, files = tls_hub
    http, thumbprint = client(tmp_path, files, "devx")
    other, other_thumbprint = client(tmp_path, files, "devy")
    for device_id, thumb in (("devx", thumbprint), ("devy", other_thumbprint)):
        await hub.registry.create(device_id, {"deviceId": device_id, "authentication": {
            "type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": thumb, "secondaryThumbprint": thumb}}}, actor="test")
    await c2d_of_hub(hub).send("devx", b"for x", actor="policy:service")
    async with http, other:
        r = await http.post(f"{base}/devices/devx/messages/events{API}", content=b"hi")
        assert r.status_code == 204, r.text
        r = await other.get(f"{base}/devices/devx/messages/deviceBound{API}")  # devy's certificate
        assert r.status_code == 401
        r = await http.get(f"{base}/devices/devx/messages/deviceBound{API}")
        assert r.status_code == 200 and r.content == b"for x"
    [record] = await refused(hub)
    assert record.target == "devx" and record.principal == "device:devx"
