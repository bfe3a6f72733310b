"""Per-peer connection caps across every listener (`limits.max_connections_per_peer`), refused sockets
closed before any TLS work, the aggregated `connection.refused` audit record, and shedding under
descriptor pressure on the AMQP listener: connections without a credential go, an authenticated one
stays."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from pathlib import Path
from typing import Any

from hardening.helpers import HOSTNAME, IP, amqp_plain, serving
from tether.observability.metrics import REGISTRY
from tether.protocols.amqp import AMQP_HEADER, Close, encode_frame

PEER = "127.0.0.93"
OTHER = "127.0.0.94"


async def test_a_peer_over_its_cap_is_refused_on_every_listener_others_are_not(tmp_path: Path) -> None:
    async with serving(tmp_path / "hub", limits={"max_connections_per_peer": 4}) as served:
        held = [await asyncio.open_connection(IP, served.ports["https"], ssl=served.tls(),
                                              server_hostname="localhost", local_addr=(PEER, 0))
                for _ in range(2)]
        for _ in range(2):
            held.append(await asyncio.open_connection(IP, served.ports["mqtt"], local_addr=(PEER, 0)))
        for listener, tls in (("https", True), ("mqtts", True), ("mqtt", False), ("amqps", True)):
            refused = False
            try:
                reader, writer = await asyncio.open_connection(
                    IP, served.ports[listener], ssl=served.tls() if tls else None,
                    server_hostname="localhost" if tls else None, local_addr=(PEER, 0))
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    refused = await asyncio.wait_for(reader.read(1), 10) == b""
                writer.close()
            except (ConnectionError, ssl.SSLError):
                refused = True
            assert refused, f"{listener}: a fifth socket from one peer was admitted"
        reader, writer = await asyncio.open_connection(IP, served.ports["https"], ssl=served.tls(),
                                                       server_hostname="localhost", local_addr=(OTHER, 0))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 200")
        writer.close()
        assert served.hub.slots.peer_count(PEER) == 4

        deadline = time.monotonic() + 10
        records: list[object] = []
        while time.monotonic() < deadline and not records:
            await served.hub.audit.flush()
            records = await served.hub.audit.query(limit=10, action_prefix="connection.refused")
            await asyncio.sleep(0.2)
        [record] = records
        assert record.reason == "per-peer-limit"  # type: ignore[attr-defined]
        assert record.details == {"count": 4, "peers": {PEER: 4}}  # type: ignore[attr-defined]
        for _, writer in held:
            writer.close()


async def amqps(served: Any, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(IP, served.ports["amqps"], ssl=served.tls(),
                                         server_hostname="localhost", local_addr=(peer, 0))


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 30), "big")
    return await asyncio.wait_for(reader.readexactly(size - 4), 30)


def shed_count() -> float:
    return REGISTRY.get_sample_value("tether_connections_refused_total",
                                     {"listener": "amqps", "reason": "shed-idle"}) or 0.0


async def test_amqp_connections_without_a_credential_are_shed_an_authenticated_one_never(
        tmp_path: Path) -> None:
    # long connect deadlines: here only shedding may close a connection
    async with serving(tmp_path / "hub", limits={"connect_timeout_s": 60.0}) as served:
        token = await served.device("keeper")
        keeper_reader, keeper = await amqps(served, OTHER)
        keeper.write(amqp_plain(f"keeper@sas.{HOSTNAME}", token))
        sasl = await asyncio.wait_for(keeper_reader.readuntil(AMQP_HEADER), 30)  # SASL exchange, AMQP header
        assert b"\x00\x53\x44" in sasl and sasl.endswith(b"\x50\x00\x40" + AMQP_HEADER)  # sasl-outcome: ok
        assert (await read_frame(keeper_reader))[4:7] == b"\x00\x53\x10"  # the hub's open: authenticated

        slots = served.hub.slots
        slots.capacity = len(slots) + 2  # room for two more sockets
        shed_before = shed_count()
        idle = []
        for _ in range(2):
            reader, writer = await amqps(served, PEER)
            writer.write(AMQP_HEADER)  # and then nothing: no open, no credential
            assert await asyncio.wait_for(reader.readexactly(8), 30) == AMQP_HEADER
            idle.append((reader, writer))
        newcomers = []
        for _ in range(2):  # the budget is spent: each new socket sheds the oldest unproductive one
            reader, writer = await amqps(served, PEER)
            writer.write(AMQP_HEADER)
            assert await asyncio.wait_for(reader.readexactly(8), 30) == AMQP_HEADER
            newcomers.append((reader, writer))
        for reader, _ in idle:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                assert await asyncio.wait_for(reader.read(), 30) == b""
        assert shed_count() - shed_before == 2
        keeper.write(encode_frame(0, Close()))  # still served: the hub answers its close
        assert (await read_frame(keeper_reader))[4:7] == b"\x00\x53\x18"
        for _, writer in (*idle, *newcomers):
            writer.close()
        keeper.close()
