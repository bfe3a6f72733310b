"""Helpers for the tests that serve the hub's REST app (api, c2d, twins, query): a real hub (SQLite in
a temp dir, or a given database URL) served by aiohttp on 127.0.0.1:0, policy tokens and device
bodies."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from tether.api.app import build_app
from tether.config import load_settings
from tether.hub import Hub
from tether.security.sas import build_token

API = "?api-version=2021-04-12"
HOST = "localhost"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def device_body(device_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "deviceId": device_id,
        "authentication": {
            "type": "sas",
            "symmetricKey": {"primaryKey": new_key(), "secondaryKey": new_key()},
        },
        **extra,
    }


def make_hub(data_dir: Path, database_url: str | None = None, hostname: str = HOST) -> Hub:
    storage = {"database_url": database_url} if database_url else {}
    return Hub(load_settings(hub={"hostname": hostname, "data_dir": data_dir}, storage=storage))


@asynccontextmanager
async def serving(hub: Hub) -> AsyncIterator[str]:
    """Serve `build_app(hub)` (every route table) over plain HTTP on 127.0.0.1:0; yields the base URL."""
    runner = web.AppRunner(build_app(hub), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def policy_token(hub: Hub, policy: str = "registryReadWrite", *, ttl: int = 3600,
                       hostname: str = HOST) -> str:
    record = await hub.policies.get(policy)
    return build_token(hostname, record.primary_key, int(time.time()) + ttl, policy)


async def create_device(client: httpx.AsyncClient, device_id: str) -> dict[str, Any]:
    r = await client.put(f"/devices/{device_id}{API}", json=device_body(device_id))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body
