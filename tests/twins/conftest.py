"""Twin fixtures: `twins` is a TwinService over the shared `storage` (SQLite and PostgreSQL);
`hub`/`client` serve the real REST app (SQLite and PostgreSQL) on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hub_app_helpers import make_hub, policy_token, serving

from tether.hub import Hub
from tether.messaging.twins import TwinService
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.twins import SqlTwinRepository


@pytest.fixture
def twins(storage: SqlStorage, registry: RegistryService, audit: AuditLog) -> TwinService:
    return TwinService(SqlTwinRepository(storage.db), registry, audit)


@pytest.fixture
async def hub(tmp_path: Path, db_url: str) -> AsyncIterator[Hub]:
    h = make_hub(tmp_path, db_url)
    await h.open()
    if not isinstance(getattr(h, "twins", None), TwinService):  # until the hub builds its own
        setattr(h, "twins", TwinService(SqlTwinRepository(h.storage.db), h.registry, h.audit))  # noqa: B010
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
def hub_twins(hub: Hub) -> TwinService:
    service = getattr(hub, "twins")  # noqa: B009
    assert isinstance(service, TwinService)
    return service


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
