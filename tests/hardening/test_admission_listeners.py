"""Per-peer connection caps across every listener (`limits.max_connections_per_peer`), refused sockets
closed before any TLS work, and the aggregated `connection.refused` audit record."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from pathlib import Path

from hardening.helpers import IP, serving

PEER = "127.0.0.93"
OTHER = "127.0.0.94"


async def test_a_peer_over_its_cap_is_refused_on_every_listener_others_are_not(tmp_path: Path) -> None:
    async with serving(tmp_path / "hub", limits={"max_connections_per_peer": 4}) as served:
        held = [await asyncio.open_connection(IP, served.ports["https"], ssl=served.tls(),
                                              server_hostname="localhost", local_addr=(PEER, 0))
                for _ in range(2)]
        for _ in range(2):
            held.append(await asyncio.open_connection(IP, served.ports["mqtt"], local_addr=(PEER, 0)))
        for listener, tls in (("https", True), ("mqtts", True), ("mqtt", False)):
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
        assert record.details == {"count": 3, "peers": {PEER: 3}}  # type: ignore[attr-defined]
        for _, writer in held:
            writer.close()
