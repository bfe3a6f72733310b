"""Module-identity fixtures. The hub harness is shared with tests/methods (`methods_helpers`) and the
telemetry reader with tests/mqtt (`mqtt_helpers`), so both directories are put on the import path."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hub_app_helpers import make_hub, policy_token, serving

from tether.hub import Hub

_TESTS = Path(__file__).resolve().parent.parent
for _name in ("methods", "mqtt"):
    _path = str(_TESTS / _name)
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture
async def hub(tmp_path: Path, db_url: str) -> AsyncIterator[Hub]:
    """A hub on SQLite or PostgreSQL (no listeners: the REST app is served by `client`)."""
    h = make_hub(tmp_path, db_url)
    await h.open()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    """The REST app on 127.0.0.1:0, authenticated as `registryReadWrite`."""
    async with serving(hub) as url:
        headers = {"Authorization": await policy_token(hub)}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            yield c
