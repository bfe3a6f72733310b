"""Shared fixtures: real databases (SQLite file per test, PostgreSQL database per test) and the core
services built on them. Protocol-agnostic on purpose; areas add their own fixtures in their conftest.

- `sqlite_url` – a fresh SQLite file URL under `tmp_path`.
- `pg_url` – a fresh, empty PostgreSQL database (`tether_<random>`) on the server named by
  `TETHER_TEST_PG_URL` (default `postgresql+asyncpg://postgres@127.0.0.1:5432/test`), dropped after
  the test. Skips only when the server is unreachable; any other failure is an error.
- `db_url` – parametrized over both (ids "sqlite", "postgres"); `storage` – a started `SqlStorage`
  on it; `audit`, `policies`, `registry` – the services over that storage.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from loop_helpers import run_sync
from sqlalchemy.engine import make_url

from tether.registry.service import RegistryService
from tether.security.audit import AuditLog
from tether.security.policies import PolicyService
from tether.storage.sql import SqlStorage

PG_SERVER_URL = os.environ.get("TETHER_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
_pg_unreachable: list[str] = []  # cached reason, so an absent server costs one connect attempt per session
_pg_checked = False

T = TypeVar("T")


def _dsn(database: str | None = None) -> str:
    """Plain libpq-style DSN for asyncpg (SQLAlchemy's driver suffix removed)."""
    url = make_url(PG_SERVER_URL).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(_dsn(), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not (checked once per session)."""
    global _pg_checked
    if not _pg_checked:
        _pg_checked = True

        async def probe() -> None:
            conn = await asyncpg.connect(_dsn(), timeout=5)
            await conn.close()

        try:
            run_sync(probe)
        except (OSError, TimeoutError) as exc:
            _pg_unreachable.append(f"PostgreSQL unreachable at {_dsn()}: {exc!r}")
    return _pg_unreachable[0] if _pg_unreachable else None


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'tether.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    reason = _pg_reachable()
    if reason is not None:
        pytest.skip(reason)
    name = f"tether_{secrets.token_hex(6)}"
    run_sync(lambda: _pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_SERVER_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        run_sync(lambda: _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    value: Any = request.getfixturevalue(name)
    return str(value)


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[SqlStorage]:
    store = SqlStorage(db_url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def audit(storage: SqlStorage) -> AsyncIterator[AuditLog]:
    log = AuditLog(storage.audit)
    try:
        yield log
    finally:
        await log.close()


@pytest.fixture
def policies(storage: SqlStorage, audit: AuditLog) -> PolicyService:
    return PolicyService(storage.policies, audit)


@pytest.fixture
def registry(storage: SqlStorage, audit: AuditLog) -> RegistryService:
    return RegistryService(storage.devices, audit)
