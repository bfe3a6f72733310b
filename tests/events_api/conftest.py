"""Fixtures for the consumer API tests (helpers live in events_helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from events_helpers import make_hub, serving, token

from tether.hub import Hub


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = make_hub(tmp_path / "data")
    await h.open()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def served(hub: Hub) -> AsyncIterator[tuple[str, web.AppRunner]]:
    async with serving(hub) as pair:
        yield pair


@pytest.fixture
def base_url(served: tuple[str, web.AppRunner]) -> str:
    return served[0]


@pytest.fixture
async def client(hub: Hub, base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """Authenticated with the `service` policy (ServiceConnect only)."""
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": await token(hub)},
                                 timeout=30) as c:
        yield c
