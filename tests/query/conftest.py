"""Query fixtures: `queries` runs over a TwinService on the shared `storage` (SQLite and PostgreSQL);
`hub`/`client` serve the real REST app on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from hub_app_helpers import make_hub, policy_token, serving

from tether.hub import Hub
from tether.messaging.query import QueryService
from tether.messaging.twins import TwinService
from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.storage.sql import SqlStorage
from tether.storage.sql.twins import SqlTwinRepository


@pytest.fixture
def twins(storage: SqlStorage, registry: RegistryService, audit: AuditLog) -> TwinService:
    return TwinService(SqlTwinRepository(storage.db), registry, audit)


@pytest.fixture
def queries(twins: TwinService) -> QueryService:
    return QueryService(twins, scan_page=64)  # small scan pages exercise the page boundaries


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    h = make_hub(tmp_path)
    await h.open()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    """Authenticated as `registryRead` (querying needs only read access)."""
    headers = {"Authorization": await policy_token(hub, "registryRead")}
    async with serving(hub) as url, httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
        yield c
