"""Helpers for the consumer API tests: a real hub on a temp data dir, its REST app with the event
routes mounted, served by aiohttp on 127.0.0.1 (ephemeral port); SAS tokens; an SSE reader."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web
from hub_app_helpers import HOST, make_hub, policy_token

from tether.api.app import build_app
from tether.hub import Hub
from tether.messaging.events import EventData

__all__ = ["HOST", "SseReader", "append", "make_hub", "serving", "sse", "token"]


@asynccontextmanager
async def serving(hub: Hub) -> AsyncIterator[tuple[str, web.AppRunner]]:
    """Serve the hub's REST app (with the event routes) over plain HTTP; yields (base URL, runner)."""
    runner = web.AppRunner(build_app(hub), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", runner
    finally:
        await runner.cleanup()


async def token(hub: Hub, policy: str = "service", *, ttl: int = 3600) -> str:
    """A policy token; the consumer API's tests use the `service` policy by default."""
    return await policy_token(hub, policy, ttl=ttl)


async def append(hub: Hub, device: str, body: bytes | str = b"{}", *, module: str | None = None,
                 props: dict[str, str] | None = None, system: dict[str, str] | None = None) -> EventData:
    """Append straight to the hub's real stream (what the telemetry pipeline does)."""
    raw = body.encode() if isinstance(body, str) else body
    return await hub.stream.append(device, raw, module_id=module, properties=props or {},
                                   system_properties=system or {"iothub-connection-device-id": device})


@dataclass
class SseReader:
    """Parses an SSE response line by line; keeps comments so tests can see heartbeats."""

    lines: AsyncIterator[str]
    comments: list[str] = field(default_factory=list)

    async def next_event(self, timeout: float = 10.0) -> tuple[str | None, dict[str, Any]]:
        """(id, parsed data) of the next event."""
        ident: str | None = None
        data: list[str] = []
        async with asyncio.timeout(timeout):
            async for line in self.lines:
                if not line:
                    if data:
                        return ident, json.loads("\n".join(data))
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "id":
                    ident = value
                elif name == "data":
                    data.append(value)
        raise EOFError(f"stream ended; comments: {self.comments}")

    async def comment(self, wanted: str, timeout: float = 10.0) -> None:
        """Read until a comment starting with `wanted` arrives (no event may come first)."""
        async with asyncio.timeout(timeout):
            async for line in self.lines:
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    if line[1:].strip().startswith(wanted):
                        return
                elif line:
                    raise AssertionError(f"unexpected line before {wanted!r}: {line!r}")
        raise EOFError(f"stream ended before {wanted!r}; comments: {self.comments}")


@asynccontextmanager
async def sse(client: httpx.AsyncClient, **params: str) -> AsyncIterator[tuple[httpx.Response, SseReader]]:
    """Open the feed and wait for the `: connected` comment (positions are fixed from then on)."""
    async with client.stream("GET", "/tether/events/stream", params=params,
                             timeout=httpx.Timeout(10, read=30)) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        reader = SseReader(response.aiter_lines())
        await reader.comment("connected")
        yield response, reader
