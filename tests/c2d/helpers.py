"""Shared C2D test helpers and fixtures (also used by tests/device_http): a real hub on SQLite or
PostgreSQL (`db_url`), served by aiohttp on 127.0.0.1:0 (`hub_app_helpers.serving`), device
identities and tokens."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from hub_app_helpers import HOST, device_body, serving

from tether.config import load_settings
from tether.hub import Hub
from tether.messaging.c2d import C2DService
from tether.registry.models import Device
from tether.registry.service import RegistryService
from tether.security.sas import build_token
from tether.storage.base import AuditRecord

SWEEP_S = 0.05


async def create_device(registry: RegistryService, device_id: str) -> Device:
    return await registry.create(device_id, device_body(device_id), actor="test")


def device_token(device: Device, *, ttl: int = 3600) -> str:
    key = device.authentication.symmetric_key.primary_key
    assert key is not None
    return build_token(f"{HOST}/devices/{device.device_id}", key, int(time.time()) + ttl)


async def policy_token(hub: Hub, policy: str = "service", *, ttl: int = 3600) -> str:
    record = await hub.policies.get(policy)
    return build_token(HOST, record.primary_key, int(time.time()) + ttl, policy)


async def refused(hub: Hub, action_prefix: str = "auth.https") -> list[AuditRecord]:
    await hub.audit.flush()
    return await hub.audit.query(action_prefix=action_prefix, outcome="refused", limit=1000)


@asynccontextmanager
async def running_hub(data_dir: Path, db_url: str, **c2d_options: Any) -> AsyncIterator[Hub]:
    """An opened hub whose `hub.c2d` has a fast sweeper; closed in the right order."""
    hub = Hub(load_settings(hub={"hostname": HOST, "data_dir": data_dir}, storage={"database_url": db_url}))
    await hub.open()
    c2d_options.setdefault("sweep_interval_s", SWEEP_S)
    service = C2DService(hub.storage.db, audit=hub.audit, **c2d_options)
    hub.c2d = service  # type: ignore[attr-defined]  # the lead wires this in Hub
    await service.start()
    try:
        yield hub
    finally:
        await service.close()
        await hub.close()


@pytest.fixture
async def hub(tmp_path: Path, db_url: str) -> AsyncIterator[Hub]:
    async with running_hub(tmp_path, db_url) as h:
        yield h


@pytest.fixture
async def base_url(hub: Hub) -> AsyncIterator[str]:
    async with serving(hub) as url:
        yield url


@pytest.fixture
async def service(hub: Hub, base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """Authenticated with the `service` policy (ServiceConnect)."""
    headers = {"Authorization": await policy_token(hub)}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as c:
        yield c


@pytest.fixture
async def anon(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as c:
        yield c


def c2d_of_hub(hub: Hub) -> C2DService:
    service = getattr(hub, "c2d")  # noqa: B009
    assert isinstance(service, C2DService)
    return service
