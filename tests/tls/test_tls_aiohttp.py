"""aiohttp's server behind the adapter: `runner.server` is the inner protocol factory, handlers read the
client chain from `request.transport`."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import httpx
from aiohttp import web
from tls_helpers import DevPki, client_context

from tether.security import pki
from tether.security.tls import TlsContextFactory, start_tls_server
from tether.security.x509 import sha1_thumbprint


async def _whoami(request: web.Request) -> web.Response:
    assert request.transport is not None
    chain = request.transport.get_extra_info("peercert_chain")
    return web.json_response(
        {
            "secure": request.secure,
            "scheme": request.scheme,
            "tls": request.transport.get_extra_info("tls_version"),
            "chain": [sha1_thumbprint(c) for c in chain],
        }
    )


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=b"z" * int(request.query["n"]))


@asynccontextmanager
async def aiohttp_tls(factory: TlsContextFactory) -> AsyncIterator[str]:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_get("/whoami", _whoami)
    app.router.add_post("/echo", _echo)
    app.router.add_get("/big", _big)
    runner = web.AppRunner(app)
    await runner.setup()
    assert runner.server is not None
    server = await start_tls_server(runner.server, "127.0.0.1", 0, factory)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://localhost:{port}"
    finally:
        server.close()
        await server.wait_closed()
        await runner.cleanup()


async def test_httpx_client_certificate_reaches_aiohttp_handler(dev_pki: DevPki) -> None:
    cert, key = pki.issue_device_cert("dev-http", self_signed=True)
    ctx = client_context(dev_pki.files.root_cert, identity=dev_pki.identity("dev-http", cert, key))
    async with aiohttp_tls(dev_pki.factory()) as base, httpx.AsyncClient(verify=ctx) as client:
        reply = await client.get(f"{base}/whoami")
        assert reply.status_code == 200
        assert reply.json() == {
            "secure": True,
            "scheme": "https",
            "tls": "TLSv1.3",
            "chain": [sha1_thumbprint(cert)],
        }
        # keep-alive: a second request on the same connection
        body = bytes(range(256)) * 4096
        reply = await client.post(f"{base}/echo", content=body)
        assert reply.content == body


async def test_aiohttp_client_without_certificate(dev_pki: DevPki) -> None:
    ctx = client_context(dev_pki.files.root_cert)
    async with aiohttp_tls(dev_pki.factory()) as base, aiohttp.ClientSession() as session:
        async with session.get(f"{base}/whoami", ssl=ctx) as reply:
            assert reply.status == 200
            assert (await reply.json())["chain"] == []
        async with session.get(f"{base}/big", params={"n": str(3_000_000)}, ssl=ctx) as reply:
            assert len(await reply.read()) == 3_000_000


async def test_aiohttp_client_over_tls12(dev_pki: DevPki) -> None:
    ctx = client_context(dev_pki.files.root_cert, version=ssl.TLSVersion.TLSv1_2)
    async with aiohttp_tls(dev_pki.factory()) as base, aiohttp.ClientSession() as session:
        async with session.get(f"{base}/whoami", ssl=ctx) as reply:
            assert (await reply.json())["tls"] == "TLSv1.2"
