"""Shared helpers for the TLS tests: a dev PKI in a temp dir, an echo inner protocol that hands its
server-side transport to the test, and stdlib `ssl` client contexts."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tether.config import TlsSettings
from tether.security import pki
from tether.security.tls import TlsContextFactory, start_tls_server


@dataclass
class DevPki:
    dir: Path
    files: pki.PkiFiles
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey

    def factory(self, **settings: Any) -> TlsContextFactory:
        return TlsContextFactory(TlsSettings(**settings), self.files.server_cert, self.files.server_key)

    def identity(
        self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> tuple[Path, Path]:
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        pki.write_certificates(cert_path, [cert])
        pki.write_private_key(key_path, key)
        return cert_path, key_path


def make_pki(directory: Path) -> DevPki:
    files = pki.init_pki(directory, ["localhost"], ["127.0.0.1"])
    return DevPki(
        directory, files, pki.load_certificate(files.root_cert), pki.load_private_key(files.root_key)
    )


def client_context(
    cafile: Path | None = None,
    *,
    cadata: str | None = None,
    identity: tuple[Path, Path] | None = None,
    chain: list[x509.Certificate] | None = None,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None, cadata=cadata)
    if identity is not None:
        cert_path, key_path = identity
        if chain:  # leaf first, then intermediates: the client sends the whole file
            pki.write_certificates(cert_path, [pki.load_certificate(cert_path), *chain])
        ctx.load_cert_chain(str(cert_path), str(key_path))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


class EchoProtocol(asyncio.Protocol):
    """Echoes every byte; publishes its transport on the shared queue once connected."""

    def __init__(self, transports: asyncio.Queue[asyncio.Transport]) -> None:
        self._transports = transports
        self.transport: asyncio.Transport | None = None
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._transports.put_nowait(transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


@dataclass
class EchoServer:
    server: asyncio.Server
    port: int
    transports: asyncio.Queue[asyncio.Transport]

    async def next_transport(self, timeout: float = 5.0) -> asyncio.Transport:
        return await asyncio.wait_for(self.transports.get(), timeout)

    async def connect(
        self, ctx: ssl.SSLContext, server_hostname: str = "localhost"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=ctx, server_hostname=server_hostname)


@asynccontextmanager
async def echo_server(factory: TlsContextFactory, **kwargs: Any) -> AsyncIterator[EchoServer]:
    transports: asyncio.Queue[asyncio.Transport] = asyncio.Queue()
    server = await start_tls_server(lambda: EchoProtocol(transports), "127.0.0.1", 0, factory, **kwargs)
    port = server.sockets[0].getsockname()[1]
    try:
        yield EchoServer(server, port, transports)
    finally:
        server.close()
        await server.wait_closed()


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


async def echo_roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 10)
