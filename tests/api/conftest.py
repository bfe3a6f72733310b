"""Fixtures for the REST API tests (helpers live in api_helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from api_helpers import make_hub, policy_token, serving

from tether.hub import Hub


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = make_hub(tmp_path)
    await h.open()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def base_url(hub: Hub) -> AsyncIterator[str]:
    async with serving(hub) as url:
        yield url


@pytest.fixture
async def client(hub: Hub, base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """Authenticated as `registryReadWrite`."""
    headers = {"Authorization": await policy_token(hub)}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as c:
        yield c


@pytest.fixture
async def anon(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as c:
        yield c
