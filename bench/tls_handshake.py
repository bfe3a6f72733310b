"""Handshake rate of Tether's TLS adapter (pyOpenSSL memory BIO) vs asyncio's stdlib `ssl` server.

The server runs in a child process (its own event loop); the client is a sequential, blocking stdlib
`ssl` client in this process: connect, handshake, 1-byte echo (so the server finished its side), close.
ECDSA P-256 server key, TLS 1.3 unless --tls12. Not a test: run by hand, numbers go in
docs/decisions/0002-tls-pyopenssl.md.

    .venv/bin/python bench/tls_handshake.py [-n 300] [--tls12] [--throughput] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import ssl
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

from tether.config import TlsSettings
from tether.security import pki
from tether.security.tls import TlsContextFactory, start_tls_server


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def serve(kind: str, pki_dir: str, use_uvloop: bool, pipe: Connection) -> None:
    async def main() -> None:
        files = pki.init_pki(Path(pki_dir), ["localhost"], ["127.0.0.1"])
        if kind == "pyopenssl":
            factory = TlsContextFactory(TlsSettings(), files.server_cert, files.server_key)
            server = await start_tls_server(Echo, "127.0.0.1", 0, factory)
        else:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(files.server_cert, files.server_key)
            # For a fair mutual-TLS comparison stdlib must request and verify the client certificate;
            # it can only do so against a loaded trust anchor, so the bench device cert is loaded as one.
            ctx.verify_mode = ssl.CERT_OPTIONAL
            ctx.load_verify_locations(Path(pki_dir) / "dev.pem")
            server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, ssl=ctx)
        pipe.send(server.sockets[0].getsockname()[1])
        while await asyncio.get_running_loop().run_in_executor(None, pipe.recv) == "cpu":
            pipe.send(time.process_time())  # server CPU seconds so far (robust on a shared machine)
        server.close()

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def handshakes(port: int, ctx: ssl.SSLContext, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"x")
            assert tls.recv(1) == b"x"
    return n / (time.perf_counter() - start)


def throughput(port: int, ctx: ssl.SSLContext, size: int, count: int) -> float:
    """MB/s echoed over one connection: `count` messages of `size` bytes, each its own TLS record,
    pipelined in batches of 64 KB."""
    payload = b"m" * size
    batch = max(1, 65536 // size)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        start = time.perf_counter()
        for _ in range(count // batch):
            for _ in range(batch):  # one TLS record per message, like MQTT PUBLISHes
                tls.sendall(payload)
            want = size * batch
            while want:
                want -= len(tls.recv(min(want, 1 << 20)))
        elapsed = time.perf_counter() - start
    return size * batch * (count // batch) / elapsed / 1e6


def measured(pipe: Connection, port: int, ctx: ssl.SSLContext, n: int) -> tuple[float, float]:
    """(handshakes per wall-clock second, server CPU milliseconds per handshake)."""
    pipe.send("cpu")
    cpu0 = pipe.recv()
    rate = handshakes(port, ctx, n)
    pipe.send("cpu")
    return rate, (pipe.recv() - cpu0) * 1000 / n


def run(kind: str, args: argparse.Namespace, pki_dir: str) -> None:
    files = pki.init_pki(Path(pki_dir), ["localhost"], ["127.0.0.1"])
    cert, key = pki.issue_device_cert("bench-device", self_signed=True)
    pki.write_certificates(Path(pki_dir) / "dev.pem", [cert])
    pki.write_private_key(Path(pki_dir) / "dev.key", key)
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(kind, pki_dir, args.uvloop, child))
    proc.start()
    port = parent.recv()
    ctx = ssl.create_default_context(cafile=str(files.root_cert))
    if args.tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    mtls = ssl.create_default_context(cafile=str(files.root_cert))
    mtls.maximum_version = ctx.maximum_version
    mtls.load_cert_chain(Path(pki_dir) / "dev.pem", Path(pki_dir) / "dev.key")
    try:
        handshakes(port, ctx, 20)  # warm-up
        plain = sorted(measured(parent, port, ctx, args.n) for _ in range(3))[1]
        mutual = sorted(measured(parent, port, mtls, args.n) for _ in range(3))[1]
        print(
            f"{kind:10s} handshakes/s: {plain[0]:5.0f} ({plain[1]:.2f} ms server CPU each) server auth;  "
            f"{mutual[0]:5.0f} ({mutual[1]:.2f} ms) with a client certificate"
        )
        if args.throughput:
            small = throughput(port, ctx, 100, 100_000)
            large = throughput(port, ctx, 65536, 1000)
            print(f"{kind:10s} echo MB/s: {small:7.1f} (100-byte messages)  {large:7.1f} (64 KB writes)")
    finally:
        parent.send("stop")
        proc.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=300, help="handshakes per round (3 rounds)")
    parser.add_argument("--tls12", action="store_true", help="cap the client at TLS 1.2")
    parser.add_argument("--throughput", action="store_true", help="also measure echo throughput")
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as pki_dir:
        for kind in ("pyopenssl", "stdlib"):
            run(kind, args, pki_dir)


if __name__ == "__main__":
    main()
